"""jobs.monitor's checks: the flags, the run to monitor and the reference to compare it with,
all resolved before any row is read. No torch, no Ray, no scipy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clf import storage
from clf.artifact.meta import read_meta
from clf.config import MonitorConfig
from clf.dataset.label_rows import committed_files, run_files
from clf.errors import UsageError


@dataclass
class Sources:
    run: dict[str, Any]  # the run's record in --labels/_runs
    run_files: list[str]
    reference: dict[str, Any]  # {"kind": "artifact" | "labels", "uri", "source", "model"}
    reference_files: list[str]


def check_monitor(cfg: MonitorConfig) -> Sources:
    cfg.validate()
    if not committed_files(cfg.labels):
        raise UsageError(f"--labels {cfg.labels}: no label rows there (a jobs.label output?)")
    run, files = run_files(cfg.labels, cfg.run)
    if cfg.reference is None:
        if not run.get("model_uri"):
            raise UsageError(
                f"--labels {cfg.labels}: its rows do not name their artifact (labelled before "
                "runs were recorded); pass --reference ART or an earlier label output"
            )
        return Sources(run, files, *artifact_reference(run["model_uri"], run))
    if storage.exists(storage.join(cfg.reference, "meta.json")):
        return Sources(run, files, *artifact_reference(cfg.reference, run))
    if committed_files(cfg.reference):
        record, reference = run_files(cfg.reference, cfg.reference_run or "all")
        reference = [f for f in reference if f not in set(files)]  # never the run itself
        if not reference:
            raise UsageError(f"--reference {cfg.reference}: no rows besides the run's own")
        where = storage.normalize(cfg.reference)
        source = f"label rows of {where}" + (f", run {record['run']}" if cfg.reference_run else "")
        kind = {"kind": "labels", "uri": where, "source": source, "model": None}
        return Sources(run, files, kind, reference)
    raise UsageError(
        f"--reference {cfg.reference}: neither a model artifact (meta.json) nor a label output"
    )


def artifact_reference(uri: str, run: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The reference an artifact recorded at export, which must be of the run's model."""
    if not storage.exists(storage.join(uri, "meta.json")):
        raise UsageError(f"{uri}: the run's artifact is gone; pass --reference ART or LABELS")
    meta = read_meta(uri)
    if "reference" not in meta:
        raise UsageError(
            f"{uri}: the artifact has no reference (exported before jobs.monitor, or without real "
            "images); export it again, with --sample IMAGES if made from pretrained weights, or "
            "pass --reference LABELS"
        )
    model = meta["sha256"][:12]
    if run.get("model") and run["model"] != model:
        raise UsageError(
            f"--reference {uri} is model {model}, but the run's rows are of model {run['model']}"
        )
    where = storage.normalize(uri)
    kind = {"kind": "artifact", "uri": where, "source": meta["reference"]["source"], "model": model}
    return kind, [storage.join(uri, meta["reference"]["file"])]
