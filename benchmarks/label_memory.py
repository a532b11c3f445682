"""Labelling memory: peak memory must not grow with the number of images, and nothing spills.

Labels --small and then --large images (the ImageNet samples, hard-linked under distinct names)
with the pretrained MobileNetV2, each in a fresh process that runs jobs.label's library call on
an embedded Ray. While it runs, the parent samples the proportional set size (PSS: shared pages,
such as the object store's, counted once) of the whole process tree. At the end the child reads
Ray's own object-spilling counters.

    python -m benchmarks.label_memory [--small 2000] [--large 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks._jobs import mobilenet_weights, scratch_dir
from benchmarks.label_throughput import corpus

ROOT = Path(__file__).resolve().parents[1]


def child(folder: str, work: str) -> None:
    """Runs in the measured process: export, then label on an embedded Ray, then spill stats."""
    from ray._private.internal_api import memory_summary

    from clf import runtime
    from clf.artifact.export import from_pretrained
    from clf.config import LabelConfig
    from clf.label.checks import check_label
    from clf.label.job import label

    art = os.path.join(work, "art")
    # ONNX: the CPU format, and the 20k run takes half as long as with TorchScript.
    from_pretrained("mobilenet_v2", mobilenet_weights(), "imagenet", art, ("onnx",))
    runtime.init_ray(streaming=True)  # as jobs.label does
    cfg = LabelConfig(model=art, input=folder, output=os.path.join(work, "out"))
    summary = label(cfg, check_label(cfg), progress=lambda line: print(line, flush=True))
    stats = memory_summary(stats_only=True)
    spilled = re.search(r"Spilled (\d+) MiB", stats)
    print(
        json.dumps(
            {
                "labelled": summary.labelled,
                "seconds": summary.seconds,
                "spilled_mib": int(spilled.group(1)) if spilled else 0,
                "stats": stats.strip().splitlines()[-3:],
            }
        )
    )


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(count: int) -> dict:
    folder = os.path.join(tempfile.gettempdir(), f"clf-memory-bench-{count}")
    corpus(folder, count)
    work = scratch_dir("clf-memory-")
    code = f"from benchmarks.label_memory import child; child({folder!r}, {work!r})"
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    peak, samples = 0, []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not stop.is_set():
            pss = tree_pss(root)
            peak = max(peak, pss)
            samples.append(pss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("[label]"):
            print("   ", line.rstrip(), flush=True)
    process.wait()
    stop.set()
    sampler.join()
    assert process.returncode == 0, "".join(lines[-20:])
    result = json.loads(lines[-1])
    result["peak_mib"] = peak / 2**20
    result["images"] = count
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    args = p.parse_args()
    print(f"label memory: MobileNetV2, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    results = []
    for count in (args.small, args.large):
        r = measure(count)
        results.append(r)
        print(
            f"{count:>6} images: peak PSS of the process tree {r['peak_mib']:.0f} MiB, "
            f"spilled {r['spilled_mib']} MiB, {r['labelled'] / r['seconds']:.1f} img/s",
            flush=True,
        )
    small, large = results
    ratio = large["peak_mib"] / small["peak_mib"]
    print(f"peak at {args.large} / peak at {args.small}: {ratio:.2f}x (goal <= 1.2x)")
    print(f"spilled: {small['spilled_mib'] + large['spilled_mib']} MiB (goal 0)")


if __name__ == "__main__":
    main()
