"""The evaluation report's files: report.json, per_class.csv, confusion_matrix.{csv,png} and
reliability.png, under any storage URI."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from clf import plots, storage
from clf.evaluate.metrics import Report

REPORT_FILES = (
    "report.json",
    "per_class.csv",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "reliability.png",
)


def write(
    report: Report, output: str, extra: dict[str, Any] | None = None, also: Sequence[str] = ()
) -> dict[str, Any]:
    """Write the report files under ``output``; returns report.json's content. ``extra`` goes
    into report.json as is; ``also`` names other files already written beside it."""
    storage.write_bytes(storage.join(output, "per_class.csv"), per_class_csv(report))
    storage.write_bytes(storage.join(output, "confusion_matrix.csv"), confusion_csv(report))
    storage.write_bytes(
        storage.join(output, "confusion_matrix.png"),
        plots.confusion_heatmap(report.confusion, report.classes),
    )
    storage.write_bytes(
        storage.join(output, "reliability.png"),
        plots.reliability_diagram(report.reliability, report.metrics["ece"]),
    )
    content = {
        **(extra or {}),
        "metrics": report.metrics,
        "most_confused": report.most_confused,
        "reliability": report.reliability,
        "classes": report.classes,
        "files": [*REPORT_FILES, *also],
    }
    storage.write_json(storage.join(output, "report.json"), content)  # last: marks completion
    return content


def per_class_csv(report: Report) -> bytes:
    return _csv(list(report.per_class[0]), [list(row.values()) for row in report.per_class])


def confusion_csv(report: Report) -> bytes:
    """Counts with class names on both axes: the first column is the true class."""
    rows = [[name, *map(int, row)] for name, row in zip(report.classes, report.confusion)]
    return _csv(["true \\ predicted", *report.classes], rows)


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return text.getvalue().encode()
