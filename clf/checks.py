"""Checks of a job's flags and inputs, run before Ray starts.

They import neither torch nor Ray (seconds each on a small machine), so a mistyped path fails
in about a second. The model name, which only torchvision and timm can check, comes last.
"""

from __future__ import annotations

from typing import Any

from clf import storage
from clf.artifact.meta import read_meta
from clf.config import BASELINE_MODEL, LabelConfig, TrainConfig
from clf.dataset.shards import read_classes
from clf.errors import UsageError


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
    _check_label_job(cfg, meta)
    return meta


LABEL_JOB_FILE = "_job.json"


def label_job(cfg: LabelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two label runs one job, so that the second resumes the first."""
    return {"input": storage.normalize(cfg.input), "model": meta["sha256"][:12], "top_k": cfg.top_k}


def _check_label_job(cfg: LabelConfig, meta: dict[str, Any]) -> None:
    """The same command resumes: it labels only the inputs no committed file covers. Another
    job (other input, model or top-k) may add to an output only with ``--skip-existing``, and
    then too labels only what is not covered yet; rows already there are never redone."""
    uri = storage.join(cfg.output, LABEL_JOB_FILE)
    if cfg.skip_existing or not storage.exists(uri):
        return
    previous = storage.read_json(uri)
    if previous != label_job(cfg, meta):
        raise UsageError(
            f"--output {cfg.output} holds labels of another job ({previous}); "
            "pass --skip-existing to add to it, or use a new --output"
        )
