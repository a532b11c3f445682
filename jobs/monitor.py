"""jobs.monitor: did a night's label rows drift from the reference, and which images should a
person look at?

Writes OUTPUT/drift.json and drift.png, and with --review N the review queue (review.parquet,
review.csv, review.png). Exit code 0: nothing drifted; 3: something did; 2: a bad flag or input.
Fill review.csv's label column with the true classes and give it to jobs.ingest --labels.
"""

from __future__ import annotations

import typing

from clf import cli
from clf.config import MonitorConfig, ReviewStrategy
from clf.monitor.checks import check_monitor


def build_parser():
    p = cli.parser("monitor", __doc__)
    p.add_argument("--labels", type=cli.location, required=True, help="a jobs.label output")
    p.add_argument(
        "--run", help="the run of --labels to monitor, or 'all' (default: the latest that labelled)"
    )
    p.add_argument(
        "--reference",
        type=cli.location,
        help="a model artifact (the reference it recorded at export) or an earlier label output "
        "(default: the artifact that labelled the run)",
    )
    p.add_argument(
        "--reference-run", help="of a --reference label output (default: all its other rows)"
    )
    p.add_argument("--output", type=cli.location, required=True, help="folder or s3:// prefix")
    p.add_argument(
        "--p-value",
        type=float,
        default=MonitorConfig.p_value,
        help="chi-square and KS tests: drift below this p-value",
    )
    p.add_argument(
        "--js-distance",
        type=float,
        default=MonitorConfig.js_distance,
        help="class shares: drift at or above this Jensen-Shannon distance",
    )
    p.add_argument(
        "--psi",
        type=float,
        default=MonitorConfig.psi,
        help="confidence and entropy: drift at or above this population stability index",
    )
    p.add_argument(
        "--error-share",
        type=float,
        default=MonitorConfig.error_share,
        help="drift when the share of error rows grows by this much",
    )
    p.add_argument(
        "--large-sample",
        type=cli.positive_int,
        default=MonitorConfig.large_sample,
        help="the tests decide up to this many labelled rows per sample, the distances above it",
    )
    p.add_argument(
        "--review", type=int, default=0, help="rows in the review queue (default: no queue)"
    )
    p.add_argument(
        "--strategy",
        choices=typing.get_args(ReviewStrategy),
        default=MonitorConfig.strategy,
        help="review the rows of least confidence, smallest top-2 margin or highest entropy",
    )
    p.add_argument("--stratify", action="store_true", help="classes take turns in the review queue")
    return p


def summary_lines(summary: dict) -> list[str]:
    lines = [
        f"{summary['verdict']}: run {summary['run']['id']} ({summary['run']['rows']} rows) against "
        f"{summary['reference']['source']}",
    ]
    if summary["drifted"]:
        lines.append(f"drifted: {', '.join(summary['drifted'])}")
    if summary["insufficient"]:
        lines.append(f"insufficient data: {', '.join(summary['insufficient'])}")
    if "review" in summary:
        review = summary["review"]
        lines.append(f"review queue: {review['rows']} rows by {review['strategy']}")
    lines += [f"wrote {uri}" for uri in summary["files"]]
    return lines


def main() -> int:
    args = build_parser().parse_args()
    cfg = cli.config_from_args(MonitorConfig, args)
    sources = check_monitor(cfg)
    from clf.monitor.job import monitor

    summary = monitor(cfg, sources, progress=cli.progress(args.json))
    cli.emit(summary, summary_lines(summary), args.json)
    return summary["exit_code"]


if __name__ == "__main__":
    cli.run("monitor", main)
