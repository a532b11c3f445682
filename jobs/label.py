"""jobs.label: one Parquet label row per input image (Ray Data, exactly once, errors as rows)."""

from __future__ import annotations

from dataclasses import asdict

from clf import cli
from clf.config import LabelConfig
from clf.label.checks import check_label


def build_parser():
    p = cli.parser("label", __doc__)
    p.add_argument(
        "--model", type=cli.location, required=True, help="model artifact folder or URI (ART)"
    )
    p.add_argument(
        "--input",
        type=cli.location,
        required=True,
        help="folder/prefix of images, or of Parquet image shards",
    )
    p.add_argument(
        "--output",
        type=cli.location,
        required=True,
        help="folder or s3:// prefix for the label rows",
    )
    p.add_argument(
        "--top-k",
        type=cli.positive_int,
        default=LabelConfig.top_k,
        help="classes in topk_labels and topk_scores",
    )
    cli.add_actor_pool_flags(p, "predictor", LabelConfig)
    p.add_argument(
        "--decode",
        choices=["auto", "cpu", "gpu"],
        default=LabelConfig.decode,
        help="where JPEGs decode (default auto: on the predictor's GPU when it has one, "
        "nvJPEG; other formats always decode on CPUs)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="let another job (model, input or --top-k) add to --output; every run labels "
        "only inputs not yet labelled there",
    )
    p.add_argument(
        "--max-pixels",
        type=cli.positive_int,
        default=LabelConfig.max_pixels,
        help="larger images become error rows, refused from the header (decompression bombs)",
    )
    cli.add_read_concurrency_flag(p, LabelConfig, "per decode task")
    p.add_argument(
        "--rows-per-file",
        type=cli.positive_int,
        default=LabelConfig.rows_per_file,
        help="label rows per committed Parquet file; a kill loses at most the rows not yet "
        "committed, which a re-run labels",
    )
    p.add_argument(
        "--progress-every",
        type=cli.positive_seconds,
        default=LabelConfig.progress_every,
        help=f"seconds between progress lines (default {LabelConfig.progress_every:g})",
    )
    return p


def main() -> None:
    args = build_parser().parse_args()
    cfg = cli.config_from_args(LabelConfig, args)
    meta = check_label(cfg)
    from clf.label.job import label

    summary = label(cfg, meta, progress=cli.progress(args.json))
    errors = ", ".join(f"{reason}: {n}" for reason, n in summary.errors.items()) or "none"
    lines = [
        f"labelled {summary.labelled} images in {summary.seconds:.1f}s "
        f"({summary.images_per_s:.1f} img/s); {summary.already_labelled} were already labelled",
        f"errors: {errors}",
        f"output: {summary.output} (run {summary.run})",
    ]
    cli.emit(asdict(summary) | {"images_per_s": summary.images_per_s}, lines, args.json)


if __name__ == "__main__":
    cli.run("label", main)
