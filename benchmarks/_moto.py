"""A moto S3 server on loopback for the benchmarks, filled straight into its store.

Uploading 200,000 keys one PUT at a time takes longer than the listing they are meant to
measure, so this process starts moto's server and puts objects into its backend directly:

    python -m benchmarks._moto --port P [--files BUCKET/PREFIX=LISTFILE] [--keys BUCKET/PREFIX=N]

``LISTFILE`` holds one local path per line; each becomes ``PREFIX/<index>_<name>``. ``--keys``
adds N one-byte objects spread over 100 sub-prefixes. It prints ``ready`` once filled.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "benchmark",
    "AWS_SECRET_ACCESS_KEY": "benchmark",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def object_key(prefix: str, index: int, path: str) -> str:
    return f"{prefix}/{index:06d}_{os.path.basename(path)}"


def _fill(backend, spec: str, paths: list[str] | None, count: int = 0) -> None:
    bucket, prefix = spec.split("/", 1)
    if bucket not in backend.buckets:
        backend.create_bucket(bucket, "us-east-1")
    for i, path in enumerate(paths or []):
        with open(path, "rb") as f:
            backend.put_object(bucket, object_key(prefix, i, path), f.read())
    for i in range(count):
        backend.put_object(bucket, f"{prefix}/{i % 100:02d}/{i:07d}.jpg", b"x")


def serve() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--files", action="append", default=[])
    p.add_argument("--keys", action="append", default=[])
    args = p.parse_args()
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for spec in args.files:
        target, listfile = spec.split("=", 1)
        with open(listfile) as f:
            _fill(backend, target, f.read().split("\n"))
    for spec in args.keys:
        target, count = spec.split("=", 1)
        _fill(backend, target, None, int(count))
    print("ready", flush=True)
    threading.Event().wait()  # until the benchmark terminates this process


@dataclass
class MotoServer:
    url: str
    pid: int


@contextmanager
def moto_server(port: int, files: dict[str, list[str]] = {}, keys: dict[str, int] = {}):  # noqa: B006
    """A filled moto server on ``http://127.0.0.1:port`` for the block's duration."""
    import tempfile

    args = ["--port", str(port)]
    with tempfile.TemporaryDirectory() as scratch:
        for i, (target, paths) in enumerate(files.items()):
            listfile = os.path.join(scratch, f"files-{i}.txt")
            with open(listfile, "w") as f:
                f.write("\n".join(paths))
            args += ["--files", f"{target}={listfile}"]
        for target, count in keys.items():
            args += ["--keys", f"{target}={count}"]
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._moto", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            if process.stdout.readline().strip() != "ready":
                raise SystemExit("the moto server did not start")
            yield MotoServer(f"http://127.0.0.1:{port}", process.pid)
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    serve()
