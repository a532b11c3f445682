"""Evaluation: metrics match hand computation, report files are readable, the HOG+SVM baseline
learns from real images, and jobs.evaluate reproduces MobileNetV2's ImageNet-sample accuracy."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from conftest import CIFAR, IMAGENET_SAMPLES, imported_by, job_json, run_job
from PIL import Image

from clf import plots
from clf.artifact.export import export_artifact
from clf.artifact.torch_model import load_torch
from clf.config import EvaluateConfig, IngestConfig
from clf.dataset.ingest import ingest
from clf.errors import UsageError
from clf.evaluate import baseline, diagnostics, metrics, report
from clf.evaluate.checks import align_classes, check
from clf.evaluate.job import evaluate
from clf.evaluate.scorer import Scorer
from clf.images.preprocess import Preprocess
from clf.inference.pixels import decode_batch
from clf.models import create_model

# Three classes, six images, supports 3 / 2 / 1. No confidence sits on a bin edge (k/15).
LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # a, right, confidence 0.90
        [0.70, 0.20, 0.10],  # a, right, 0.70
        [0.25, 0.70, 0.05],  # a -> b, 0.70; a is second, so right in the top 2
        [0.05, 0.90, 0.05],  # b, right, 0.90
        [0.50, 0.15, 0.35],  # b -> a, 0.50; b is third, wrong in the top 2
        [0.30, 0.25, 0.45],  # c, right, 0.45
    ]
)
CLASSES = ["a", "b", "c"]


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


# ------------------------------------------------------------------------------------------
# Metrics


def test_metrics_match_a_hand_computed_case():
    m = metrics.compute(LABELS, PROBS, CLASSES, top_k=2).metrics
    assert m["images"] == 6 and m["num_classes"] == 3
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(5 / 6)
    # Predictions a, a, b | b, a | c: precision = recall = F1 = 2/3, 1/2 and 1 per class.
    assert m["precision_macro"] == m["recall_macro"] == m["f1_macro"] == pytest.approx(13 / 18)
    assert m["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 1 * 1) / 6)
    # One-vs-rest AUC: a 7/9, b 5/8, c 1.
    assert m["auc_ovr_macro"] == pytest.approx((7 / 9 + 5 / 8 + 1) / 3)
    assert m["auc_classes"] == 3 and m["auc_undefined"] == []
    # Bins: {.9 right, .9 right}, {.7 right, .7 wrong}, {.5 wrong}, {.45 right}.
    assert m["ece"] == pytest.approx((2 * 0.1 + 2 * 0.2 + 1 * 0.5 + 1 * 0.55) / 6)
    assert m["ece_bins"] == 15


def test_per_class_rows_hold_precision_recall_f1_support_and_accuracy():
    rows = metrics.compute(LABELS, PROBS, CLASSES, top_k=2).per_class
    a, b, c = rows
    assert (a["class"], a["support"], a["predicted"]) == ("a", 3, 3)
    assert a["precision"] == a["recall"] == a["f1"] == a["accuracy"] == pytest.approx(2 / 3)
    assert b["precision"] == b["recall"] == b["f1"] == pytest.approx(1 / 2)
    assert (a["top2_accuracy"], b["top2_accuracy"], c["top2_accuracy"]) == (1.0, 0.5, 1.0)
    assert (a["auc"], b["auc"], c["auc"]) == pytest.approx((7 / 9, 5 / 8, 1.0))


def test_confusion_matrix_rows_are_true_classes_and_pairs_list_the_largest_first():
    report = metrics.compute(LABELS, PROBS, CLASSES, pairs=5)
    assert report.confusion.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert report.most_confused == [
        {"true": "a", "predicted": "b", "count": 1, "share_of_true": pytest.approx(1 / 3)},
        {"true": "b", "predicted": "a", "count": 1, "share_of_true": pytest.approx(1 / 2)},
    ]
    counts = np.array([[5, 1, 4], [3, 7, 0], [0, 4, 9]])
    pairs = metrics.most_confused(counts, ["x", "y", "z"], 2)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("x", "z", 4),
        ("z", "y", 4),
    ]


def test_auc_skips_classes_that_no_image_belongs_to():
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.4, 0.5, 0.1]])
    report = metrics.compute(np.array([0, 1, 1, 0]), probs, ["a", "b", "never"], top_k=2)
    assert report.metrics["auc_classes"] == 2
    assert report.metrics["auc_undefined"] == ["never"]
    assert report.metrics["auc_ovr_macro"] == pytest.approx(0.75)
    assert report.per_class[2]["auc"] is None and report.per_class[2]["support"] == 0


def test_two_classes_give_one_auc_and_no_meaningless_top_k():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    m = metrics.compute(np.array([0, 1, 1, 0]), probs, ["ants", "bees"], top_k=5).metrics
    assert m["auc_ovr_macro"] == pytest.approx(0.75)  # P(bees): .7 and .4 against .2 and .6
    assert m["top1"] == 0.5 and m["top_k_accuracy"] is None


def test_a_calibrated_bin_has_no_calibration_error():
    ece, bins = metrics.calibration(np.full(4, 0.75), np.array([1, 1, 1, 0], bool))
    assert ece == pytest.approx(0.0)
    assert [b["count"] for b in bins if b["count"]] == [4] and len(bins) == 15


# ------------------------------------------------------------------------------------------
# Files


def test_report_files_are_readable(tmp_path):
    scored = metrics.compute(LABELS, PROBS, CLASSES, top_k=2)
    content = report.write(scored, str(tmp_path), {"model": {"arch": "test"}})

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(content))
    assert saved["model"] == {"arch": "test"}
    assert saved["metrics"]["top1"] == pytest.approx(4 / 6)
    assert saved["most_confused"][0]["true"] == "a"
    assert set(saved["files"]) <= set(os.listdir(tmp_path))

    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert rows[0] == ["true \\ predicted", "a", "b", "c"]
    assert rows[1:] == [["a", "2", "1", "0"], ["b", "1", "1", "0"], ["c", "0", "0", "1"]]

    per_class = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == CLASSES
    assert float(per_class[0]["f1"]) == pytest.approx(2 / 3) and per_class[2]["support"] == "1"

    assert png_size((tmp_path / "confusion_matrix.png").read_bytes()) == (640, 640)
    assert png_size((tmp_path / "reliability.png").read_bytes()) == (640, 640)


def test_confusion_heatmap_of_many_classes_keeps_a_readable_size():
    n = 1000
    counts = np.eye(n, dtype=int)
    counts[0, 1] = 3
    assert plots.confusion_pixels(n) == 1600
    assert png_size(plots.confusion_heatmap(counts, [f"class {i}" for i in range(n)])) == (
        1600,
        1600,
    )


# ------------------------------------------------------------------------------------------
# Diagnostics


def test_first_layer_filters_are_found_in_torchscript_and_onnx_artifacts(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    spec = Preprocess(input_size=32, resize=36)
    export_artifact(
        model,
        str(tmp_path),
        arch="tiny",
        classes=["x", "y"],
        preprocess=spec,
        formats=("torchscript", "onnx"),
    )
    scripted = load_torch(str(tmp_path)).module
    assert len(scripted.state_dict()) == 0  # frozen: the weights live in the graph
    onnx_module = load_torch(str(tmp_path), format="onnx").module

    expected = model[0].weight.detach().numpy()
    for module in (model, scripted, onnx_module):
        np.testing.assert_allclose(diagnostics.first_conv_weight(module), expected, rtol=1e-6)
    assert png_size(diagnostics.filters_png(scripted)) == (640, 680)  # 8 kernels, 3 x 3 grid
    assert png_size(diagnostics.filters_png(onnx_module)) == (640, 680)


def test_confident_mistakes_are_the_wrong_answers_given_with_most_confidence(real_jpeg):
    picked = diagnostics.confident_mistakes(LABELS, PROBS, 5)
    assert picked.tolist() == [2, 4]  # wrong at 0.70, then at 0.50
    captions = [diagnostics.caption("a", "b", 0.7), diagnostics.caption("b", "a", 0.5)]
    assert captions[0] == "a / b (0.70)"
    png = diagnostics.mistakes_png([real_jpeg, b"not an image"], captions)
    assert png_size(png) == (2 * 240, 270)


# ------------------------------------------------------------------------------------------
# The job's pieces without a cluster


@pytest.fixture(scope="module")
def cifar_small(tmp_path_factory) -> str:
    """A real 10-class set, small enough for a unit test: 100 train and 40 test per class."""
    root = tmp_path_factory.mktemp("cifar")
    for split, per_class in (("train", 100), ("test", 40)):
        for name in sorted(os.listdir(CIFAR / split)):
            (root / "src" / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(CIFAR / split / name))[:per_class]:
                os.symlink(CIFAR / split / name / file, root / "src" / split / name / file)
    ingest(IngestConfig(src=str(root / "src"), dst=str(root / "data"), val_fraction=0.0))
    return str(root / "data")


def test_the_hog_svm_baseline_learns_from_real_images(cifar_small, tmp_path):
    cfg = EvaluateConfig(
        model="hog_svm",
        data=f"{cifar_small}/test",
        train=f"{cifar_small}/train",
        output=str(tmp_path / "report"),
        baseline_size=32,
        diagnostics=True,
    )
    summary = evaluate(cfg, check(cfg), progress=lambda message: None)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    print(f"HOG+SVM on 10-class CIFAR (1000 train images): {report['metrics']}")
    assert summary.images == 400 and report["metrics"]["num_classes"] == 10
    assert report["metrics"]["top1"] > 0.25  # chance is 0.10
    assert report["metrics"]["auc_ovr_macro"] > 0.7
    assert "confident_mistakes.png" in report["files"]
    assert png_size((tmp_path / "report" / "confident_mistakes.png").read_bytes())[0] == 960


def test_a_saved_baseline_reloads_from_plain_arrays_and_scores_the_same(cifar_small, tmp_path):
    meta = baseline.train_baseline(cifar_small, str(tmp_path / "model"), size=32)
    assert meta["format"] == "hog_svm" and meta["classes"][0] == "airplane"
    assert set(os.listdir(tmp_path / "model")) == {"meta.json", "hog_svm.npz"}
    with np.load(tmp_path / "model" / "hog_svm.npz", allow_pickle=False) as arrays:
        assert arrays["coef"].shape == (10, 1764)

    rows = baseline.featurize_shards(f"{cifar_small}/test", 32)
    loaded = baseline.HogSvm.load(str(tmp_path / "model"))
    probs = loaded.predict_proba(rows.x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert (probs.argmax(axis=1) == rows.labels).mean() > 0.25


def test_scorer_returns_probabilities_and_zero_rows_for_undecodable_images(tmp_path):
    torch.manual_seed(0)
    spec = Preprocess(input_size=32, resize=36)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    export_artifact(model, str(tmp_path), arch="tiny", classes=CLASSES, preprocess=spec)
    batch = decode_batch(
        {
            "uri": np.array(["/s.parquet#x/1.jpg", "/s.parquet#x/2.jpg"], dtype=object),
            "key": np.array(["x/1.jpg", "x/2.jpg"], dtype=object),
            "path": np.array(["/s.parquet", "/s.parquet"], dtype=object),
            "image": np.array(
                [(IMAGENET_SAMPLES / sorted(os.listdir(IMAGENET_SAMPLES))[0]).read_bytes(), b""],
                dtype=object,
            ),
            "label": np.array([2, 1], dtype=np.int32),
        },
        spec.to_meta(),
        10**8,
    )
    out = Scorer(str(tmp_path), prefer_gpu=False)(batch)
    assert out["label"].tolist() == [2, 1] and out["error"].tolist() == ["", "empty file"]
    assert out["probs"].shape == (2, 3)
    assert out["probs"][0].sum() == pytest.approx(1.0) and not out["probs"][1].any()


def test_labels_match_model_classes_by_name_or_else_by_position():
    by_name, how = align_classes(["bee", "ant"], ["ant", "bee", "wasp"])
    assert by_name.tolist() == [1, 0] and how == "name"
    by_position, how = align_classes(["n01", "n02"], ["tench", "goldfish"])
    assert by_position.tolist() == [0, 1] and how == "position"
    with pytest.raises(UsageError, match="'moth' is not one of the model's"):
        align_classes(["moth"], ["ant", "bee"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 0}, "--top-k must be at least 1"),
        ({"model": "/no/such/artifact", "train": None}, "not a model artifact"),
        ({"data": "DST"}, "give one split of it"),
        ({"data": "/no/such/split"}, "no Parquet image shards"),
        ({"train": None}, "needs --train"),
        ({"model": "ART", "train": "TRAIN"}, "--train is for --model hog_svm only"),
        ({"output": ""}, "--output is required"),
    ],
)
def test_flags_are_checked_before_any_work(cifar_small, tmp_path, change, message):
    values = {
        "model": "hog_svm",
        "data": f"{cifar_small}/test",
        "train": f"{cifar_small}/train",
        "output": str(tmp_path),
    }
    for key, value in change.items():
        values[key] = {"DST": cifar_small, "ART": str(tmp_path), "TRAIN": values["train"]}.get(
            value, value
        )
    with pytest.raises(UsageError, match=message):
        check(EvaluateConfig(**values))


# ------------------------------------------------------------------------------------------
# The job end to end


@pytest.mark.slow
def test_pretrained_mobilenet_scores_the_imagenet_samples(tmp_path, mobilenet_artifact):
    """Acceptance: top-1 >= 80% and top-5 >= 94% on the 1000 ImageNet samples."""
    src = tmp_path / "src"
    for name in sorted(os.listdir(IMAGENET_SAMPLES)):  # the samples sit flat: one folder per wnid
        (src / name.split("_", 1)[0]).mkdir(parents=True)
        os.symlink(IMAGENET_SAMPLES / name, src / name.split("_", 1)[0] / name)
    data, out = tmp_path / "data", tmp_path / "report"

    # One image per class: a test fraction of 0.9 rounds to that one image.
    ingest(IngestConfig(src=str(src), dst=str(data), val_fraction=0, test_fraction=0.9))
    done = run_job(
        "jobs.evaluate",
        "--model",
        mobilenet_artifact,
        "--data",
        f"{data}/test",
        "--output",
        str(out),
        "--diagnostics",
        "--json",
    )
    summary = job_json(done)
    assert "memory per worker" not in done.stderr  # Ray Data's advice to set an argument of ours

    m = summary["metrics"]
    print(f"ImageNet samples: top-1 {m['top1']:.3f}, top-5 {m['top_k_accuracy']:.3f}")
    assert summary["images"] == 1000 and summary["matched_by"] == "position"
    assert m["top1"] >= 0.80 and m["top_k_accuracy"] >= 0.94
    assert m["auc_classes"] == 1000 and 0 <= m["ece"] < 0.15
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == m and report["model"]["arch"] == "mobilenet_v2"
    for name in (
        "confusion_matrix.png",
        "reliability.png",
        "filters.png",
        "confident_mistakes.png",
    ):
        assert png_size((out / name).read_bytes())[0] > 0
    header = next(csv.reader((out / "confusion_matrix.csv").open()))
    assert len(header) == 1001 and header[1] == "tench"


def test_the_scorer_actor_starts_without_the_report_libraries():
    """Its process loads the artifact only; plots and metrics run on the driver."""
    assert imported_by("clf.evaluate.scorer", {"matplotlib", "sklearn", "torchvision"}) == []


@pytest.mark.slow
def test_both_paths_score_a_split_alike(cifar_small, tmp_path):
    """400 test images scored in the job's process (the default for so few) and through the
    Ray pipeline: the same images, the same metrics."""
    torch.manual_seed(0)
    art = str(tmp_path / "art")
    classes = json.loads(open(f"{cifar_small}/classes.json").read())
    export_artifact(
        create_model("small_cnn", len(classes)).eval(),
        art,
        arch="small_cnn",
        classes=classes,
        preprocess=Preprocess(input_size=32, resize=32),
        formats=("onnx",),
    )
    reports = {}
    for path, small_input in (("in-process", "1000"), ("ray", "0")):
        args = ["--model", art, "--data", f"{cifar_small}/test"]
        args += ["--output", str(tmp_path / path), "--small-input", small_input, "--json"]
        job_json(run_job("jobs.evaluate", *args))
        reports[path] = json.loads((tmp_path / path / "report.json").read_text())
    here, ray = reports["in-process"]["metrics"], reports["ray"]["metrics"]
    assert here["images"] == ray["images"] == 400
    for name, value in here.items():
        if isinstance(value, float):
            assert value == pytest.approx(ray[name], abs=1e-5), name
        else:
            assert value == ray[name], name
