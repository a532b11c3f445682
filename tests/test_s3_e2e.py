"""Every job on s3:// against a real S3 API (moto on loopback, reached via AWS_ENDPOINT_URL).

ingest -> train (2 workers, checkpoints in S3) -> export -> label an S3 prefix of real photos
and bad files, and the same files from a local folder: the two label outputs must agree; then
jobs.monitor over the bucket's rows.
Permanent errors (404, 403) end a job with one line naming the URI, before Ray starts.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import HYMENOPTERA, IMAGENET_SAMPLES, job_json, run_in_process, run_job, upload
from PIL import Image

from clf import storage
from clf.label.output import read_rows

pytestmark = pytest.mark.slow

BUCKET = "s3://clf-e2e"
BAD_FILES = ("empty.jpg", "notes.jpg", "truncated.jpg")
# Each job starts a Ray of its own, even where another session's `ray start` head runs here.
JOB_ENV = {"RAY_ADDRESS": "local"}


def job(*args: str, env: dict[str, str] | None = None) -> dict:
    return job_json(run_job(*args, "--json", env={**JOB_ENV, **(env or {})}))


def image_folder(root) -> str:
    """100 ImageNet samples (one in ten, a tenth of them in a subfolder) and three bad files."""
    names = sorted(os.listdir(IMAGENET_SAMPLES))[::10]
    os.makedirs(root / "sub")
    for i, name in enumerate(names):
        shutil.copy(IMAGENET_SAMPLES / name, root / ("sub" if i % 10 == 0 else "") / name)
    good = (IMAGENET_SAMPLES / names[1]).read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file, not a photo\n")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return str(root)


@pytest.fixture(scope="module")
def pipeline(s3_endpoint, tmp_path_factory, mobilenet_artifact):
    boto3.client("s3").create_bucket(Bucket=BUCKET[len("s3://") :])
    root = tmp_path_factory.mktemp("s3-e2e")
    out = {"root": root, "times": {}}

    def timed(name, *args):
        import time

        started = time.monotonic()
        out[name] = job(*args)
        out["times"][name] = round(time.monotonic() - started, 1)

    timed("ingest", "jobs.ingest", "--src", str(HYMENOPTERA), "--dst", f"{BUCKET}/data")
    timed(
        "train",
        "jobs.train",
        "--data",
        f"{BUCKET}/data",
        "--model",
        "small_cnn",
        "--output",
        f"{BUCKET}/run",
        "--workers",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--input-size",
        "32",
    )
    timed("export", "jobs.export", "--run", f"{BUCKET}/run", "--output", f"{BUCKET}/art")
    # The pretrained model, as jobs.export writes it, for labels that can be checked.
    upload(mobilenet_artifact, f"{BUCKET}/imagenet-art")
    images = image_folder(root / "images")
    upload(images, f"{BUCKET}/images")
    out["images"] = images
    art = f"{BUCKET}/imagenet-art"
    timed(
        "label_s3",
        "jobs.label",
        "--model",
        art,
        "--input",
        f"{BUCKET}/images",
        "--output",
        f"{BUCKET}/labels",
    )
    local_labels = str(root / "labels")
    timed("label_local", "jobs.label", "--model", art, "--input", images, "--output", local_labels)
    out["local_labels"] = local_labels
    print("job seconds:", out["times"])
    return out


def test_ingest_and_training_write_shards_checkpoints_and_run_files_to_s3(pipeline):
    manifest = storage.read_json(f"{BUCKET}/data/manifest.json")
    assert manifest["counts"]["val"] == {"ants": 70, "bees": 83}
    assert any(f.endswith(".parquet") for f in storage.list_files(f"{BUCKET}/data/train"))

    files = storage.list_files(f"{BUCKET}/run")
    checkpoints = {
        storage.relative(f, f"{BUCKET}/run").split("/")[0]
        for f in files
        if storage.relative(f, f"{BUCKET}/run").startswith("checkpoint_")
        and f.endswith("/meta.json")
    }
    assert len(checkpoints) == 2, files  # one per epoch, kept in S3 by Ray Train
    assert all(f"{BUCKET}/run/{c}/state.pt" in files for c in checkpoints)
    lines = storage.read_bytes(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    for name in ("config.json", "curves.png", "model/meta.json"):
        assert f"{BUCKET}/run/{name}" in files, name
    assert pipeline["train"]["model"] == f"{BUCKET}/run/model"

    meta = storage.read_json(f"{BUCKET}/art/meta.json")
    assert meta["classes"] == ["ants", "bees"] and meta["source_run"] == f"{BUCKET}/run"
    assert pipeline["export"]["parity"] < 1e-4
    # jobs.monitor's reference: the model's labels of the val shards, read from the bucket
    assert meta["reference"] == {
        "file": "reference.parquet",
        "source": f"153 images from {BUCKET}/data/val",
        "rows": 153,
    }
    assert storage.exists(f"{BUCKET}/art/reference.parquet")


def test_labels_of_an_s3_prefix_match_the_local_run(pipeline):
    s3_rows = {
        storage.relative(r["uri"], f"{BUCKET}/images"): r
        for r in read_rows(f"{BUCKET}/labels").to_pylist()
    }
    local_rows = {
        storage.relative(r["uri"], pipeline["images"]): r
        for r in read_rows(pipeline["local_labels"]).to_pylist()
    }
    assert len(s3_rows) == len(local_rows) == 103
    assert set(s3_rows) == set(local_rows)
    assert pipeline["label_s3"]["labelled"] == pipeline["label_local"]["labelled"] == 103
    assert pipeline["label_s3"]["errors"] == pipeline["label_local"]["errors"]
    for name, s3 in s3_rows.items():
        local = local_rows[name]
        assert s3["uri"] == f"{BUCKET}/images/{name}"
        for column in ("label", "label_id", "topk_labels", "model", "error"):
            assert s3[column] == local[column], (name, column)
        if s3["error"] is None:
            assert math.isclose(s3["confidence"], local["confidence"], abs_tol=1e-4), name
    assert {n for n, r in s3_rows.items() if r["error"]} == set(BAD_FILES)

    wnids = sorted(name.split("_", 1)[0] for name in os.listdir(IMAGENET_SAMPLES))
    good = [(n, r) for n, r in s3_rows.items() if r["error"] is None]
    correct = sum(
        wnids.index(os.path.basename(n).split("_", 1)[0]) == r["label_id"] for n, r in good
    )
    assert correct / len(good) >= 0.8


def test_monitor_reads_label_rows_and_images_from_s3_and_writes_its_report_there(pipeline):
    out = f"{BUCKET}/monitor"
    args = ["--labels", f"{BUCKET}/labels", "--reference", pipeline["local_labels"]]
    done = run_in_process("jobs.monitor", *args, "--output", out, "--review", "5", "--json")
    summary = job_json(done)
    assert summary["verdict"] == "no drift" and summary["run"]["rows"] == 103
    assert {"class_chi2", "class_js"} <= set(summary["insufficient"])  # one photo per class
    names = {storage.relative(f, out) for f in storage.list_files(out)}
    assert names == {"drift.json", "drift.png", "review.parquet", "review.csv", "review.png"}
    queue = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/review.parquet")))
    assert all(u.startswith(f"{BUCKET}/images/") for u in queue.column("uri").to_pylist())
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{out}/review.png")))
    assert sheet.size == (1200, 270)
    assert len(set(np.asarray(sheet.convert("L")).ravel().tolist())) > 100


def predictions(done) -> list[dict]:
    output = job_json(done)
    return output["results"] if isinstance(output, dict) else output


def test_predict_reads_the_artifact_and_images_from_s3(pipeline):
    name = sorted(os.listdir(pipeline["images"]))[5]
    image = f"{BUCKET}/images/{name}"
    done = run_job("jobs.predict", "--model", f"{BUCKET}/imagenet-art", "--json", image)
    result = predictions(done)
    row = next(r for r in read_rows(f"{BUCKET}/labels").to_pylist() if r["uri"] == image)
    assert result[0]["image"] == image and result[0]["error"] is None
    assert result[0]["top"][0]["label"] == row["label"]

    bee = storage.list_files(str(HYMENOPTERA / "val" / "bees"))[0]
    result = predictions(run_job("jobs.predict", "--model", f"{BUCKET}/art", "--json", bee))
    assert {t["label"] for t in result[0]["top"]} == {"ants", "bees"}


def test_evaluate_writes_its_report_to_s3(pipeline):
    if not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "jobs", "evaluate.py")):
        pytest.skip("no jobs.evaluate yet")
    summary = job(
        "jobs.evaluate",
        "--model",
        f"{BUCKET}/art",
        "--data",
        f"{BUCKET}/data/val",
        "--output",
        f"{BUCKET}/eval",
    )
    assert summary["images"] == 153
    files = storage.list_files(f"{BUCKET}/eval")
    for name in ("report.json", "confusion_matrix.png", "confusion_matrix.csv"):
        assert f"{BUCKET}/eval/{name}" in files, name
    assert storage.read_json(f"{BUCKET}/eval/report.json")


# ------------------------------------------------------------------------------------------
# Permanent errors: one line naming the URI, a non-zero exit, and no Ray


def fails_fast(*args: str, env: dict[str, str] | None = None, tmp_path=None) -> tuple[int, str]:
    """Run a job that must fail before Ray starts; returns its exit code and its one line."""
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir(exist_ok=True)
    done = run_job(*args, env={**JOB_ENV, "RAY_TMPDIR": str(ray_tmp), **(env or {})}, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert not os.listdir(ray_tmp), "Ray was started"  # local Ray would have made ray-tmp/ray
    return done.returncode, lines[0]


def test_missing_input_prefix_or_bucket_is_a_one_line_error(pipeline, tmp_path):
    art = f"{BUCKET}/imagenet-art"
    for missing in (f"{BUCKET}/no-such-prefix", "s3://clf-no-such-bucket/images"):
        code, line = fails_fast(
            "jobs.label",
            "--model",
            art,
            "--input",
            missing,
            "--output",
            f"{BUCKET}/x",
            tmp_path=tmp_path,
        )
        assert code == 2 and missing in line and "no such" in line, line


def test_missing_training_data_is_a_one_line_error(pipeline, tmp_path):
    for missing in (f"{BUCKET}/no-such-data", "s3://clf-no-such-bucket/data"):
        code, line = fails_fast(
            "jobs.train",
            "--data",
            missing,
            "--model",
            "small_cnn",
            "--output",
            f"{BUCKET}/run-x",
            tmp_path=tmp_path,
        )
        assert code == 2 and missing in line, line


def test_access_denied_is_a_one_line_error_naming_the_uri(pipeline, denying_s3_endpoint, tmp_path):
    """Credentials the store rejects (403): label input and training data, before Ray starts."""
    art = tmp_path / "art"
    for uri in storage.list_files(f"{BUCKET}/art"):
        storage.write_bytes(
            str(art / storage.relative(uri, f"{BUCKET}/art")), storage.read_bytes(uri)
        )
    denied = {"AWS_ENDPOINT_URL": denying_s3_endpoint}

    code, line = fails_fast(
        "jobs.label",
        "--model",
        str(art),
        "--input",
        f"{BUCKET}/images",
        "--output",
        str(tmp_path / "labels"),
        env=denied,
        tmp_path=tmp_path,
    )
    assert code == 1 and f"{BUCKET}/images" in line and "access denied" in line, line

    code, line = fails_fast(
        "jobs.train",
        "--data",
        f"{BUCKET}/data",
        "--model",
        "small_cnn",
        "--output",
        str(tmp_path / "run"),
        env=denied,
        tmp_path=tmp_path,
    )
    assert code == 1 and f"{BUCKET}/data/manifest.json" in line and "access denied" in line, line
