"""After a night's labelling: whether its rows drifted from the reference (``drift.json``,
``drift.png``), and with ``review`` the rows a person should look at. Runs in the job's own
process, over pyarrow columns: no Ray, no model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from clf import plots, storage
from clf.config import MonitorConfig
from clf.monitor.checks import Sources
from clf.monitor.drift import Thresholds, drift_report
from clf.monitor.review import review_rows, write_review
from clf.monitor.rows import label_stats, read_columns

DRIFT_EXIT_CODE = 3  # what a nightly scheduler alerts on; 0 when nothing drifts


def monitor(
    cfg: MonitorConfig, sources: Sources, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Write the drift report (and the review queue); returns its summary."""
    started = time.monotonic()
    columns = read_columns(sources.run_files)
    run = label_stats(columns)
    reference = label_stats(read_columns(sources.reference_files))
    progress(
        f"[monitor] run {sources.run['run']}: {run.rows} rows; reference: {reference.rows} rows "
        f"({sources.reference['source']})"
    )
    thresholds = Thresholds(
        cfg.p_value, cfg.js_distance, cfg.psi, cfg.error_share, cfg.large_sample
    )
    report = drift_report(reference, run, thresholds)
    verdict = "drift" if report["drift"] else "no drift"
    summary = {
        "verdict": verdict,
        "exit_code": DRIFT_EXIT_CODE if report["drift"] else 0,
        "drifted": [n for n, m in report["metrics"].items() if m["drift"] and m["decides"]],
        "insufficient": [n for n, m in report["metrics"].items() if m["value"] is None],
        "run": {
            "labels": storage.normalize(cfg.labels),
            "id": sources.run["run"],
            "rows": run.rows,
            "labelled": run.labelled,
        },
        "reference": sources.reference | {"rows": reference.rows, "labelled": reference.labelled},
    }
    storage.write_json(storage.join(cfg.output, "drift.json"), summary | report)
    against = {"artifact": "the artifact's reference", "labels": "earlier label rows"}
    title = f"run {sources.run['run']} against {against[sources.reference['kind']]}: {verdict}"
    figure = plots.drift_figure(report["classes"], reference.confidence, run.confidence, title)
    storage.write_bytes(storage.join(cfg.output, "drift.png"), figure)
    summary["files"] = [storage.join(cfg.output, name) for name in ("drift.json", "drift.png")]
    if cfg.review:
        queue = review_rows(columns, cfg.strategy, cfg.review, cfg.stratify)
        summary["review"] = {"rows": queue.num_rows, "strategy": cfg.strategy}
        summary["files"] += write_review(queue, cfg.output)
    summary["seconds"] = time.monotonic() - started
    return summary
