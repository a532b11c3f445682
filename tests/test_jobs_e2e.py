"""The product path, as users run it: jobs as subprocesses on a real local Ray, on real images."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import pytest
import torch
from conftest import HYMENOPTERA, IMAGENET_SAMPLES, ROOT, job_json, run_job

from clf.inference.in_process import predict
from clf.label.output import read_rows
from clf.label.sink import LABEL_SCHEMA
from clf.training import checkpoint

pytestmark = pytest.mark.slow


def job(*args: str, timeout: int = 900) -> dict:
    """Run ``python -m jobs.X ... --json``; returns its one JSON line."""
    return job_json(run_job(*args, "--json", timeout=timeout))


def true_imagenet_index(uri: str, wnids: list[str]) -> int:
    return wnids.index(os.path.basename(uri).split("_", 1)[0])


def test_pretrained_imagenet_model_labels_the_samples_correctly(tmp_path, mobilenet_artifact):
    out = str(tmp_path / "labels")
    done = run_job(
        "jobs.label",
        "--model",
        mobilenet_artifact,
        "--input",
        str(IMAGENET_SAMPLES),
        "--output",
        out,
        "--progress-every",
        "2",
        "--json",
    )
    summary = job_json(done)
    # Progress while it runs, on stderr under --json: rows committed so far, never more.
    counts = [
        int(n)
        for n in re.findall(r"\[label\] (\d+)/1000 images labelled and committed", done.stderr)
    ]
    assert counts and counts == sorted(counts) and counts[-1] <= 1000, done.stderr

    rows = read_rows(out)
    assert summary["labelled"] == rows.num_rows == 1000
    assert rows.schema == LABEL_SCHEMA
    for f in os.listdir(out):
        if f.endswith(".parquet"):
            assert pq.read_schema(os.path.join(out, f)) == LABEL_SCHEMA
    uris = rows.column("uri").to_pylist()
    assert len(set(uris)) == 1000
    wnids = sorted(name.split("_", 1)[0] for name in os.listdir(IMAGENET_SAMPLES))
    correct = sum(
        true_imagenet_index(u, wnids) == i
        for u, i in zip(uris, rows.column("label_id").to_pylist())
    )
    print(f"ImageNet samples top-1: {correct / 1000:.3f}")
    assert correct / 1000 >= 0.80


@pytest.fixture(scope="module")
def hymenoptera_run(tmp_path_factory, mobilenet_weights):
    root = tmp_path_factory.mktemp("hymenoptera")
    data, run = str(root / "data"), str(root / "run")
    ingest = job("jobs.ingest", "--src", str(HYMENOPTERA), "--dst", data)
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "clf-ckpt-*")))
    done = run_job(
        "jobs.train",
        "--data",
        data,
        "--model",
        "mobilenet_v2",
        "--pretrained",
        os.path.relpath(mobilenet_weights, ROOT),  # as users type it; workers run elsewhere
        "--output",
        run,
        "--workers",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "0.003",
        "--strategy",
        "two-phase",
        "--head-epochs",
        "2",
        "--set",
        "augment.scale_min=0.25",
        "--json",
    )
    temp_left = set(glob.glob(os.path.join(tempfile.gettempdir(), "clf-ckpt-*"))) - temp_before
    return {
        "root": root,
        "data": data,
        "run": run,
        "ingest": ingest,
        "train": job_json(done),
        "train_stderr": done.stderr,
        "temp_left": temp_left,
    }


def test_ingest_lists_the_placeholder_gif_as_rejected(hymenoptera_run):
    manifest = json.loads(open(os.path.join(hymenoptera_run["data"], "manifest.json")).read())
    assert manifest["rejected"][0]["key"] == "train/ants/imageNotFound.gif"
    assert "placeholder" in manifest["rejected"][0]["reason"]
    assert manifest["counts"]["val"] == {"ants": 70, "bees": 83}


def test_finetuning_reaches_90_percent_and_records_every_epoch(hymenoptera_run):
    run, trained = hymenoptera_run["run"], hymenoptera_run["train"]
    print(f"hymenoptera best val accuracy: {trained['best_val_acc']:.3f}")
    assert trained["best_val_acc"] >= 0.90
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"} <= set(line)
    for name in ("curves.png", "config.json", "model/meta.json", "model/model.ts"):
        assert os.path.exists(os.path.join(run, name)), name
    meta = json.load(open(os.path.join(run, "model", "meta.json")))
    assert meta["classes"] == ["ants", "bees"] and meta["source_run"] == run
    # Checked on the val split, read while Ray Train started; its labels are the reference.
    val = os.path.join(hymenoptera_run["data"], "val")
    assert meta["parity"]["sample"] == meta["reference"]["source"] == f"153 images from {val}"
    assert hymenoptera_run["temp_left"] == set()  # local checkpoint copies go once uploaded


def test_the_training_summary_says_where_its_time_went(hymenoptera_run):
    trained = hymenoptera_run["train"]
    t = trained["timings"]
    assert set(t) == {"set_up", "fit", "epochs", "train", "export"}
    assert 0 < t["train"] < t["epochs"] < t["fit"]  # validation, then Ray Train's start and stop
    assert t["set_up"] + t["fit"] + t["export"] == pytest.approx(trained["seconds"], abs=1.0)


def test_training_logs_carry_no_ray_train_noise(hymenoptera_run):
    """Ray Train's placement-group cleaner would ask the State API of an embedded Ray, which
    serves none, and warn each second; and Ray Train's INFO lines would restate each report and
    checkpoint that the progress lines already show."""
    logs = hymenoptera_run["train_stderr"]
    assert "State API may be temporarily unavailable" not in logs
    assert "Reporting training result" not in logs and "Checkpoint successfully created" not in logs
    # Nor Ray Data's lines from inside each worker: its bars, its per-epoch summaries, and a
    # deprecation that Ray Train's own code triggers.
    for noise in ("Progress bars disabled", "execution finished", "exclude_resources"):
        assert noise not in logs, noise


def test_training_runs_channels_last_on_cpu_too(hymenoptera_run):
    folder, _ = checkpoint.best_in_run(hymenoptera_run["run"])
    first_conv = checkpoint.load_state_uri(folder)["model"]["features.0.0.weight"]
    assert first_conv.shape == (32, 3, 3, 3)
    assert first_conv.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_get_one_error_row_each_and_rerun_adds_nothing(hymenoptera_run, bad_files_dir):
    model, out = (
        os.path.join(hymenoptera_run["run"], "model"),
        str(hymenoptera_run["root"] / "bad-labels"),
    )
    summary = job("jobs.label", "--model", model, "--input", str(bad_files_dir), "--output", out)
    rows = {os.path.basename(r["uri"]): r for r in read_rows(out).to_pylist()}
    assert set(rows) == set(os.listdir(bad_files_dir))
    for bad in ("empty.jpg", "truncated.jpg", "notes.jpg", "imageNotFound.gif"):
        assert rows[bad]["error"] and rows[bad]["label"] is None, bad
    assert sum(r["error"] is None for r in rows.values()) == 6
    assert sum(summary["errors"].values()) == 4

    again = job("jobs.label", "--model", model, "--input", str(bad_files_dir), "--output", out)
    assert again["already_labelled"] == 10 and again["labelled"] == 0
    assert read_rows(out).num_rows == 10


def test_export_from_run_and_predict_top5(hymenoptera_run):
    art = str(hymenoptera_run["root"] / "exported")
    exported = job(
        "jobs.export",
        "--run",
        hymenoptera_run["run"],
        "--format",
        "onnx,torchscript",
        "--output",
        art,
    )
    onnx = exported["parity_report"]["onnx"]  # checked on every val image before writing
    assert onnx["images"] == 153 and onnx["max_abs_logit_diff"] <= 1e-3
    assert onnx["top1_agreement"] == 1.0
    assert exported["parity_report"]["torchscript"]["max_abs_logit_diff"] <= 1e-4
    bee = str(HYMENOPTERA / "val" / "bees" / sorted(os.listdir(HYMENOPTERA / "val" / "bees"))[0])
    done = subprocess.run(
        [sys.executable, "-m", "jobs.predict", "--model", art, bee],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == bee
    assert "1. bees" in done.stdout  # only two classes, so the top-k stops at 2

    # ONNX, the artifact's default, labels through Ray as its TorchScript twin predicts.
    out = str(hymenoptera_run["root"] / "onnx-labels")
    job("jobs.label", "--model", art, "--input", str(HYMENOPTERA / "val"), "--output", out)
    rows = read_rows(out).to_pylist()
    assert len(rows) == 153 and all(r["error"] is None for r in rows)
    twin = predict(art, [r["uri"] for r in rows], top_k=1, format="torchscript")
    assert [r["label"] for r in rows] == [p["top"][0]["label"] for p in twin["results"]]
