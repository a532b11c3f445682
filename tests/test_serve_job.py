"""``python -m jobs.serve`` as users run it: its checks before Ray, readiness only once the model
is loaded, and Ctrl-C that lets the requests in flight finish."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import IMAGENET_SAMPLES, ROOT, free_port, run_in_process
from faultproxy import FaultProxy

pytestmark = pytest.mark.slow

TENCH = (IMAGENET_SAMPLES / "n01440764_tench.JPEG").read_bytes()


def test_a_port_in_use_is_refused_before_ray_starts(mobilenet_artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run_in_process("jobs.serve", "--model", mobilenet_artifact, "--port", port)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"jobs.serve: error: --host 127.0.0.1 --port {port}: the address is in use"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--host", "no-such-host.invalid"],
            "--host no-such-host.invalid: not an address of this machine",
        ),
        (["--format", "int8"], "--format int8: "),
    ],
)
def test_a_flag_that_does_not_fit_the_machine_or_model_is_refused_before_ray_starts(
    mobilenet_artifact, flags, message
):
    done = run_in_process("jobs.serve", "--model", mobilenet_artifact, *flags)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.fixture(scope="module")
def served_from_a_slow_bucket(mobilenet_artifact, s3_endpoint, tmp_path_factory):
    """jobs.serve, started as a terminal would, whose model file is held back at the bucket
    until the test opens ``gate``: the replica is up, its model not yet loaded."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="clf-serve-model")
    for path in Path(mobilenet_artifact).iterdir():
        boto3.client("s3").upload_file(str(path), "clf-serve-model", f"art/{path.name}")
    gate = threading.Event()
    proxy = FaultProxy(s3_endpoint, rate=0.0)
    proxy.before_forward = lambda method, path: path.endswith("model.onnx") and gate.wait(120)
    proxy.start()
    port = free_port()
    args = ["--model", "s3://clf-serve-model/art", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "jobs.serve", *args, "--batch-wait-ms", "2000"],
        cwd=ROOT,
        # An empty machine cache: the model must come from the bucket, through the gate.
        env={
            **os.environ,
            "AWS_ENDPOINT_URL": proxy.url,
            "CLF_CACHE_DIR": str(tmp_path_factory.mktemp("serve-cache")),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, which Ctrl-C signals as a whole
    )
    yield server, f"http://127.0.0.1:{port}", gate
    gate.set()
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    proxy.stop()


def wait_for(url: str, server: subprocess.Popen, status: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            if requests.get(url, timeout=5).status_code == status:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered {status}")


def test_readyz_is_503_until_the_model_is_loaded_and_warmed_up(served_from_a_slow_bucket):
    server, url, gate = served_from_a_slow_bucket
    wait_for(f"{url}/healthz", server, 200)  # the replica is up, its model held at the bucket
    answer = requests.get(f"{url}/readyz", timeout=10)
    assert answer.status_code == 503
    assert answer.json() == {"ready": False, "error": "loading the model and warming it up"}
    gate.set()
    wait_for(f"{url}/readyz", server, 200, timeout_s=120)
    assert requests.get(f"{url}/readyz", timeout=10).json() == {"ready": True, "error": None}


def test_ctrl_c_lets_the_requests_in_flight_finish(served_from_a_slow_bucket):
    server, url, gate = served_from_a_slow_bucket
    gate.set()
    wait_for(f"{url}/readyz", server, 200)
    post = lambda _: requests.post(  # noqa: E731
        f"{url}/predict", data=TENCH, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(post, i) for i in range(4)]
        time.sleep(0.5)  # the four now wait for their batch to fill (--batch-wait-ms 2000)
        os.killpg(server.pid, signal.SIGINT)
        answers = [a.result() for a in answers]
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.json()["top"][0]["label"] for a in answers} == {"tench"}
    output, _ = server.communicate(timeout=120)
    assert server.returncode == 0, output
    assert "stopping: finishing the requests in flight" in output
    assert output.strip().endswith("stopped serving s3://clf-serve-model/art")
