"""Transfer learning versus training from scratch on CIFAR-10 JPEGs, at the same epoch budget.

Ingests ``cifar10-small`` (train/test; val is carved from train), then trains (1) the small CNN
from scratch at its native 32 px and (2) the pretrained MobileNetV2 fine-tuned at 64 px, both
with 2 Ray Train workers for the same number of epochs, and evaluates each on the test split.

    python -m benchmarks.transfer_vs_scratch [--epochs 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks._jobs import SHARED, job, mobilenet_weights

RECIPES = {
    "small_cnn from scratch (32 px)": [
        "--model", "small_cnn", "--input-size", "32", "--lr", "0.003", "--batch-size", "64",
        "--set", "augment.scale_min=0.5",
    ],
    "MobileNetV2 fine-tuned (64 px)": [
        "--model", "mobilenet_v2", "--pretrained", mobilenet_weights(), "--input-size", "64",
        "--lr", "0.001", "--batch-size", "64", "--set", "augment.scale_min=0.5",
    ],
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--work", default=tempfile.mkdtemp(prefix="clf-transfer-"))
    args = p.parse_args()
    data = os.path.join(args.work, "data")
    job("jobs.ingest", "--src", str(SHARED / "cifar10-small"), "--dst", data)
    print(f"transfer vs scratch: cifar10-small, {args.epochs} epochs, {time.strftime('%Y-%m-%d')}")
    for name, recipe in RECIPES.items():
        run = os.path.join(args.work, name.split()[0])
        started = time.monotonic()
        trained = job("jobs.train", "--data", data, "--output", run, "--workers", "2",
                      "--epochs", str(args.epochs), *recipe)  # fmt: skip
        out = os.path.join(run, "test-report")
        job("jobs.evaluate", "--model", trained["model"], "--data", os.path.join(data, "test"),
            "--output", out)  # fmt: skip
        report = json.load(open(os.path.join(out, "report.json")))["metrics"]
        print(
            f"{name}: best val {trained['best_val_acc']:.3f}, test top-1 {report['top1']:.3f}, "
            f"macro-F1 {report['f1_macro']:.3f} ({time.monotonic() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
