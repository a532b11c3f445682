"""Training data: Ray Data over the image shards, decoded and augmented inside each worker.

Encoded bytes travel through the object store (small); decoding happens in the collate function,
which Ray runs in background threads of the training worker, so no decoded pixels are copied
between processes and the next batch is decoded while this one trains.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from clf import storage
from clf.dataset.shards import list_shards, read_shard
from clf.images.decode import DecodeError, decode_image
from clf.images.preprocess import Preprocess
from clf.images.transforms import decode_size, eval_transform, train_transform

# A split this small is read once, by the driver, into the object store. Re-read every epoch, it
# starts read tasks (on a small machine, fresh worker processes) that compete with the training
# step; read, repartitioned and split by Ray Data's tasks, it was slow to start on a small
# machine (RESULTS.md).
CACHED_SPLIT_BYTES = 256 * 2**20


def read_small_split(data: str, split: str) -> pa.Table:
    """A split's (image, label) rows in file order, read in this process."""
    shards = list_shards(storage.join(data, split))
    return pa.concat_tables([read_shard(s, ["image", "label"]) for s in shards])


def split_blocks(
    table: pa.Table, parts: int, block_rows: int, equal: bool, seed: int | None
) -> list[list[pa.Table]]:
    """``table`` cut into blocks of at most ``block_rows`` rows, the block order shuffled by
    ``seed`` (ingest writes the classes one after the other), then split into ``parts``
    contiguous runs of rows. ``equal`` drops the remainder so every part has as many rows, as
    DDP needs the same number of steps on every rank; otherwise every row is kept."""
    starts = list(range(0, table.num_rows, block_rows))
    if seed is not None:
        np.random.default_rng(seed).shuffle(starts)
    ordered = pa.concat_tables([table.slice(s, block_rows) for s in starts])
    if equal:
        size = ordered.num_rows // parts
        bounds = [rank * size for rank in range(parts + 1)]
    else:
        bounds = [round(rank * ordered.num_rows / parts) for rank in range(parts + 1)]
    return [
        [ordered.slice(s, min(block_rows, hi - s)) for s in range(lo, hi, block_rows)]
        or [ordered.slice(0, 0)]  # a rank with no val rows still gets a (empty) dataset
        for lo, hi in zip(bounds, bounds[1:])
    ]


def worker_datasets(
    data: str, workers: int, read_cpus: float, block_rows: int, seed: int
) -> tuple[dict[str, Any], list[str]]:
    """The train and val datasets for Ray Train, and the names it must split between workers.

    A small split is cached and split here, once, into datasets named ``{split}_{rank}``. Left to
    Ray Train, its streaming split starts a coordinator actor per dataset and cuts blocks in Ray
    tasks at the first epoch; on a small machine each needs a fresh worker process, and training
    waits. Train is split equally (DDP needs the same number of steps on every rank); val is not,
    so that every val image is scored. A bigger split streams from storage, and Ray Train splits
    it.
    """
    import ray

    datasets: dict[str, Any] = {}
    streamed: list[str] = []
    for split in ("train", "val"):
        uri = storage.join(data, split)
        if storage.total_bytes(uri) > CACHED_SPLIT_BYTES:
            fs, path = storage.resolve(uri)
            ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=read_cpus)
            ds = ds.select_columns(["image", "label"])
            datasets[split] = ds.randomize_block_order(seed=seed) if split == "train" else ds
            streamed.append(split)
            continue
        parts = split_blocks(
            read_small_split(data, split),
            workers,
            block_rows,
            equal=split == "train",
            seed=seed if split == "train" else None,
        )
        for rank, blocks in enumerate(parts):
            datasets[shard_name(split, rank)] = ray.data.from_blocks(blocks)
    return datasets, streamed


def shard_name(split: str, rank: int, streamed: Collection[str] = ()) -> str:
    """The dataset a worker of ``rank`` reads ``split`` from (see ``worker_datasets``)."""
    return split if split in streamed else f"{split}_{rank}"


def iter_rows(data: str, split: str, limit: int) -> Iterator[tuple[bytes, int]]:
    """The first ``limit`` (image bytes, label) rows of a split, read without Ray."""
    seen = 0
    for shard in list_shards(storage.join(data, split)):
        table = read_shard(shard, ["image", "label"])
        for image, label in zip(table.column("image").to_pylist(), table.column("label")):
            if seen == limit:
                return
            seen += 1
            yield image, label.as_py()


def channel_stats(data: str, spec: Preprocess, limit: int = 512) -> Preprocess:
    """``spec`` with mean and std measured on up to ``limit`` train images (eval view)."""
    transform = eval_transform(spec)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for image, _ in iter_rows(data, "train", limit):
        try:
            x = transform(decode_image(image, min_size=spec.resize, max_one_colour=None))
        except DecodeError:
            continue
        x = x.double().flatten(1) / 255
        total += x.sum(1)
        squares += (x * x).sum(1)
        pixels += x.shape[1]
    if not pixels:
        return spec
    mean = total / pixels
    std = (squares / pixels - mean**2).clamp_min(1e-12).sqrt()
    return Preprocess(
        spec.input_size,
        spec.resize,
        spec.interpolation,
        tuple(round(float(v), 4) for v in mean),
        tuple(round(float(v), 4) for v in std),
    )


def balanced_weights(counts: list[int]) -> np.ndarray:
    """n / (C * n_c) per class: sklearn's "balanced" weights. An absent class weighs 0."""
    counts_array = np.asarray(counts, dtype=np.float64)
    present = counts_array > 0
    weights = np.zeros_like(counts_array)
    weights[present] = counts_array.sum() / (present.sum() * counts_array[present])
    return weights


class BalancedResampler:
    """Draws each row ``floor(w) + Bernoulli(frac(w))`` times, ``w`` its class's balanced weight.

    In expectation every class is seen equally often and an epoch keeps its length, the way a
    ``WeightedRandomSampler`` with replacement behaves. It works on each worker's own stream, so
    it needs no sampler coordination under DDP. Draws are seeded by the run seed, the epoch and
    the batch's content, so a run is reproducible.
    """

    def __init__(self, counts: list[int], seed: int):
        self.weights = balanced_weights(counts)
        self.seed = seed
        self.epoch = 0

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        sizes = np.fromiter((len(b) for b in images), dtype=np.int64, count=len(images))
        content = zlib.crc32(sizes.tobytes() + np.asarray(labels, dtype=np.int64).tobytes())
        rng = np.random.default_rng([self.seed, self.epoch, content])
        w = self.weights[np.asarray(labels, dtype=np.int64)]
        repeats = np.floor(w).astype(np.int64) + (rng.random(len(w)) < w - np.floor(w))
        return np.repeat(np.arange(len(w)), repeats)


class DecodeCollate(NumpyBatchCollateFn):
    """Bytes + labels -> {"image": uint8 NCHW, "label": int64}. Undecodable rows are skipped."""

    def __init__(self, spec: Preprocess, augment=None, resampler: BalancedResampler | None = None):
        self.train = augment is not None
        self.transform = train_transform(spec, augment) if self.train else eval_transform(spec)
        self.min_size = decode_size(spec, self.train)
        self.crop = spec.crop
        self.resampler = resampler

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rows = (
            self.resampler(batch["image"], batch["label"])
            if self.resampler is not None
            else range(len(batch["label"]))
        )
        images = []
        labels: list[int] = []
        for i in rows:
            try:
                # Shards were checked at ingest; the blank check would only repeat that work.
                image = decode_image(batch["image"][i], min_size=self.min_size, max_one_colour=None)
            except DecodeError:
                continue
            images.append(self.transform(image))
            labels.append(int(batch["label"][i]))
        if not images:
            return {
                "image": torch.empty((0, 3, self.crop, self.crop), dtype=torch.uint8),
                "label": torch.empty(0, dtype=torch.long),
            }
        return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long)}
