"""jobs.monitor's parts: which rows make a run, the drift metrics and their validity rules, and
the review queue's order. The jobs end to end, on real images, are in test_monitor_e2e.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_in_process

from clf.dataset.label_rows import label_table, new_run_id, part_name, record_run, run_files
from clf.errors import UsageError
from clf.monitor.drift import INSUFFICIENT, Thresholds, drift_report, population_stability
from clf.monitor.review import pick, review_rows, uncertainty
from clf.monitor.rows import LabelStats, label_stats, read_columns

CLASSES = np.array([f"class{i}" for i in range(10)], dtype=object)


def softmax_rows(rng, n: int, sharpness: float, drop: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(top-5 scores, their class indices) of ``n`` random rows; ``drop`` classes never win."""
    logits = rng.normal(size=(n, len(CLASSES))) * sharpness
    logits[:, :drop] -= 100
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    indices = np.argsort(-probs, axis=1)[:, :5]
    return np.take_along_axis(probs, indices, axis=1).astype(np.float32), indices


def write_rows(output, rng, n, sharpness=3.0, drop=0, errors=0, prefix="img") -> str:
    """One committed label file of ``n`` rows, the first ``errors`` of them error rows."""
    os.makedirs(output, exist_ok=True)
    scores, indices = softmax_rows(rng, n, sharpness, drop)
    ok = np.arange(n) >= errors
    uris = [f"{output}/{prefix}-{i}.jpg" for i in range(n)]
    reasons = ["" if good else "image too large (30000x30000)" for good in ok]
    table = label_table(uris, ok, scores, indices, reasons, CLASSES, "m" * 12)
    path = os.path.join(output, part_name(uris))
    pq.write_table(table, path)
    return path


def stats(rng, n, **kwargs) -> LabelStats:
    scores, indices = softmax_rows(rng, n, kwargs.get("sharpness", 3.0), kwargs.get("drop", 0))
    names, counts = np.unique(CLASSES[indices[:, 0]], return_counts=True)
    return LabelStats(n, dict(zip(names, counts.tolist())), scores, kwargs.get("errors", {}))


# ----- which rows are a run's


def test_a_run_is_the_files_it_committed_and_a_killed_run_belongs_to_the_next(tmp_path):
    out, rng = str(tmp_path), np.random.default_rng(0)
    first = write_rows(out, rng, 10, prefix="a")
    record_run(out, new_run_id(), {})
    killed = write_rows(out, rng, 10, prefix="b")  # a run killed before its record
    resumed = write_rows(out, rng, 10, prefix="c")
    record, files = run_files(out)
    assert files == [first]  # the latest recorded run, until the resumed run finishes
    record_run(out, new_run_id(), {})
    record, files = run_files(out)
    assert sorted(files) == sorted([killed, resumed])
    assert run_files(out, "all")[1] == sorted([first, killed, resumed])


def test_a_run_that_labelled_nothing_is_not_the_default(tmp_path):
    out, rng = str(tmp_path), np.random.default_rng(0)
    first = write_rows(out, rng, 10)
    name = new_run_id()
    record_run(out, name, {})
    record_run(out, new_run_id(), {})  # a nightly run with nothing new
    assert run_files(out)[1] == [first]
    assert run_files(out, name)[0]["run"] == name
    with pytest.raises(UsageError, match="--run nope: no such run"):
        run_files(out, "nope")


def test_outputs_from_before_run_records_are_one_run(tmp_path):
    path = write_rows(str(tmp_path), np.random.default_rng(0), 10)
    record, files = run_files(str(tmp_path))
    assert record["run"] == "all" and files == [path]


def test_stats_read_error_rows_apart_and_fold_their_details(tmp_path):
    path = write_rows(str(tmp_path), np.random.default_rng(0), 50, errors=5)
    found = label_stats(read_columns([path]))
    assert found.rows == 50 and found.labelled == 45 and sum(found.classes.values()) == 45
    assert found.errors == {"image too large": 5}
    assert found.topk.shape == (45, 5) and np.all(np.diff(found.topk, axis=1) <= 0)


# ----- the drift metrics


def test_two_samples_of_one_distribution_do_not_drift():
    rng = np.random.default_rng(0)
    for n in (300, 5000):  # the tests decide at 300 rows, the distances at 5000
        report = drift_report(stats(rng, n), stats(rng, n), Thresholds())
        assert report["drift"] is False, (n, report["metrics"])
        assert report["decided_by"] == ("tests" if n <= 1000 else "distances")


def test_a_class_that_vanishes_drifts_on_the_class_shares_only():
    rng = np.random.default_rng(0)
    report = drift_report(stats(rng, 5000), stats(rng, 5000, drop=3), Thresholds())
    metrics = report["metrics"]
    assert report["drift"] and metrics["class_js"]["drift"] and metrics["class_chi2"]["drift"]
    assert metrics["class_js"]["value"] >= 0.1 and metrics["class_chi2"]["value"] < 0.05
    assert report["classes"]["class0"] == {"reference": pytest.approx(0.1, abs=0.02), "run": 0}


def test_a_less_confident_run_drifts_on_confidence_and_entropy():
    rng = np.random.default_rng(0)
    report = drift_report(stats(rng, 5000), stats(rng, 5000, sharpness=1.0), Thresholds())
    metrics = report["metrics"]
    for name in ("confidence_psi", "entropy_psi", "confidence_ks", "entropy_ks"):
        assert metrics[name]["drift"], name
    assert report["drift"]


def test_one_row_per_class_is_insufficient_data_for_class_shares_not_drift():
    rng = np.random.default_rng(0)
    reference, run = stats(rng, 1000), stats(rng, 1000)
    names = [f"n{i:04d}" for i in range(1000)]
    reference.classes = dict.fromkeys(names, 1)  # ImageNet samples: one image per class
    run.classes = dict.fromkeys(names[::-1][:500] + [f"m{i}" for i in range(500)], 1)
    report = drift_report(reference, run, Thresholds())
    for name in ("class_chi2", "class_js"):
        metric = report["metrics"][name]
        assert metric["status"] == INSUFFICIENT and metric["drift"] is False
        assert metric["value"] is None and "expected" in metric["why"]


def test_too_few_rows_are_insufficient_for_ks_and_psi():
    rng = np.random.default_rng(0)
    report = drift_report(stats(rng, 1000), stats(rng, 12, sharpness=0.1), Thresholds())
    for name in ("confidence_ks", "confidence_psi", "entropy_ks", "entropy_psi"):
        assert report["metrics"][name]["status"] == INSUFFICIENT, name


def test_error_rows_drift_when_their_share_grows_past_the_threshold():
    rng = np.random.default_rng(0)
    run = stats(rng, 1000)
    run.errors, run.rows = {"corrupt JPEG": 80}, 1080
    metric = drift_report(stats(rng, 1000), run, Thresholds())["metrics"]["error_share"]
    assert metric["drift"] and metric["value"] == pytest.approx(80 / 1080)
    assert metric["by_reason"]["corrupt JPEG"] == {"reference": 0.0, "run": 80 / 1080}


def test_psi_is_zero_for_equal_samples_and_grows_with_the_shift():
    x = np.random.default_rng(0).random(10_000)
    assert population_stability(x, x) == pytest.approx(0.0)
    assert population_stability(x, x**2) > population_stability(x, x**1.2) > 0.0


def test_entropy_of_the_top_k_counts_the_rest_of_the_mass_as_one_outcome():
    found = LabelStats(2, {}, np.array([[1.0, 0.0], [0.25, 0.25]], dtype=np.float32), {})
    assert found.entropy(2) == pytest.approx([0.0, -2 * 0.25 * np.log(0.25) - 0.5 * np.log(0.5)])


# ----- the review queue


def test_each_strategy_scores_the_more_uncertain_row_higher():
    sure, torn, flat = [0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [0.4, 0.3, 0.3]
    topk = np.array([sure, torn, flat], dtype=np.float32)
    assert np.argsort(-uncertainty("least-confidence", topk)).tolist() == [2, 1, 0]
    assert np.argsort(-uncertainty("margin", topk)).tolist() == [1, 2, 0]
    assert np.argsort(-uncertainty("entropy", topk)).tolist() == [2, 1, 0]


def test_stratified_picks_let_classes_take_turns():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.05])
    labels = np.array([0, 0, 0, 0, 1, 2])
    assert pick(scores, labels, 4, stratify=False).tolist() == [0, 1, 2, 3]
    assert pick(scores, labels, 4, stratify=True).tolist() == [0, 4, 5, 1]


def test_the_review_queue_holds_whole_rows_most_uncertain_first_each_once(tmp_path):
    rng = np.random.default_rng(0)
    files = [write_rows(str(tmp_path), rng, 300, errors=3, prefix=p) for p in "abc"]
    queue = review_rows(read_columns(files), "least-confidence", 40, stratify=False)
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    labelled = sorted((r for r in rows if r["error"] is None), key=lambda r: r["confidence"])
    assert queue.column_names == [*rows[0], "score", "strategy"]
    assert queue.column("uri").to_pylist() == [r["uri"] for r in labelled[:40]]
    assert len(set(queue.column("uri").to_pylist())) == 40
    assert set(queue.column("strategy").to_pylist()) == {"least-confidence"}


# ----- the job's flags and inputs


def monitor(*args):
    return run_in_process("jobs.monitor", *args)


def test_bad_flags_are_one_line_errors_before_any_row_is_read(tmp_path):
    labels = tmp_path / "labels"
    write_rows(str(labels), np.random.default_rng(0), 10)
    out = str(tmp_path / "out")
    cases = {
        ("--labels", str(tmp_path / "none"), "--output", out): "no label rows there",
        ("--labels", str(labels), "--output", out): "do not name their artifact",
        ("--labels", str(labels), "--output", out, "--reference", out): "neither a model artifact",
        ("--labels", str(labels), "--output", out, "--p-value", "2"): "--p-value must be in",
        ("--labels", str(labels), "--output", out, "--strategy", "random"): "invalid choice",
        ("--labels", str(labels), "--output", out, "--run", "x"): "--run x: no such run",
    }
    for args, message in cases.items():
        done = monitor(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not os.path.exists(out)


def test_an_artifact_without_a_reference_is_a_one_line_error(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "meta.json").write_text(json.dumps({"sha256": "m" * 64, "format": "onnx"}))
    labels = str(tmp_path / "labels")
    write_rows(labels, np.random.default_rng(0), 10)
    done = monitor("--labels", labels, "--reference", str(art), "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "the artifact has no reference" in done.stderr


def test_monitoring_against_an_earlier_output_compares_with_its_rows(tmp_path):
    rng = np.random.default_rng(0)
    reference, labels = str(tmp_path / "reference"), str(tmp_path / "labels")
    write_rows(reference, rng, 2000)
    write_rows(labels, rng, 2000, drop=3)
    record_run(labels, new_run_id(), {})
    out = tmp_path / "out"
    done = monitor("--labels", labels, "--reference", reference, "--output", str(out), "--json")
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["verdict"] == "drift" and "class_js" in summary["drifted"]
    report = json.loads((out / "drift.json").read_text())
    assert report["exit_code"] == 3 and report["reference"]["rows"] == 2000
    assert {"value", "threshold", "drift", "status"} <= set(report["metrics"]["class_js"])
