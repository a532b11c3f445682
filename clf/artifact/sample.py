"""The real images every export is checked on: the run's val shards, a folder or shards the user
names, or failing both the handful of photos that ship inside scikit-image and scikit-learn."""

from __future__ import annotations

import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clf import storage
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
    uris: list[str] | None = None  # each image as a label row names it, when read from files
    location: str | None = None  # the folder, shards or file they were read from


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
    files = sample_files(uri, limit)
    names = [f.class_name for f in files]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without the GIL
        decoded = list(pool.map(lambda f: _eval_pixels(f.data, spec), files))
    kept = [i for i, pixels in enumerate(decoded) if pixels is not None]
    images = [decoded[i] for i in kept]
    if not images:
        raise UsageError(f"--sample {uri}: no decodable images")
    labels = None
    index = {name: i for i, name in enumerate(classes)}
    if all(names[i] in index for i in kept):  # shard labels, or class/*.jpg folder names
        labels = torch.tensor([index[names[i]] for i in kept])
    source = f"{len(images)} images from {storage.normalize(uri)}"
    uris = [files[i].uri for i in kept]
    return Sample(spec.normalize(torch.stack(images)), labels, source, uris, uri)


def _eval_pixels(data: bytes, spec: Preprocess) -> torch.Tensor | None:
    try:
        return eval_transform(spec)(decode_image(data, min_size=spec.resize))
    except DecodeError:
        return None


@dataclass
class SampleFile:
    uri: str  # as a label row names it: the file, or SHARD#KEY
    data: bytes
    class_name: str  # the shard's label_name, or the folder the file sits in


def sample_files(uri: str, limit: int) -> list[SampleFile]:
    """Up to ``limit`` encoded images from Parquet shards (their first rows) or image files
    (spread over the listing, so that a class/ tree gives every class)."""
    files = storage.list_files(uri) if storage.is_dir(uri) else [uri]
    shards = [f for f in files if f.endswith(".parquet")]
    if shards:
        return _from_shards(shards, limit)
    files = [f for f in files if not f.endswith(".json")]
    picked = [files[i] for i in _spread(len(files), limit)]
    reads = storage.read_many(picked)
    return [SampleFile(f, read.result(), _parent_name(f)) for f, read in zip(picked, reads)]


def _parent_name(uri: str) -> str:
    return posixpath.basename(posixpath.dirname(uri.replace(os.sep, "/")))


def _spread(n: int, limit: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, limit)).astype(int).tolist())) if n else []


def _from_shards(shards: list[str], limit: int) -> list[SampleFile]:
    """The first rows of the shards: ingest shuffles each split, so they are a fair draw."""
    import pyarrow.parquet as pq

    found: list[SampleFile] = []
    for shard in sorted(shards):
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(64, columns=["key", "image", "label_name"]):
                keys, images = batch.column("key").to_pylist(), batch.column("image").to_pylist()
                names = batch.column("label_name").to_pylist()
                found += [SampleFile(f"{shard}#{k}", d, n) for k, d, n in zip(keys, images, names)]
                if len(found) >= limit:
                    return found[:limit]
    return found


def _packaged(spec: Preprocess) -> Sample:
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in PACKAGED_PHOTOS]
    arrays += list(load_sample_images().images)
    transform = eval_transform(spec)
    images = [transform(Image.fromarray(a).convert("RGB")) for a in arrays]
    source = f"{len(images)} photos shipped in scikit-image and scikit-learn"
    return Sample(spec.normalize(torch.stack(images)), None, source)
