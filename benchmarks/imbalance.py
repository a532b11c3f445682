"""Class imbalance: do balanced loss weights or a balanced sampler raise macro-F1?

Builds a 10:1 imbalanced CIFAR-10 train set (five classes keep 500 images, five keep 50; links,
not copies), keeps the balanced test split, and trains the small CNN three ways with the same
seed and epochs: plain, ``--class-weights balanced`` and ``--sampler balanced``. Each is scored
on the test split by jobs.evaluate.

    python -m benchmarks.imbalance [--epochs 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time

from benchmarks._jobs import SHARED, job

RECIPE = ["--model", "small_cnn", "--input-size", "32", "--lr", "0.003", "--batch-size", "32",
          "--set", "augment.scale_min=0.5", "--seed", "0"]  # fmt: skip
VARIANTS = {
    "plain": [],
    "class weights": ["--class-weights", "balanced"],
    "balanced sampler": ["--sampler", "balanced"],
}


def imbalanced_tree(root: str, major: int = 500, minor: int = 50) -> str:
    source = SHARED / "cifar10-small"
    classes = sorted(os.listdir(source / "train"))
    for i, name in enumerate(classes):
        keep = major if i % 2 == 0 else minor
        for split, files in (
            ("train", sorted(os.listdir(source / "train" / name))[:keep]),
            ("test", sorted(os.listdir(source / "test" / name))),
        ):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for f in files:
                link = os.path.join(root, split, name, f)
                if not os.path.lexists(link):
                    os.symlink(source / split / name / f, link)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--work", default=tempfile.mkdtemp(prefix="clf-imbalance-"))
    args = p.parse_args()
    tree = imbalanced_tree(os.path.join(args.work, "tree"))
    data = os.path.join(args.work, "data")
    ingested = job("jobs.ingest", "--src", tree, "--dst", data)
    print(f"imbalance: train counts {ingested['counts']['train']}; {time.strftime('%Y-%m-%d')}")
    scores = {}
    for name, flags in VARIANTS.items():
        run = os.path.join(args.work, name.replace(" ", "-"))
        trained = job("jobs.train", "--data", data, "--output", run, "--workers", "2",
                      "--epochs", str(args.epochs), *RECIPE, *flags)  # fmt: skip
        out = os.path.join(run, "test-report")
        job("jobs.evaluate", "--model", trained["model"], "--data", os.path.join(data, "test"),
            "--output", out)  # fmt: skip
        report = json.load(open(os.path.join(out, "report.json")))["metrics"]
        with open(os.path.join(out, "per_class.csv")) as f:
            recall = {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}
        minority = [recall[c] for c, n in ingested["counts"]["train"].items() if n < 100]
        scores[name] = report["f1_macro"]
        print(
            f"{name:<17} test top-1 {report['top1']:.3f}  macro-F1 {report['f1_macro']:.3f}  "
            f"minority-class recall {sum(minority) / len(minority):.3f}",
            flush=True,
        )
    for name in ("class weights", "balanced sampler"):
        print(f"{name}: macro-F1 {scores[name] / scores['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
