"""jobs.evaluate: metrics, per-class CSV, confusion matrix and calibration of a model on a split."""

from __future__ import annotations

from dataclasses import asdict

from clf import cli
from clf.config import EvaluateConfig
from clf.evaluate.checks import check


def build_parser():
    p = cli.parser("evaluate", __doc__)
    p.add_argument(
        "--model",
        type=cli.location,
        required=True,
        help="model artifact (ART), or hog_svm for the HOG+SVM baseline",
    )
    p.add_argument(
        "--data",
        type=cli.location,
        required=True,
        help="a split of jobs.ingest shards, e.g. DST/test",
    )
    p.add_argument(
        "--output", type=cli.location, required=True, help="folder or s3:// prefix for the report"
    )
    p.add_argument(
        "--top-k",
        type=cli.positive_int,
        default=EvaluateConfig.top_k,
        help="k of the top-k accuracy",
    )
    cli.add_actor_pool_flags(p, "scorer", EvaluateConfig)
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="also draw first-layer filters and the most confidently wrong images",
    )
    p.add_argument(
        "--train",
        type=cli.location,
        help="with --model hog_svm: the split to fit on, e.g. DST/train",
    )
    p.add_argument(
        "--baseline-size",
        type=cli.positive_int,
        default=EvaluateConfig.baseline_size,
        help="hog_svm: HOG image side (px)",
    )
    p.add_argument(
        "--confused-pairs",
        type=cli.positive_int,
        default=EvaluateConfig.confused_pairs,
        help="most confused pairs listed",
    )
    return p


def main() -> None:
    args = build_parser().parse_args()
    cfg = cli.config_from_args(EvaluateConfig, args)
    target = check(cfg)
    from clf.evaluate.job import evaluate

    summary = evaluate(cfg, target, progress=cli.progress(args.json))
    m = summary.metrics
    errors = ", ".join(f"{r}: {n}" for r, n in summary.decode_errors.items()) or "none"
    confused = ", ".join(
        f"{p['true']} -> {p['predicted']} ({p['count']})" for p in summary.most_confused[:3]
    )
    lines = [
        f"evaluated {summary.images} images in {summary.seconds:.1f}s "
        f"({summary.images_per_s:.1f} img/s); undecodable: {errors}",
        f"top-1 {m['top1']:.1%}   top-{m['top_k']} {_percent(m['top_k_accuracy'])}   "
        f"macro F1 {m['f1_macro']:.3f}   AUC {_number(m['auc_ovr_macro'])}   ECE {m['ece']:.3f}",
        f"most confused: {confused or 'none'}",
        f"output: {summary.output} ({', '.join(summary.files)})",
    ]
    cli.emit(asdict(summary) | {"images_per_s": summary.images_per_s}, lines, args.json)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    cli.run("evaluate", main)
