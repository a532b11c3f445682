"""A real ``ray job submit``, the way README.md and cluster/README.md tell users to run jobs.

A head started by ``cluster/local-head.sh start`` (token auth, loopback, its own temp dir and a
temporary HOME, so the user's ~/.ray is never touched) takes ``jobs.label`` with the repository
as working_dir. The test checks the job's status and output, then stops exactly the processes
of the head it started: ``ray stop`` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import IMAGENET_SAMPLES, ROOT, free_port

from clf.label.output import read_rows

pytestmark = pytest.mark.slow

MARKER = "CLF_TEST_RAY_HEAD"  # in the environment of every process of the head under test
VENV_BIN = os.path.dirname(sys.executable)


def head_processes(marker: str) -> list[int]:
    """Every live process that inherited our marker: raylet, GCS, dashboard, workers, drivers."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def stop_head(marker: str, grace_s: float = 3) -> None:
    """SIGTERM each process of this head by id, then SIGKILL whatever is left after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        for pid in head_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while head_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.5)


@dataclass
class Head:
    url: str
    env: dict[str, str]
    temp_dir: str
    home: Path


@pytest.fixture
def ray_head(tmp_path):
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    assert missing is None, (
        f"`ray job submit` needs ray[default], the dashboard's job server ({missing}); "
        "without it the head serves no HTTP API"
    )
    # Short: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="clf-ray-", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    marker = uuid.uuid4().hex
    dashboard = free_port()
    env = {
        **os.environ,
        "HOME": str(home),  # the head's token goes to HOME/.ray/auth_token
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(dashboard),
        MARKER: marker,
    }
    env.pop("RAY_ADDRESS", None)
    try:
        started = subprocess.run(
            [
                str(ROOT / "cluster" / "local-head.sh"),
                "start",
                "--num-cpus",
                "2",
                "--temp-dir",
                temp_dir,
                # Defaults to a fixed port (52365), which another Ray here may hold.
                "--dashboard-agent-listen-port",
                str(free_port()),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield Head(f"http://127.0.0.1:{dashboard}", env, temp_dir, home)
    finally:
        stop_head(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not head_processes(marker), "processes of the test's Ray head are still running"


def ray_cli(head: Head, *args: str, token: bool = True, timeout: int = 120):
    env = dict(head.env)
    if token:
        env["RAY_AUTH_MODE"] = "token"
    else:
        env.pop("RAY_AUTH_MODE", None)
    return subprocess.run(
        ["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_status(head: Head, submission: str) -> str:
    """The job's final status from Ray, not from the CLI's exit code (0 for a stopped job too)."""
    script = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, head.url, submission],
        env={**head.env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_submitted_label_job_succeeds_on_a_token_auth_head(ray_head, mobilenet_artifact, tmp_path):
    head = ray_head
    assert (head.home / ".ray" / "auth_token").stat().st_size > 0
    refused = ray_cli(head, "job", "list", "--address", head.url, token=False)
    assert refused.returncode != 0  # no token, no access

    art, images, out = mobilenet_artifact, tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    names = sorted(os.listdir(IMAGENET_SAMPLES))[::50]  # 20 photos
    for name in names:
        shutil.copy(IMAGENET_SAMPLES / name, images / name)
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("not a photo\n")

    runtime_env = runtime_env_file(tmp_path)
    submission = f"label-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    submitted = ray_cli(
        head,
        "job",
        "submit",
        "--address",
        head.url,
        "--submission-id",
        submission,
        "--working-dir",
        ".",
        "--runtime-env",
        runtime_env,
        "--",
        "python",
        "-m",
        "jobs.label",
        "--model",
        str(art),
        "--input",
        str(images),
        "--output",
        str(out),
        "--json",
        timeout=900,
    )
    print(f"ray job submit: {time.monotonic() - started:.1f}s")
    logs = submitted.stdout + submitted.stderr
    assert job_status(head, submission) == "SUCCEEDED", logs[-4000:]
    assert submitted.returncode == 0, logs[-4000:]

    summary = json.loads(next(line for line in logs.splitlines()[::-1] if line.startswith("{")))
    assert summary["labelled"] == 22 and summary["output"] == str(out)
    rows = read_rows(str(out)).to_pylist()
    assert sorted(os.path.basename(r["uri"]) for r in rows) == sorted(
        [*names, "empty.jpg", "notes.jpg"]
    )
    errors = {os.path.basename(r["uri"]) for r in rows if r["error"]}
    assert errors == {"empty.jpg", "notes.jpg"}

    # The working_dir upload: our code, none of the local bulk (.venv, .git, demo outputs).
    unpacked = Path(head.temp_dir, "session_latest", "runtime_resources", "working_dir_files")
    uploaded = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    assert len(uploaded) == 1, uploaded
    top = {p.name for p in uploaded[0].iterdir()}
    assert {"clf", "jobs", "cluster", "pyproject.toml"} <= top, top
    assert not top & {".venv", ".git", "demo-out", ".pytest_cache"}, top
    size = sum(p.stat().st_size for p in uploaded[0].rglob("*") if p.is_file())
    print(f"working_dir upload: {size / 1e6:.1f} MB, {len(top)} top-level entries")
    assert size < 20e6


def runtime_env_file(tmp_path) -> str:
    """cluster/runtime_env.yaml without its ``pip`` list: everything is installed here already,
    and on a head that runs from a virtualenv Ray would copy that whole virtualenv (gigabytes)
    into each job's environment before running pip in it."""
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert runtime_env.pop("pip") and runtime_env["working_dir"] == "."
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(runtime_env))
    return str(path)
