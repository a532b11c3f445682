"""jobs.export: a self-describing model artifact from a run, or straight from pretrained weights."""

from __future__ import annotations

from typing import Any

from clf import cli, models
from clf.artifact.formats import INT8_MIN_AGREEMENT
from clf.artifact.meta import FORMATS, parse_formats, read_meta
from clf.errors import UsageError
from clf.zeroshot import clip


def build_parser():
    p = cli.parser("export", __doc__)
    p.add_argument(
        "--run", type=cli.location, help="training run (RUN) whose best checkpoint to export"
    )
    p.add_argument(
        "--model",
        help="with --pretrained: architecture name; clip:ARCH (an open_clip name) makes a "
        "zero-shot classifier of --classes",
    )
    p.add_argument("--pretrained", type=cli.location, help="with --model: state dict path or URI")
    p.add_argument(
        "--classes",
        type=cli.location,
        help="with --model: classes file (.json or one per line) or 'imagenet'",
    )
    p.add_argument(
        "--prompts",
        type=cli.location,
        help="with --model clip:ARCH: templates with {}, one per line, or 'imagenet' for "
        "open_clip's 80 (default: six short ones, 'a photo of a {}.' first)",
    )
    p.add_argument(
        "--format",
        default="torchscript",
        help=f"comma-separated from {','.join(FORMATS)}; the first is loaded "
        "unless another is asked for",
    )
    p.add_argument(
        "--sample",
        type=cli.location,
        help="images or Parquet shards to check parity on and calibrate int8 with "
        "(default: the run's val split; with --model, photos shipped in scikit-image and "
        "scikit-learn)",
    )
    p.add_argument(
        "--min-int8-agreement",
        type=cli.unit_interval,
        default=INT8_MIN_AGREEMENT,
        help="top-1 agreement of int8 with fp32 required",
    )
    p.add_argument(
        "--output", type=cli.location, required=True, help="artifact folder or s3:// prefix (ART)"
    )
    return p


def summary_lines(meta: dict[str, Any], output: str) -> list[str]:
    lines = [
        f"exported {meta['arch']} ({meta['num_classes']} classes) to {output}: "
        f"{', '.join(meta['files'])} (default {meta['format']})",
        f"parity checked on {meta['parity']['sample']}",
    ]
    for fmt in meta["files"]:
        report = meta["parity"][fmt]
        line = (
            f"  {fmt:<12} max |logit diff| {report['max_abs_logit_diff']:.1e}, "
            f"top-1 agreement {report['top1_agreement']:.1%}"
        )
        if "accuracy_drop" in report:
            line += f", accuracy {report['accuracy_int8']:.1%} (fp32 {report['accuracy_fp32']:.1%})"
        lines.append(f"{line}; sha256 {meta['file_sha256'][fmt][:12]}")
    return lines


def main() -> None:
    args = build_parser().parse_args()
    formats = parse_formats(args.format)
    if bool(args.run) == bool(args.model):
        raise UsageError("give either --run RUN, or --model NAME --pretrained PATH --classes FILE")
    if args.sample:
        from clf.artifact.sample import check_sample_uri

        check_sample_uri(args.sample)
    elif args.model and "int8" in formats:
        raise UsageError("--format int8 needs --sample: images from your domain to calibrate on")
    if args.run:
        from clf.training.trainer import export_run

        output = export_run(
            args.run,
            output=args.output,
            formats=formats,
            sample=args.sample,
            min_int8_agreement=args.min_int8_agreement,
        )
        meta = read_meta(output)
    else:
        if not args.pretrained or not args.classes:
            raise UsageError("--model needs --pretrained PATH_OR_URI and --classes FILE|imagenet")
        if args.model.startswith(clip.PREFIX):
            clip.arch_of(args.model)
        else:
            models.check_model_name(args.model)
        from clf.artifact.export import from_pretrained

        meta = from_pretrained(
            args.model,
            args.pretrained,
            args.classes,
            args.output,
            formats,
            sample=args.sample,
            min_int8_agreement=args.min_int8_agreement,
            prompts=args.prompts,
        )
    cli.emit(
        {
            "output": args.output,
            **{k: meta[k] for k in ("format", "files", "arch", "num_classes", "sha256")},
            "parity": meta["parity"][meta["format"]]["max_abs_logit_diff"],
            "parity_report": meta["parity"],
        },
        summary_lines(meta, args.output),
        args.json,
    )


if __name__ == "__main__":
    cli.run("export", main)
