"""jobs.evaluate's checks, before Ray starts: every flag and path, the split's shards and how
its labels map to the model's classes. They import neither torch nor scikit-learn."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clf import storage
from clf.artifact.meta import read_meta
from clf.config import BASELINE_MODEL, EvaluateConfig
from clf.dataset.shards import list_shards, read_classes, row_count
from clf.errors import UsageError


@dataclass
class Target:
    """What ``check`` found: the model's meta and classes, and how the data's labels map to them."""

    meta: dict[str, Any]
    classes: list[str]  # the model's
    label_map: np.ndarray  # data label id -> model class id
    matched_by: str  # "name" or "position"
    shards: list[str] = field(default_factory=list)
    images: int = 0

    @property
    def is_baseline(self) -> bool:
        return self.meta.get("format") == BASELINE_MODEL


def check(cfg: EvaluateConfig) -> Target:
    """Every flag and path, before any cluster or model work; raises ``UsageError``."""
    cfg.validate()
    if storage.exists(storage.join(cfg.data, "classes.json")):
        raise UsageError(f"--data {cfg.data}: give one split of it, such as {cfg.data}/test")
    shards = list_shards(cfg.data)
    if not shards:
        raise UsageError(f"--data {cfg.data}: no Parquet image shards (give DST/test)")
    data_classes = read_classes(_parent(cfg.data))
    if cfg.fits_baseline:
        if not cfg.train:
            raise UsageError(f"--model {BASELINE_MODEL} needs --train DST/train to fit on")
        if not list_shards(cfg.train):
            raise UsageError(f"--train {cfg.train}: no Parquet image shards")
        train_classes = read_classes(_parent(cfg.train))
        meta = {"format": BASELINE_MODEL, "arch": BASELINE_MODEL, "classes": train_classes}
    else:
        meta = read_meta(cfg.model)
    label_map, matched_by = align_classes(data_classes, list(meta["classes"]))
    images = sum(row_count(s) for s in shards)
    return Target(meta, list(meta["classes"]), label_map, matched_by, shards, images)


def align_classes(data: list[str], model: list[str]) -> tuple[np.ndarray, str]:
    """Map the data's label ids to the model's class ids: by name when every data class is a
    model class, else by position when the counts agree (ImageNet wnid folders against
    torchvision's class names)."""
    index = {name: i for i, name in enumerate(model)}
    if all(name in index for name in data) and len(index) == len(model):
        return np.array([index[name] for name in data], dtype=np.int64), "name"
    if len(data) == len(model):
        return np.arange(len(data), dtype=np.int64), "position"
    missing = next(name for name in data if name not in index)
    raise UsageError(
        f"--data has {len(data)} classes and the model {len(model)}, and class {missing!r} "
        "is not one of the model's"
    )


def _parent(uri: str) -> str:
    uri = storage.normalize(uri)
    return (
        "s3://" + posixpath.dirname(uri[5:]) if uri.startswith("s3://") else posixpath.dirname(uri)
    )
