"""jobs.train's checks, before Ray starts: flags, the ingest output, pretrained weights, the
model name, and that a re-run resumes the same run. No torch until the model name, which only
torchvision and timm can check, and which comes last."""

from __future__ import annotations

from typing import Any

from clf import storage
from clf.config import BASELINE_MODEL, TrainConfig
from clf.dataset.shards import read_classes
from clf.errors import UsageError
from clf.zeroshot import clip


def check_train(cfg: TrainConfig) -> tuple[list[str], dict[str, Any]]:
    """``jobs.train``'s flags and data; returns the classes and the ingest manifest."""
    cfg.validate()
    if not cfg.output:
        raise UsageError("--output is required")
    if not cfg.data.path or not storage.exists(storage.join(cfg.data.path, "manifest.json")):
        raise UsageError(f"--data {cfg.data.path}: not a jobs.ingest output (no manifest.json)")
    manifest = storage.read_json(storage.join(cfg.data.path, "manifest.json"))
    for split in ("train", "val"):
        if not manifest["counts"].get(split):
            raise UsageError(f"--data {cfg.data.path}: the {split} split is empty")
    if cfg.model.pretrained and not storage.exists(cfg.model.pretrained):
        raise UsageError(f"--pretrained {cfg.model.pretrained}: not found")
    if clip.is_clip(cfg.model.name):
        if not cfg.model.pretrained:
            raise UsageError(f"--model {cfg.model.name} needs --pretrained CLIP weights")
    elif cfg.model.name != BASELINE_MODEL:
        from clf import models

        models.check_model_name(cfg.model.name)
    _check_resume(cfg)
    return read_classes(cfg.data.path), manifest


def _check_resume(cfg: TrainConfig) -> None:
    """Resuming with another model or data would mix two runs: refuse it."""
    uri = storage.join(cfg.output, "config.json")
    if not storage.exists(uri):
        return
    previous = storage.read_json(uri)
    checks = {
        "model.name": (previous["model"]["name"], cfg.model.name),
        "data.path": (
            storage.normalize(previous["data"]["path"]),
            storage.normalize(cfg.data.path),
        ),
    }
    for key, (before, now) in checks.items():
        if before != now:
            raise UsageError(
                f"--output {cfg.output} holds a run with {key}={before!r}; use a new --output"
            )
