"""Artifacts from a training run, or straight from pretrained weights with no training.

Every export is checked on real images (``load_sample``): the run's val shards, a folder the
user names, or failing both the handful of photos that ship inside scikit-image and scikit-learn.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from clf import artifact, models, storage
from clf.errors import UsageError
from clf.images.decode import DecodeError, decode_image
from clf.images.preprocess import Preprocess
from clf.images.transforms import eval_transform

SAMPLE_IMAGES = 256
PACKAGED_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # skimage.data, no download


@dataclass
class Sample:
    images: torch.Tensor  # normalized float NCHW
    labels: torch.Tensor | None  # indices into the model's classes, when the source has them
    source: str


def resolve_classes(spec: str) -> list[str]:
    """``imagenet`` (names shipped in torchvision), a classes.json, or a text file, one per line."""
    if spec == "imagenet":
        return models.imagenet_classes()
    if not storage.exists(spec):
        raise UsageError(f"--classes {spec}: not found (give a file or 'imagenet')")
    text = storage.read_bytes(spec).decode()
    if spec.endswith(".json"):
        classes = json.loads(text)
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(classes, list) or not classes:
        raise UsageError(f"--classes {spec}: expected a non-empty list of class names")
    return [str(c) for c in classes]


def check_sample_uri(uri: str) -> None:
    if not storage.exists(uri) and not storage.is_dir(uri):
        raise UsageError(f"--sample {uri}: no such file, folder or prefix")


def load_sample(
    uri: str | None, spec: Preprocess, classes: list[str], limit: int = SAMPLE_IMAGES
) -> Sample:
    """Up to ``limit`` real images from Parquet shards or image files; packaged photos if None.

    Labels come with them when every image's class (a shard's ``label_name``, or the folder an
    image file sits in) is one of ``classes``.
    """
    if uri is None:
        return _packaged(spec)
    files = storage.list_files(uri) if storage.is_dir(uri) else [uri]
    shards = [f for f in files if f.endswith(".parquet")]
    if shards:
        encoded, names = _from_shards(shards, limit)
    else:
        files = [f for f in files if not f.endswith(".json")]
        picked = [files[i] for i in _spread(len(files), limit)]  # every class of a class/ tree
        encoded = [storage.read_bytes(f) for f in picked]
        names = [_parent_name(f) for f in picked]
    images, kept = [], []
    for i, data in enumerate(encoded):
        try:
            image = decode_image(data, min_size=spec.resize)
        except DecodeError:
            continue
        images.append(eval_transform(spec)(image))
        kept.append(i)
    if not images:
        raise UsageError(f"--sample {uri}: no decodable images")
    labels = None
    index = {name: i for i, name in enumerate(classes)}
    if all(names[i] in index for i in kept):  # shard labels, or class/*.jpg folder names
        labels = torch.tensor([index[names[i]] for i in kept])
    source = f"{len(images)} images from {storage.normalize(uri)}"
    return Sample(spec.normalize(torch.stack(images)), labels, source)


def _parent_name(uri: str) -> str:
    return posixpath.basename(posixpath.dirname(uri.replace(os.sep, "/")))


def _spread(n: int, limit: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, limit)).astype(int).tolist())) if n else []


def _from_shards(shards: list[str], limit: int) -> tuple[list[bytes], list[str]]:
    """The first rows of the shards: ingest shuffles each split, so they are a fair draw."""
    import pyarrow.parquet as pq

    encoded: list[bytes] = []
    names: list[str] = []
    for shard in sorted(shards):
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(64, columns=["image", "label_name"]):
                encoded += batch.column("image").to_pylist()
                names += batch.column("label_name").to_pylist()
                if len(encoded) >= limit:
                    return encoded[:limit], names[:limit]
    return encoded, names


def _packaged(spec: Preprocess) -> Sample:
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in PACKAGED_PHOTOS]
    arrays += list(load_sample_images().images)
    transform = eval_transform(spec)
    images = [transform(Image.fromarray(a).convert("RGB")) for a in arrays]
    source = f"{len(images)} photos shipped in scikit-image and scikit-learn"
    return Sample(spec.normalize(torch.stack(images)), None, source)


def from_pretrained(
    name: str,
    pretrained: str,
    classes_spec: str,
    output: str,
    formats: tuple[str, ...] = ("torchscript",),
    sample: str | None = None,
    min_int8_agreement: float | None = None,
) -> dict[str, Any]:
    models.check_model_name(name)
    classes = resolve_classes(classes_spec)
    model = models.create_model(name, len(classes), pretrained=pretrained, with_head=True)
    spec = models.default_preprocess(name, model)
    images = load_sample(sample, spec, classes)
    return artifact.export(
        model,
        output,
        arch=name,
        classes=classes,
        preprocess=spec,
        formats=tuple(formats),
        source_run=None,
        metrics={
            "pretrained": storage.normalize(pretrained) if "://" not in pretrained else pretrained
        },
        sample=images.images,
        labels=images.labels,
        sample_source=images.source,
        min_int8_agreement=min_int8_agreement,
    )
