"""Transient S3 faults are retried by the client libraries' own settings; permanent ones are not.

A seeded proxy (tests/faultproxy.py) in front of the moto server answers some requests with
503 SlowDown, resets connections and cuts GET replies short. The label and training jobs run
through it and must still finish with every row exactly once.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import HYMENOPTERA, IMAGENET_SAMPLES, ROOT, job_json, run_job
from faultproxy import FaultProxy

from clf import storage
from clf.errors import StorageError
from clf.labeling import read_rows

# Each job starts a Ray of its own, even where another session's `ray start` head runs here.
JOB_ENV = {"RAY_ADDRESS": "local"}

READ_IN_A_FRESH_PROCESS = """
import pickle, sys
fs = pickle.loads(sys.stdin.buffer.read())
with fs.open_input_stream(sys.argv[1]) as f:
    f.read()
"""


def read_after_unpickling(fs: pafs.FileSystem, path: str) -> subprocess.CompletedProcess:
    """What a Ray worker does with ``storage_filesystem`` or ``read_parquet(filesystem=...)``."""
    return subprocess.run(
        [sys.executable, "-c", READ_IN_A_FRESH_PROCESS, path],
        input=pickle.dumps(fs),
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )


def test_retry_settings_survive_pickling_to_ray_workers(bucket, s3_endpoint):
    storage.write_bytes(f"{bucket}/x.bin", b"abc")
    path = f"{bucket[len('s3://') :]}/x.bin"

    # Four 503s in a row: more than pyarrow's default 3 attempts, fewer than ours.
    with_ours = FaultProxy(s3_endpoint, rate=0, kinds=("slow_down",), fail_first=4).start()
    try:
        done = read_after_unpickling(storage.S3FileSystem(with_ours.url), path)
    finally:
        with_ours.stop()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert with_ours.counts["slow_down"] == 4

    # The same settings on a plain pyarrow S3FileSystem are lost on the way.
    plain = FaultProxy(s3_endpoint, rate=0, kinds=("slow_down",), fail_first=4).start()
    try:
        fs = pafs.S3FileSystem(
            endpoint_override=plain.url,
            scheme="http",
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=storage.S3_RETRY_ATTEMPTS),
        )
        done = read_after_unpickling(fs, path)
    finally:
        plain.stop()
    assert done.returncode != 0 and b"503" in done.stderr


def test_storage_rides_out_heavy_faults(bucket, s3_endpoint, monkeypatch):
    """A fifth of all requests fail, well past the jobs' 5%: every write and read still lands."""
    proxy = FaultProxy(s3_endpoint, rate=0.2, seed=1).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        data = os.urandom(50_000)
        for i in range(40):
            storage.write_bytes(f"{bucket}/heavy/{i}.bin", data)
        assert len(storage.list_files(f"{bucket}/heavy")) == 40
        for i in range(40):
            assert storage.read_bytes(f"{bucket}/heavy/{i}.bin") == data
    finally:
        proxy.stop()
    print("faults:", dict(proxy.counts))
    assert proxy.counts["slow_down"] and proxy.counts["reset"] and proxy.counts["truncate"]


def test_throttled_small_reads_are_retried(bucket, s3_endpoint, monkeypatch):
    """A 503's XML body is larger than a 17-byte object: the SDK calls that INTERNAL_FAILURE."""
    storage.write_bytes(f"{bucket}/classes.json", b'["ants", "bees"]\n')
    proxy = FaultProxy(s3_endpoint, kinds=("slow_down",), fail_first=3, methods=("GET",)).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        assert storage.read_json(f"{bucket}/classes.json") == ["ants", "bees"]
    finally:
        proxy.stop()
    assert proxy.counts["slow_down"] == 3


def test_access_denied_is_not_retried(denying_s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", denying_s3_endpoint)
    for call, uri in (
        (storage.read_bytes, "s3://clf-any/x.bin"),
        (storage.exists, "s3://clf-any/x.bin"),
        (storage.list_files, "s3://clf-any/prefix"),
        (lambda uri: storage.write_bytes(uri, b"x"), "s3://clf-any/y.bin"),
    ):
        started = time.monotonic()
        with pytest.raises(StorageError) as raised:
            call(uri)
        message = str(raised.value)
        assert uri in message and "access denied" in message and "\n" not in message, message
        assert time.monotonic() - started < 5  # twelve attempts would take about 100 s


# ------------------------------------------------------------------------------------------
# Jobs through the faulty proxy


def through(proxy: FaultProxy, *args: str) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """Run a job with AWS_ENDPOINT_URL at the proxy; returns its summary and the faults it met."""
    before = dict(proxy.counts)
    done = run_job(*args, "--json", env={**JOB_ENV, "AWS_ENDPOINT_URL": proxy.url})
    met = {k: v - before.get(k, 0) for k, v in proxy.counts.items()}
    print(f"{args[0]}: {met}")
    return job_json(done), met, done


def faults(met: dict) -> int:
    return sum(n for kind, n in met.items() if kind != "requests")


@pytest.mark.slow
def test_label_job_through_faults_labels_every_image_exactly_once(
    bucket, fault_proxy, mobilenet_artifact, tmp_path
):
    names = sorted(os.listdir(IMAGENET_SAMPLES))[5::10]  # 100 photos
    for name in names:
        storage.write_bytes(f"{bucket}/images/{name}", (IMAGENET_SAMPLES / name).read_bytes())
    storage.write_bytes(f"{bucket}/images/empty.jpg", b"")
    storage.write_bytes(f"{bucket}/images/notes.jpg", b"not a photo\n")
    art = Path(mobilenet_artifact)
    for path in art.iterdir():  # the model is read through the proxy too
        storage.write_bytes(f"{bucket}/art/{path.name}", path.read_bytes())

    summary, met, _ = through(
        fault_proxy,
        "jobs.label",
        "--model",
        f"{bucket}/art",
        "--input",
        f"{bucket}/images",
        "--output",
        f"{bucket}/labels",
        "--batch-size",
        "16",
    )
    assert faults(met) >= 3, met
    rows = read_rows(f"{bucket}/labels").to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == 102
    assert set(uris) == {f"{bucket}/images/{n}" for n in [*names, "empty.jpg", "notes.jpg"]}
    # A fault that got through would have become an error row ("unreadable: ...").
    errors = {r["uri"].rsplit("/", 1)[1]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"empty.jpg", "notes.jpg"}, errors
    assert summary["labelled"] == 102


@pytest.mark.slow
def test_training_job_through_faults_completes_each_epoch_once(bucket, fault_proxy, tmp_path):
    """Ingest and a tiny 2-worker training run, shards and checkpoints all through the proxy."""
    src = tmp_path / "src"
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            os.makedirs(src / split / cls)
            for name in sorted(os.listdir(HYMENOPTERA / split / cls))[:40]:
                shutil.copy(HYMENOPTERA / split / cls / name, src / split / cls / name)

    ingested, met_ingest, _ = through(
        fault_proxy,
        "jobs.ingest",
        "--src",
        str(src),
        "--dst",
        f"{bucket}/data",
        "--shard-size",
        "20",
    )
    trained, met_train, done = through(
        fault_proxy,
        "jobs.train",
        "--data",
        f"{bucket}/data",
        "--model",
        "small_cnn",
        "--output",
        f"{bucket}/run",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--input-size",
        "32",
    )
    assert faults(met_train) >= 3, met_train  # and ingest meets a few too, by chance

    manifest = storage.read_json(f"{bucket}/data/manifest.json")
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == ingested["images"]
    lines = storage.read_bytes(f"{bucket}/run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]  # no epoch lost or repeated
    assert "resumed from the checkpoint" not in done.stdout + done.stderr  # no worker restarted
    assert trained["epochs_run"] == 1
    assert storage.exists(f"{bucket}/run/model/meta.json")
