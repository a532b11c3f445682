"""Checks of a job's flags and inputs, run before Ray starts.

They import neither torch nor Ray (seconds each on a small machine), so a mistyped path fails
in about a second. The model name, which only torchvision and timm can check, comes last.
"""

from __future__ import annotations

from typing import Any

from clf import storage
from clf.artifact_meta import read_meta
from clf.config import BASELINE_MODEL, LabelConfig, TrainConfig
from clf.errors import UsageError
from clf.ingest import read_classes


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
    if cfg.model.name != BASELINE_MODEL:
        from clf import models

        models.check_model_name(cfg.model.name)
    return read_classes(cfg.data.path), manifest


def check_label(cfg: LabelConfig) -> dict[str, Any]:
    """``jobs.label``'s flags, model and input; returns the artifact's meta."""
    cfg.validate()
    if cfg.decode == "gpu" and cfg.device == "cpu":
        raise UsageError("--decode gpu needs the predictor on a GPU, not --device cpu")
    if not cfg.output:
        raise UsageError("--output is required")
    meta = read_meta(cfg.model)
    if not storage.exists(cfg.input):
        raise UsageError(f"--input {cfg.input}: no such file, folder or prefix")
    return meta
