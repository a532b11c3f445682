"""Training survives failures: a killed worker is replaced, a killed job resumes when re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import HYMENOPTERA, ROOT

from clf.ingest import IngestConfig, ingest

pytestmark = pytest.mark.slow

EPOCHS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    dst = str(tmp_path_factory.mktemp("shards"))
    ingest(IngestConfig(src=str(HYMENOPTERA), dst=dst))
    return dst


def train_command(data: str, run: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.train",
        "--data",
        data,
        "--output",
        run,
        "--model",
        "small_cnn",
        "--input-size",
        "64",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--max-failures",
        "2",
        "--json",
    ]


def start(data: str, run: str) -> subprocess.Popen:
    # Its own session, so that killing the job also kills the embedded Ray it started.
    return subprocess.Popen(
        train_command(data, run),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def metric_lines(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def wait_for_epochs(run: str, job: subprocess.Popen, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(metric_lines(run)) < count:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.5)


def training_workers(job: subprocess.Popen) -> list[psutil.Process]:
    session = os.getsid(job.pid)
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(process.pid) == session and "RayTrainWorker" in " ".join(
                process.info["cmdline"] or []
            ):
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def finish(job: subprocess.Popen) -> dict:
    out, err = job.communicate(timeout=900)
    assert job.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_killed_worker_is_replaced_and_resumes_from_the_last_checkpoint(shards, tmp_path):
    run = str(tmp_path / "run")
    job = start(shards, run)
    try:
        wait_for_epochs(run, job, 1)
        time.sleep(2)  # into the second epoch
        workers = training_workers(job)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        workers[-1].kill()
        summary = finish(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)

    lines = metric_lines(run)
    assert summary["epochs_run"] == len(lines)
    assert [line["epoch"] for line in lines] == list(range(EPOCHS))
    resumed = [line for line in lines if line["start_epoch"] > 0]
    assert resumed and resumed[0]["start_epoch"] == 1  # from epoch 1's checkpoint, not from 0


def test_a_killed_job_rerun_with_the_same_output_continues_where_it_stopped(shards, tmp_path):
    run = str(tmp_path / "run")
    job = start(shards, run)
    try:
        wait_for_epochs(run, job, 1)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        job.wait()
    done_before = [line["epoch"] for line in metric_lines(run)]

    summary = finish(start(shards, run))

    lines = metric_lines(run)
    after = lines[len(done_before) :]
    assert after[0]["start_epoch"] == done_before[-1] + 1 > 0
    assert [line["epoch"] for line in after] == list(range(done_before[-1] + 1, EPOCHS))
    assert summary["epochs_run"] == len(lines)
    assert os.path.exists(os.path.join(run, "model", "meta.json"))
