"""jobs.predict: the top-5 classes of one or more images, with probabilities."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clf import cli, storage
from clf.artifact.meta import FORMATS, check_format_in, read_meta
from clf.errors import ClfError, UsageError


def build_parser():
    p = cli.parser("predict", __doc__)
    p.add_argument(
        "--model", type=cli.location, required=True, help="model artifact folder or URI (ART)"
    )
    p.add_argument("--top-k", type=cli.positive_int, default=5, help="classes to show (default 5)")
    p.add_argument(
        "--format", choices=FORMATS, help="which of the artifact's files to run (default: its own)"
    )
    p.add_argument("images", type=cli.location, nargs="+", help="image files or URIs")
    return p


def summary_lines(output: dict[str, Any]) -> list[str]:
    lines = []
    for result in output["results"]:
        lines.append(result["image"])
        if result["error"]:
            lines.append(f"  error: {result['error']}")
        width = max((len(top["label"]) for top in result["top"]), default=0)
        for rank, top in enumerate(result["top"], 1):
            lines.append(f"  {rank}. {top['label']:<{width}}  {top['probability']:7.2%}")
    return lines


def main() -> None:
    args = build_parser().parse_args()
    check_format_in(read_meta(args.model), args.model, args.format)
    with ThreadPoolExecutor(storage.DEFAULT_READ_CONCURRENCY) as pool:  # one round trip for all
        regular = list(pool.map(storage.is_file, args.images))
    for image, is_file in zip(args.images, regular):
        if not is_file:
            what = "a folder, not an image file" if storage.exists(image) else "no such file"
            raise UsageError(f"{image}: {what}")
    from clf.inference.in_process import predict

    output = predict(args.model, args.images, args.top_k, args.format)
    cli.emit(output, summary_lines(output), args.json)
    failed = sum(result["error"] is not None for result in output["results"])
    if failed:  # printed above; the exit status tells a script
        raise ClfError(f"{failed} of {len(args.images)} images could not be classified")


if __name__ == "__main__":
    cli.run("predict", main)
