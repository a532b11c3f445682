"""Training data: Ray Data over the image shards, decoded and augmented inside each worker.

Encoded bytes travel through the object store (small); decoding happens in the collate function,
which Ray runs in background threads of the training worker, so no decoded pixels are copied
between processes and the next batch is decoded while this one trains.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from clf import storage
from clf.decode import DecodeError, decode_image
from clf.transforms import Preprocess, decode_size, eval_transform, train_transform


def read_split(data: str, split: str, read_cpus: float):
    import ray

    fs, path = storage.resolve(storage.join(data, split))
    return ray.data.read_parquet(
        path, filesystem=fs, columns=["image", "label"], ray_remote_args={"num_cpus": read_cpus}
    )


class DecodeCollate(NumpyBatchCollateFn):
    """Bytes + labels -> {"image": uint8 NCHW, "label": int64}. Undecodable rows are skipped."""

    def __init__(self, spec: Preprocess, augment=None):
        self.train = augment is not None
        self.transform = train_transform(spec, augment) if self.train else eval_transform(spec)
        self.min_size = decode_size(spec, self.train)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = []
        labels: list[int] = []
        for data, label in zip(batch["image"], batch["label"]):
            try:
                # Shards were checked at ingest; the blank check would only repeat that work.
                image = decode_image(data, min_size=self.min_size, max_one_colour=None)
            except DecodeError:
                continue
            images.append(self.transform(image))
            labels.append(int(label))
        if not images:
            crop = (
                self.transform.transforms[0].size
                if self.train
                else self.transform.transforms[1].size
            )
            return {
                "image": torch.empty((0, 3, *crop), dtype=torch.uint8),
                "label": torch.empty(0, dtype=torch.long),
            }
        return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long)}
