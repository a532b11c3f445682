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
from conftest import CIFAR, HYMENOPTERA, IMAGENET_SAMPLES, ROOT, job_json, run_job, upload
from faultproxy import FaultProxy

from clf import storage
from clf.errors import StorageError, TransientStorageError
from clf.label.output import read_rows

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
# Reading many objects


@pytest.fixture
def objects(bucket) -> list[tuple[str, bytes]]:
    written = [(f"{bucket}/many/{i:02d}.bin", os.urandom(1000 + i)) for i in range(24)]
    for uri, data in written:
        storage.write_bytes(uri, data)
    return written


def proxy_for(s3_endpoint, monkeypatch, **settings) -> FaultProxy:
    proxy = FaultProxy(s3_endpoint, **{"rate": 0, **settings}).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    return proxy


def test_reading_an_object_is_one_get_and_never_a_head(objects, s3_endpoint, monkeypatch):
    proxy = proxy_for(s3_endpoint, monkeypatch)
    try:
        for uri, data in objects[:5]:
            assert storage.read_bytes(uri) == data
    finally:
        proxy.stop()
    assert proxy.calls == {"GetObject": 5}


def test_many_reads_overlap_up_to_the_concurrency_and_come_back_in_order(
    objects, s3_endpoint, monkeypatch
):
    proxy = proxy_for(s3_endpoint, monkeypatch, delay_s=0.05)  # a real store's round trip
    try:
        reads = [read.result() for read in storage.read_many([u for u, _ in objects], 6)]
    finally:
        proxy.stop()
    assert reads == [data for _, data in objects]
    assert 1 < proxy.most_in_flight <= 6
    assert proxy.calls == {"GetObject": len(objects)}


def test_a_throttled_read_is_retried_for_that_object_alone(objects, s3_endpoint, monkeypatch):
    proxy = proxy_for(s3_endpoint, monkeypatch, kinds=("slow_down",), fail_first=3)
    try:
        reads = [read.result() for read in storage.read_many([u for u, _ in objects[:5]], 1)]
    finally:
        proxy.stop()
    assert reads == [data for _, data in objects[:5]]
    assert proxy.counts["slow_down"] == 3 and proxy.calls == {"GetObject": 5 + 3}


@pytest.mark.parametrize("fault", ["truncate", "reset"])
def test_a_reply_cut_short_or_a_reset_connection_is_read_again(
    objects, s3_endpoint, monkeypatch, fault
):
    uri, data = objects[0]
    proxy = proxy_for(s3_endpoint, monkeypatch, kinds=(fault,), fail_first=2)
    try:
        assert storage.read_bytes(uri) == data
    finally:
        proxy.stop()
    assert proxy.counts[fault] == 2


def test_a_missing_object_fails_alone_at_once_and_the_others_are_read(
    objects, s3_endpoint, monkeypatch
):
    (first, one), (second, two) = objects[:2]
    missing = first.replace("many/", "many/gone-")
    proxy = proxy_for(s3_endpoint, monkeypatch)
    try:
        reads = list(storage.read_many([first, missing, second]))
        assert reads[0].result() == one and reads[2].result() == two
        with pytest.raises(StorageError, match=f"not found: {missing}") as raised:
            reads[1].result()
    finally:
        proxy.stop()
    assert not isinstance(raised.value, TransientStorageError)
    assert proxy.calls == {"GetObject": 3}  # never retried


def test_an_ingest_from_a_bucket_reads_each_image_once_with_reads_in_flight(
    bucket, s3_endpoint, monkeypatch, tmp_path
):
    import pyarrow.parquet as pq

    from clf.config import IngestConfig
    from clf.dataset.ingest import ingest

    keys = [
        f"{c}/{n}" for c in ("cat", "dog") for n in sorted(os.listdir(CIFAR / "train" / c))[:20]
    ]
    for key in keys:
        storage.write_bytes(f"{bucket}/tree/{key}", (CIFAR / "train" / key).read_bytes())
    proxy = proxy_for(s3_endpoint, monkeypatch, delay_s=0.02)
    try:
        summary = ingest(
            IngestConfig(src=f"{bucket}/tree", dst=str(tmp_path / "data"), read_concurrency=4)
        )
    finally:
        proxy.stop()
    assert sum(sum(c.values()) for c in summary.counts.values()) == 40 and not summary.rejected
    assert proxy.calls["GetObject"] == 40 and proxy.calls["HeadObject"] <= 1
    assert 1 < proxy.most_in_flight <= 4
    shards = [f for f in storage.list_files(str(tmp_path / "data")) if f.endswith(".parquet")]
    stored = pq.read_table(shards, columns=["key", "image"]).to_pydict()
    assert sorted(stored["key"]) == keys
    assert all(data == (CIFAR / "train" / k).read_bytes() for k, data in zip(*stored.values()))


def test_predict_reads_several_images_from_a_bucket_at_once(
    bucket, s3_endpoint, monkeypatch, tmp_path
):
    from test_labeling import export_small_cnn

    from clf.inference.in_process import predict

    art = export_small_cnn(tmp_path / "art")
    uris = []
    for name in sorted(os.listdir(IMAGENET_SAMPLES))[:6]:
        uris.append(f"{bucket}/photos/{name}")
        storage.write_bytes(uris[-1], (IMAGENET_SAMPLES / name).read_bytes())
    proxy = proxy_for(s3_endpoint, monkeypatch, delay_s=0.02)
    try:
        results = predict(art, uris, top_k=2)["results"]
    finally:
        proxy.stop()
    assert [r["image"] for r in results] == uris and all(r["error"] is None for r in results)
    assert proxy.calls == {"GetObject": 6} and proxy.most_in_flight > 1


def test_a_model_file_is_read_from_the_bucket_once_per_machine(
    bucket, s3_endpoint, monkeypatch, tmp_path
):
    """Every predictor actor a job starts on a node, and the next night's run, load the model
    from the node's copy; a copy that no longer matches the artifact's sha256 is read again."""

    import numpy as np
    from test_labeling import export_small_cnn

    from clf.artifact.classifier import load_classifier

    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "node-cache"))
    local = export_small_cnn(tmp_path / "art")
    art = f"{bucket}/models/small"
    upload(local, art)
    model_gets = []
    proxy = proxy_for(s3_endpoint, monkeypatch)
    proxy.before_forward = lambda method, path: (
        model_gets.append(path) if "model.ts" in path else None
    )
    pixels = np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    try:
        first = load_classifier(art, prefer_gpu=False).predict_proba(pixels)
        assert len(model_gets) == 1
        again = load_classifier(art, prefer_gpu=False).predict_proba(pixels)
        assert len(model_gets) == 1  # the copy, not the bucket
        (copy,) = [p for p in (tmp_path / "node-cache").iterdir()]
        copy.write_bytes(b"not the model")
        repaired = load_classifier(art, prefer_gpu=False).predict_proba(pixels)
        assert len(model_gets) == 2
    finally:
        proxy.stop()
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, repaired)
    assert copy.read_bytes() == Path(local, "model.ts").read_bytes()


def test_the_machine_keeps_copies_of_the_most_recently_used_models_only(
    objects, monkeypatch, tmp_path
):
    import hashlib

    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path))
    shas = [hashlib.sha256(data).hexdigest() for _, data in objects]
    for (uri, data), sha in zip(objects[:6], shas):
        assert storage.read_by_sha256(uri, sha) == data
    assert storage.read_by_sha256(objects[0][0], shas[1]) is None  # not the bytes it names
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(f"sha256-{sha}" for sha in shas[6 - storage.CACHED_BY_SHA256 : 6])


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
def test_an_image_deleted_after_the_listing_becomes_one_error_row(
    bucket, s3_endpoint, mobilenet_artifact, tmp_path
):
    import boto3

    names = sorted(os.listdir(IMAGENET_SAMPLES))[:12]
    for name in names:
        storage.write_bytes(f"{bucket}/images/{name}", (IMAGENET_SAMPLES / name).read_bytes())
    gone, name_of_bucket = names[5], bucket[len("s3://") :]
    store = boto3.client("s3", endpoint_url=s3_endpoint)

    def delete_before_its_first_read(method: str, path: str) -> None:
        if method == "GET" and path == f"/{name_of_bucket}/images/{gone}":
            store.delete_object(Bucket=name_of_bucket, Key=f"images/{gone}")

    proxy = FaultProxy(s3_endpoint, rate=0).start()
    proxy.before_forward = delete_before_its_first_read
    try:
        summary, _, _ = through(
            proxy,
            "jobs.label",
            "--model",
            mobilenet_artifact,
            "--input",
            f"{bucket}/images",
            "--output",
            str(tmp_path / "labels"),
        )
    finally:
        proxy.stop()
    rows = read_rows(str(tmp_path / "labels")).to_pylist()
    assert sorted(r["uri"] for r in rows) == [f"{bucket}/images/{n}" for n in names]
    errors = {r["uri"]: r["error"] for r in rows if r["error"]}
    assert errors == {f"{bucket}/images/{gone}": f"unreadable: not found: {bucket}/images/{gone}"}
    assert summary["labelled"] == 12 and summary["errors"] == {errors.popitem()[1]: 1}


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
