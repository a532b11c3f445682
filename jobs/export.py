"""jobs.export: a self-describing model artifact from a run, or straight from pretrained weights."""

from __future__ import annotations

from clf import cli, models
from clf.artifact import FORMATS, check_formats, read_meta
from clf.errors import UsageError


def build_parser():
    p = cli.parser("export", __doc__)
    p.add_argument("--run", help="training run (RUN) whose best checkpoint to export")
    p.add_argument("--model", help="with --pretrained: architecture name")
    p.add_argument("--pretrained", help="with --model: state dict path or URI")
    p.add_argument(
        "--classes", help="with --model: classes file (.json or one per line) or 'imagenet'"
    )
    p.add_argument("--format", default="torchscript", help=f"comma-separated: {','.join(FORMATS)}")
    p.add_argument("--output", required=True, help="artifact folder or s3:// prefix (ART)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    check_formats(formats)
    if bool(args.run) == bool(args.model):
        raise UsageError("give either --run RUN, or --model NAME --pretrained PATH --classes FILE")
    if args.run:
        from clf.training import export_run

        meta = read_meta(export_run(args.run, output=args.output, formats=formats))
    else:
        if not args.pretrained or not args.classes:
            raise UsageError("--model needs --pretrained PATH_OR_URI and --classes FILE|imagenet")
        models.check_model_name(args.model)
        from clf.exporting import from_pretrained

        meta = from_pretrained(args.model, args.pretrained, args.classes, args.output, formats)
    parity = meta["parity"][meta["format"]]["max_abs_logit_diff"]
    lines = [
        f"exported {meta['arch']} ({meta['num_classes']} classes) as {meta['format']} to {args.output}",
        f"parity with eager: max |logit diff| {parity:.1e}; sha256 {meta['sha256'][:12]}",
    ]
    cli.emit(
        {
            "output": args.output,
            **{k: meta[k] for k in ("format", "arch", "num_classes", "sha256")},
            "parity": parity,
        },
        lines,
        args.json,
    )


if __name__ == "__main__":
    cli.run("export", main)
