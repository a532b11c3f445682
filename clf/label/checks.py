"""jobs.label's checks, before Ray starts; they import neither torch nor Ray."""

from __future__ import annotations

from typing import Any

from clf import storage
from clf.artifact.meta import read_meta
from clf.config import LabelConfig
from clf.errors import UsageError

JOB_FILE = "_job.json"  # in the output: the job that wrote there


def check_label(cfg: LabelConfig) -> dict[str, Any]:
    """``jobs.label``'s flags, model and input; returns the artifact's meta."""
    cfg.validate()
    if cfg.decode == "gpu" and cfg.device == "cpu":
        raise UsageError("--decode gpu needs the predictor on a GPU, not --device cpu")
    meta = read_meta(cfg.model)
    if not storage.exists(cfg.input):
        raise UsageError(f"--input {cfg.input}: no such file, folder or prefix")
    _check_same_job(cfg, meta)
    return meta


def label_job(cfg: LabelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two label runs one job, so that the second resumes the first."""
    return {"input": storage.normalize(cfg.input), "model": meta["sha256"][:12], "top_k": cfg.top_k}


def _check_same_job(cfg: LabelConfig, meta: dict[str, Any]) -> None:
    """The same command resumes: it labels only the inputs no committed file covers. Another
    job (other input, model or top-k) may add to an output only with ``--skip-existing``, and
    then too labels only what is not covered yet; rows already there are never redone."""
    uri = storage.join(cfg.output, JOB_FILE)
    if cfg.skip_existing or not storage.exists(uri):
        return
    previous = storage.read_json(uri)
    if previous != label_job(cfg, meta):
        raise UsageError(
            f"--output {cfg.output} holds labels of another job ({previous}); "
            "pass --skip-existing to add to it, or use a new --output"
        )
