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

from clf.config import IngestConfig
from clf.dataset.ingest import ingest

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
        "96",  # epochs of a few seconds, so that a kill lands inside one
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


def test_a_killed_worker_is_replaced_then_a_killed_job_rerun_continues_where_it_stopped(
    shards, tmp_path
):
    # One run shows both, since each costs a full training start on two cores.
    run = str(tmp_path / "run")
    job = start(shards, run)
    try:
        wait_for_epochs(run, job, 1)  # epoch 0 is committed: the workers are in epoch 1
        workers = training_workers(job)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        workers[-1].kill()
        wait_for_epochs(run, job, 2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        job.wait()
    before = metric_lines(run)
    assert [line["epoch"] for line in before] == [0, 1]
    assert before[1]["start_epoch"] == 1  # the replaced worker resumed from epoch 0's checkpoint

    summary = finish(start(shards, run))

    after = metric_lines(run)[len(before) :]
    assert [(line["epoch"], line["start_epoch"]) for line in after] == [(2, 2)]
    assert summary["epochs_run"] == EPOCHS
    assert os.path.exists(os.path.join(run, "model", "meta.json"))
