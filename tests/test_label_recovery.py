"""Exactly once: `jobs.label` killed at any moment, even inside an output commit, and re-run
with the same arguments ends with one row per input. `--skip-existing` adds only new inputs.

Each job runs in its own session; SIGKILL to its process group ends the driver and the
embedded Ray it started, the way a preempted node or an OOM kill would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
from conftest import IMAGENET_SAMPLES, ROOT

from clf.artifact.export import export_artifact
from clf.config import IngestConfig
from clf.dataset.ingest import ingest
from clf.dataset.label_rows import TEMP_FILE
from clf.images.preprocess import Preprocess
from clf.label.inputs import list_inputs
from clf.label.output import read_rows
from clf.label.sink import LABEL_SCHEMA, AtomicParquetSink
from clf.models import create_model

pytestmark = pytest.mark.slow

ARCHIVE_SIZE = 300


# Both ways a job labels: a few hundred inputs in its own process (the default for so few), and
# the Ray pipeline, which bigger inputs take.
PATHS = {"in-process": [], "ray": ["--small-input", "0"]}


def label_command(model: str, src: str, out: str, path: str, *extra: str) -> list[str]:
    # Files of at least 8 rows (512 by default): the output arrives as a part file per decode
    # output's 32 rows (or per 8 rows in process), so a kill lands mid-way.
    job = ["jobs.label", "--model", model, "--input", src, "--output", out, *PATHS[path]]
    small = ["--batch-size", "8", "--rows-per-file", "8"]
    return [sys.executable, "-m", *job, *small, "--json", *extra]


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, embedded Ray included
        env={**os.environ, **(env or {})},
    )


def finish(job: subprocess.Popen) -> dict:
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def kill(job: subprocess.Popen) -> None:
    """SIGKILL the job's process group (driver, GCS, raylet), then any Ray worker of its
    session that is still up (workers have process groups of their own)."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.communicate(timeout=60)
    reap_session(job.pid)


def reap_session(session: int) -> None:
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                process.kill()
        except (ProcessLookupError, psutil.Error):
            continue


def parts(out: str) -> list[str]:
    return (
        sorted(f for f in os.listdir(out) if f.endswith(".parquet")) if os.path.isdir(out) else []
    )


def temp_files(out: str) -> list[str]:
    return [f for f in os.listdir(out) if TEMP_FILE.search(f)]


def assert_exactly_once(src: str, out: str) -> list[str]:
    uris = read_rows(out, ["uri"]).column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "duplicate uri"
    assert sorted(uris) == sorted(list_inputs(src).uris)
    return uris


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("archive")
    for name in sorted(os.listdir(IMAGENET_SAMPLES))[:ARCHIVE_SIZE]:
        (root / name).write_bytes((IMAGENET_SAMPLES / name).read_bytes())
    return str(root)


@pytest.mark.parametrize("path", PATHS)
def test_killed_at_a_random_point_then_rerun_labels_every_input_once(
    path, archive, mobilenet_artifact, tmp_path
):
    out = str(tmp_path / "labels")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    commits_before_kill = rng.randint(1, 5)  # of about 10: a part holds a decode output's 32
    print(f"\nseed {seed}: kill after {commits_before_kill} committed part files")

    job = start(label_command(mobilenet_artifact, archive, out, path))
    try:
        deadline = time.monotonic() + 300
        while len(parts(out)) < commits_before_kill:
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no output committed"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # anywhere between two commits, or inside one
        assert job.poll() is None, "the job finished before the kill"
    finally:
        kill(job)
    done = read_rows(out, ["uri"]).num_rows
    print(f"killed with {done} of {ARCHIVE_SIZE} rows committed; temp files {temp_files(out)}")
    assert 0 < done < ARCHIVE_SIZE

    summary = finish(start(label_command(mobilenet_artifact, archive, out, path)))
    assert summary["already_labelled"] == done
    assert summary["labelled"] == ARCHIVE_SIZE - done
    assert len(assert_exactly_once(archive, out)) == ARCHIVE_SIZE
    assert temp_files(out) == []


# Test-side only: Ray workers import sitecustomize from PYTHONPATH, so this os.replace stands in
# for the kernel's and kills the whole job between an output file's write and its rename, once
# a given number of part files are committed. Ray workers sit in process groups of their own
# inside the job's session, whose leader is the driver.
KILL_IN_COMMIT = textwrap.dedent(
    """
    import os, signal

    _replace = os.replace
    _out = os.environ["KILL_IN_COMMIT_OUTPUT"]
    _after = int(os.environ["KILL_IN_COMMIT_AFTER"])

    def replace(src, dst, *args, **kwargs):
        dst = os.fspath(dst)
        if os.path.dirname(dst) == _out and os.path.basename(dst).startswith("part-"):
            if sum(f.endswith(".parquet") for f in os.listdir(_out)) >= _after:
                assert os.path.exists(src)  # written and synced, not yet renamed
                os.killpg(os.getsid(0), signal.SIGKILL)  # the driver, GCS and raylet
                os.killpg(os.getpgrp(), signal.SIGKILL)  # this worker: it never renames
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace
    """
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """200 real photos in two class folders, ingested as 10 shards of 20."""
    src, dst = tmp_path_factory.mktemp("tree"), str(tmp_path_factory.mktemp("shards"))
    for i, name in enumerate(sorted(os.listdir(IMAGENET_SAMPLES))[:200]):
        (src / f"class{i % 2}").mkdir(exist_ok=True)
        os.symlink(IMAGENET_SAMPLES / name, src / f"class{i % 2}" / name)
    ingest(IngestConfig(src=str(src), dst=dst, shard_size=20))
    return dst


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory) -> str:
    """A small untrained CNN: where speed does not matter, only rows do."""
    out = str(tmp_path_factory.mktemp("small-artifact"))
    net = create_model("small_cnn", 3).eval()
    spec = Preprocess(input_size=64, resize=72)
    export_artifact(net, out, arch="small_cnn", classes=["a", "b", "c"], preprocess=spec)
    return out


@pytest.mark.parametrize("path", PATHS)
def test_killed_inside_an_output_commit_then_rerun_labels_every_shard_row_once(
    path, shards, small_artifact, tmp_path
):
    out = str(tmp_path / "labels")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_COMMIT)
    inputs = list_inputs(shards)
    shard_uris = sorted({u.split("#")[0] for u in inputs.uris})
    assert inputs.kind == "shards" and len(shard_uris) == 10
    # An earlier run committed half of the first shard: the rest of it must be read, filtered.
    seeded = [u for u in inputs.uris if u.startswith(shard_uris[0] + "#")][:10]
    rows = {f.name: [None] * len(seeded) for f in LABEL_SCHEMA}
    rows |= {"uri": seeded, "model": ["seed"] * 10, "error": ["seeded by the test"] * 10}
    AtomicParquetSink(out).write([pa.table(rows, schema=LABEL_SCHEMA)], None)
    assert len(parts(out)) == 1
    env = {
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "KILL_IN_COMMIT_OUTPUT": out,
        "KILL_IN_COMMIT_AFTER": "4",
        # Ray packs Parquet files into read tasks of up to 128 MiB, about one 1,000-image shard
        # of photos; these 20-image shards need a smaller bin to be read one at a time too.
        "RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(1 << 20),
    }
    killed = start(label_command(small_artifact, shards, out, path), env)
    _, err = killed.communicate(timeout=600)
    reap_session(killed.pid)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert len(parts(out)) >= 4  # another writer may have got its rename in first
    left = temp_files(out)
    assert left, "killed inside a commit: its temp file is still there"
    done = read_rows(out, ["uri"]).num_rows  # the temp file is not output
    print(f"\nkilled inside a commit with {done} of {len(inputs.uris)} rows; left {left}")
    assert 0 < done < len(inputs.uris)

    summary = finish(start(label_command(small_artifact, shards, out, path)))
    assert summary["already_labelled"] == done
    assert summary["labelled"] == len(inputs.uris) - done
    assert_exactly_once(shards, out)
    assert temp_files(out) == []
    kept = read_rows(out, ["uri", "error"]).to_pylist()
    assert sorted(r["uri"] for r in kept if r["error"] == "seeded by the test") == sorted(seeded)


@pytest.mark.parametrize("path", PATHS)
def test_skip_existing_labels_only_the_new_files(path, small_artifact, tmp_path):
    src, out = tmp_path / "nightly", str(tmp_path / "labels")
    src.mkdir()
    names = sorted(os.listdir(IMAGENET_SAMPLES))
    for name in names[:40]:
        os.symlink(IMAGENET_SAMPLES / name, src / name)
    first = finish(start(label_command(small_artifact, str(src), out, path)))
    assert first["labelled"] == 40

    for i, name in enumerate(names[500:600]):  # tonight's uploads: real photos, new names
        (src / f"upload-{i:03d}.jpg").write_bytes((IMAGENET_SAMPLES / name).read_bytes())
    before = {Path(p).name for p in parts(out)}
    second = finish(start(label_command(small_artifact, str(src), out, path, "--skip-existing")))

    assert second["labelled"] == 100 and second["already_labelled"] == 40
    uris = assert_exactly_once(str(src), out)
    assert len(uris) == 140
    new_rows = [r for p in set(parts(out)) - before for r in read_rows_of(os.path.join(out, p))]
    assert sorted(os.path.basename(u) for u in new_rows) == sorted(
        f"upload-{i:03d}.jpg" for i in range(100)
    )


def read_rows_of(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["uri"]).column("uri").to_pylist()
