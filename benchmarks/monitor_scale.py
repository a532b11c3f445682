"""jobs.monitor over a big night: wall time and peak memory at 1,000,000 label rows.

Writes --rows synthetic label rows (100 classes, top-5, 0.5% error rows; the uris cycle over
the CIFAR train photos) in files of 512 rows,
as jobs.label commits them, and a 2,000-row reference, as an artifact records one. Then, each in
a fresh process: the baseline, pyarrow reading the columns monitoring needs and nothing else;
and `python -m jobs.monitor` with a review queue of 100. Peak memory is each process's maximum
resident set size, from wait4.

    python -m benchmarks.monitor_scale [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from benchmarks._jobs import ROOT, SHARED, scratch_dir
from clf.dataset.label_rows import label_table, new_run_id, record_run

CLASSES = np.array([f"class{i:03d}" for i in range(100)], dtype=object)
ROWS_PER_FILE = 512  # jobs.label's default
# Real photos behind the rows, for the review queue's contact sheet; each stands for many rows.
PHOTOS = sorted(str(p) for p in (SHARED / "cifar10-small" / "train").glob("*/*.jpg"))
BASELINE = """
import sys, pyarrow.parquet as pq
table = pq.read_table(sys.argv[1], columns=["label", "topk_scores", "error", "uri"])
print(table.num_rows)
"""


def write_night(output: str, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(output)
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        logits = rng.normal(size=(n, len(CLASSES))) * 3
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        indices = np.argsort(-probs, axis=1)[:, :5]
        scores = np.take_along_axis(probs, indices, axis=1).astype(np.float32)
        ok = rng.random(n) > 0.005
        uris = [PHOTOS[(start + i) % len(PHOTOS)] for i in range(n)]
        errors = ["" if good else "corrupt JPEG" for good in ok]
        table = label_table(uris, ok, scores, indices, errors, CLASSES, "0123456789ab")
        pq.write_table(table, os.path.join(output, f"part-{start:09d}.parquet"))
    record_run(output, new_run_id(), {"model": "0123456789ab"})


def measure(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one fresh process."""
    started = time.monotonic()
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return time.monotonic() - started, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    work = scratch_dir("clf-monitor-scale-")
    night, reference = os.path.join(work, "night"), os.path.join(work, "reference")
    started = time.monotonic()
    write_night(night, args.rows, seed=0)
    write_night(reference, 2000, seed=1)
    size = sum(os.path.getsize(os.path.join(night, f)) for f in os.listdir(night) if "." in f)
    print(
        f"{args.rows:,} label rows in {len(os.listdir(night)) - 1} files ({size / 2**20:.0f} MiB), "
        f"written in {time.monotonic() - started:.0f}s, {time.strftime('%Y-%m-%d')}"
    )
    base = measure([sys.executable, "-c", BASELINE, night])
    monitor = measure(
        [
            sys.executable, "-m", "jobs.monitor", "--labels", night, "--reference", reference,
            "--output", os.path.join(work, "monitor"), "--review", "100", "--stratify",
        ]
    )  # fmt: skip
    if monitor[2] not in (0, 3):
        raise SystemExit(f"jobs.monitor failed with exit code {monitor[2]}")
    print("| process | wall s | peak RSS MiB |")
    print("|---|---|---|")
    print(f"| pyarrow reads the columns (baseline) | {base[0]:.1f} | {base[1]:.0f} |")
    print(f"| jobs.monitor --review 100 --stratify | {monitor[0]:.1f} | {monitor[1]:.0f} |")
    print(
        f"jobs.monitor / baseline: {monitor[0] / base[0]:.2f}x wall, {monitor[1] / base[1]:.2f}x memory"
    )


if __name__ == "__main__":
    main()
