"""jobs.predict: the top-5 classes of one or more images, with probabilities."""

from __future__ import annotations

import json

from clf import cli, storage
from clf.artifact import read_meta
from clf.errors import UsageError


def build_parser():
    p = cli.parser("predict", __doc__)
    p.add_argument("--model", required=True, help="model artifact folder or URI (ART)")
    p.add_argument("--top-k", type=cli.positive_int, default=5)
    p.add_argument("images", nargs="+", help="image files or URIs")
    return p


def main() -> None:
    args = build_parser().parse_args()
    read_meta(args.model)
    for image in args.images:
        if not storage.exists(image):
            raise UsageError(f"{image}: no such file")
    from clf.predict import predict

    results = predict(args.model, args.images, args.top_k)
    if args.json:
        print(json.dumps(results))
        return
    for result in results:
        print(result["image"])
        if result["error"]:
            print(f"  error: {result['error']}")
        for rank, top in enumerate(result["top"], 1):
            print(f"  {rank}. {top['label']:<30} {top['probability']:.4f}")


if __name__ == "__main__":
    cli.run("predict", main)
