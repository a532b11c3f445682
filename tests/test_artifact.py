"""Artifacts are self-describing, match eager PyTorch in every format on real images, and refuse
tampered files and exports that fail their parity check."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, ROOT, imported_by, run_in_process

from clf.artifact import formats, onnx_cpu
from clf.artifact.classifier import load_classifier, top_k
from clf.artifact.export import RANDOM_SAMPLE, export_artifact
from clf.artifact.onnx_cpu import OnnxCpuClassifier
from clf.artifact.sample import load_sample
from clf.artifact.torch_model import TorchClassifier, load_torch
from clf.errors import ModelLoadError, UsageError
from clf.images.preprocess import Preprocess
from clf.models import create_model

SPEC = Preprocess(input_size=32, resize=36)
CLASSES = ["ants", "bees"]


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", 3).eval()
    meta = export_artifact(
        model, str(tmp_path), arch="small_cnn", classes=["a", "b", "c"], preprocess=SPEC
    )
    return model, meta, tmp_path


@pytest.fixture(scope="module")
def val_sample():
    """64 real hymenoptera val photos, with their labels."""
    return load_sample(str(HYMENOPTERA / "val"), SPEC, CLASSES, limit=64)


@pytest.fixture(scope="module")
def all_formats(val_sample, tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("small_cnn", 2).eval()
    folder = tmp_path_factory.mktemp("all-formats")
    meta = export_artifact(
        model,
        str(folder),
        arch="small_cnn",
        classes=CLASSES,
        preprocess=SPEC,
        formats=("onnx", "int8", "torchscript"),
        sample=val_sample.images,
        labels=val_sample.labels,
        sample_source=val_sample.source,
    )
    return model, meta, folder


def test_meta_describes_the_model(exported):
    _, meta, folder = exported
    on_disk = json.loads((folder / "meta.json").read_text())
    assert on_disk == meta
    for key in (
        "format",
        "arch",
        "num_classes",
        "classes",
        "input_size",
        "resize",
        "crop",
        "interpolation",
        "mean",
        "std",
        "created_at",
        "source_run",
        "metrics",
        "sha256",
    ):
        assert key in meta
    assert meta["num_classes"] == 3 and meta["crop"] == 32
    assert meta["parity"]["sample"] == RANDOM_SAMPLE  # no real images were given


def test_loaded_artifact_matches_eager(exported):
    model, _, folder = exported
    loaded = load_torch(str(folder))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5)
    assert loaded.classes == ["a", "b", "c"] and loaded.preprocess == SPEC


def test_probabilities_are_the_softmax_of_the_logits_of_normalized_pixels(exported):
    model, _, folder = exported
    loaded = load_torch(str(folder))
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    on_device = loaded.to_device(pixels.numpy())
    assert on_device.device == torch.device("cpu") and torch.equal(on_device, pixels)
    probs = loaded.probabilities(on_device)
    with torch.no_grad():
        expected = torch.softmax(model(SPEC.normalize(pixels)), dim=1)
    assert probs.dtype == torch.float32 and torch.allclose(probs, expected, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(4))


def test_tampered_model_file_is_refused(exported):
    _, _, folder = exported
    (folder / "model.ts").write_bytes((folder / "model.ts").read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_torch(str(folder))


def test_one_folder_holds_every_format_each_with_its_sha256(all_formats):
    _, meta, folder = all_formats
    assert meta["format"] == "onnx"  # the first listed is the default
    assert meta["files"] == {
        "onnx": "model.onnx",
        "int8": "model.int8.onnx",
        "torchscript": "model.ts",
    }
    assert meta["sha256"] == meta["file_sha256"]["onnx"]
    assert len(set(meta["file_sha256"].values())) == 3
    assert all((folder / name).is_file() for name in meta["files"].values())
    assert meta["parity"]["sample"] == "64 images from " + str(HYMENOPTERA / "val")


def test_onnx_round_trip_matches_eager_on_real_images(all_formats, val_sample):
    model, meta, folder = all_formats
    assert meta["parity"]["onnx"]["max_abs_logit_diff"] <= formats.ONNX_ATOL == 1e-3
    assert meta["parity"]["onnx"]["top1_agreement"] == 1.0
    loaded = load_torch(str(folder))
    assert loaded.format == "onnx" and loaded.model_id == meta["sha256"][:12]
    images = val_sample.images
    with torch.inference_mode():
        expected, got = model(images), loaded.module(images)
        single = loaded.module(images[:1])  # the batch axis is dynamic
    assert isinstance(got, torch.Tensor) and got.shape == (64, 2)
    assert float((expected - got).abs().max()) <= 1e-3
    assert torch.equal(expected.argmax(1), got.argmax(1))
    assert torch.allclose(single, got[:1], atol=1e-5)


def test_int8_agrees_with_fp32_and_records_the_accuracy_drop(all_formats, val_sample):
    model, meta, folder = all_formats
    report = meta["parity"]["int8"]
    assert report["top1_agreement"] >= formats.INT8_MIN_AGREEMENT == 0.99
    assert report["calibration_images"] == report["images"] == 32  # calibrated on half
    assert report["accuracy_drop"] == pytest.approx(
        report["accuracy_fp32"] - report["accuracy_int8"]
    )
    loaded = load_torch(str(folder), format="int8")
    assert loaded.format == "int8" and loaded.model_id == meta["file_sha256"]["int8"][:12]
    with torch.inference_mode():
        same = model(val_sample.images).argmax(1) == loaded.module(val_sample.images).argmax(1)
    assert float(same.float().mean()) >= formats.INT8_MIN_AGREEMENT


@pytest.mark.parametrize("fmt, channels_last", [("torchscript", True), ("onnx", False)])
def test_torchscript_is_fed_channels_last_batches_and_onnx_contiguous_ones(
    all_formats, val_sample, fmt, channels_last
):
    _, _, folder = all_formats
    x = val_sample.images[:4]
    loaded = load_torch(str(folder), format=fmt)
    module, seen = loaded.module, []
    loaded.module = lambda batch: seen.append(batch) or module(batch)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(x), module(x), atol=1e-4)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) is channels_last


def test_load_picks_the_default_format_or_the_one_asked_for(all_formats):
    _, _, folder = all_formats
    assert load_torch(str(folder)).format == "onnx"
    torchscript = load_torch(str(folder), format="torchscript")
    assert isinstance(torchscript.module, torch.jit.ScriptModule)
    assert isinstance(load_torch(str(folder), format="int8").module, formats.OnnxModule)


def test_a_format_the_artifact_lacks_is_a_usage_error(exported):
    _, _, folder = exported
    with pytest.raises(UsageError, match="holds only torchscript"):
        load_torch(str(folder), format="onnx")


def copy_with_one_byte_changed(all_formats, folder, name):
    _, meta, source = all_formats
    folder.mkdir()
    for file in [*meta["files"].values(), "meta.json"]:
        (folder / file).write_bytes((source / file).read_bytes())
    changed = folder / name
    changed.write_bytes(changed.read_bytes()[:-1] + b"\1")
    return str(folder)


def test_sha_mismatch_of_the_loaded_file_is_refused(all_formats, tmp_path):
    copy = copy_with_one_byte_changed(all_formats, tmp_path / "copy", "model.int8.onnx")
    load_torch(copy, format="onnx")  # the other files are untouched
    with pytest.raises(ModelLoadError, match="model.int8.onnx does not match its sha256"):
        load_torch(copy, format="int8")


def test_an_onnx_artifact_on_the_cpu_gives_torchs_probabilities_through_onnxruntime_alone(
    all_formats, exported
):
    _, meta, folder = all_formats
    on_cpu = load_classifier(str(folder), prefer_gpu=False, threads=1)
    through_torch = load_torch(str(folder))
    assert isinstance(on_cpu, OnnxCpuClassifier) and through_torch.format == on_cpu.format == "onnx"
    pixels = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    probs = on_cpu.predict_proba(pixels)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert np.allclose(probs, through_torch.predict_proba(pixels), atol=1e-6)
    assert on_cpu.classes == CLASSES and on_cpu.model_id == meta["sha256"][:12]
    # TorchScript, and any artifact beside a GPU, load through torch.
    assert isinstance(load_classifier(str(exported[2]), prefer_gpu=False), TorchClassifier)
    assert isinstance(load_classifier(str(folder), prefer_gpu=True), TorchClassifier)


def test_the_onnx_cpu_classifier_runs_a_few_images_a_call_with_the_same_probabilities(
    all_formats, monkeypatch
):
    """Small calls keep onnxruntime's activations in cache (RESULTS.md: 9.0 against 9.8-11.1
    ms of CPU an image); splitting a batch must not change any probability."""
    _, _, folder = all_formats
    on_cpu = load_classifier(str(folder), prefer_gpu=False, threads=1)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    whole = on_cpu.predict_proba(pixels)
    calls = []
    session = on_cpu.session

    class CountingSession:
        def run(self, outputs, feeds):
            calls.append(len(next(iter(feeds.values()))))
            return session.run(outputs, feeds)

    on_cpu.session = CountingSession()
    monkeypatch.setattr(onnx_cpu, "CALL_PIXELS", 2 * 32 * 32)
    assert np.allclose(on_cpu.predict_proba(pixels), whole, atol=1e-6)
    assert calls == [2, 2, 1]


def test_the_onnx_cpu_classifier_refuses_a_tampered_file(all_formats, tmp_path):
    copy = copy_with_one_byte_changed(all_formats, tmp_path / "copy", "model.onnx")
    with pytest.raises(ModelLoadError, match="model.onnx does not match its sha256"):
        load_classifier(copy, prefer_gpu=False)


def test_top_k_gives_each_rows_most_probable_classes_best_first():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    scores, indices = top_k(probs, 2)
    assert indices.tolist() == [[1, 2], [0, 2]]
    assert np.array_equal(scores, np.array([[0.6, 0.3], [0.5, 0.3]], dtype=np.float32))


def export_two_class_cnn(folder, **options):
    """A fresh two-class small CNN exported to ``folder`` with ``options``."""
    return export_artifact(
        create_model("small_cnn", 2).eval(),
        str(folder),
        arch="small_cnn",
        classes=CLASSES,
        preprocess=SPEC,
        **options,
    )


def test_an_export_that_fails_parity_writes_nothing(val_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "ONNX_ATOL", -1.0)  # no export can pass
    with pytest.raises(ModelLoadError, match="onnx export disagrees with eager"):
        export_two_class_cnn(tmp_path, formats=("torchscript", "onnx"), sample=val_sample.images)
    assert list(tmp_path.iterdir()) == []


def test_int8_below_the_agreement_criterion_is_refused(val_sample, tmp_path):
    with pytest.raises(
        ModelLoadError, match=r"int8 export agrees with fp32 on .* \(needs at least"
    ):
        export_two_class_cnn(
            tmp_path, formats=("int8",), sample=val_sample.images, min_int8_agreement=1.01
        )
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize("n", [None, 8])
def test_int8_needs_32_real_images_to_calibrate_and_check_on(n, val_sample, tmp_path):
    with pytest.raises(UsageError, match="int8 needs at least 32 real images"):
        export_two_class_cnn(
            tmp_path, formats=("int8",), sample=None if n is None else val_sample.images[:n]
        )


def test_sample_from_shards_keeps_labels_only_when_the_classes_match(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = sorted((HYMENOPTERA / "val" / "bees").iterdir())[:3]
    pq.write_table(
        pa.table(
            {
                "key": [p.name for p in photos],
                "image": [p.read_bytes() for p in photos],
                "label": [1, 1, 1],
                "label_name": ["bees"] * 3,
            }
        ),
        tmp_path / "shard-00000.parquet",
    )
    assert load_sample(str(tmp_path), SPEC, CLASSES).labels.tolist() == [1, 1, 1]
    assert load_sample(str(tmp_path), SPEC, ["cats", "dogs"]).labels is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["jobs.predict", "--format", "tflite", "--model", "/x", "a.jpg"], "--format"),
        (["jobs.export", "--run", "/r", "--format", "onnx,tflite", "--output", "/a"], "tflite"),
        (["jobs.export", "--run", "/r", "--format", "onnx,onnx", "--output", "/a"], "twice"),
        (
            [
                "jobs.export",
                "--model",
                "mobilenet_v2",
                "--pretrained",
                "/w",
                "--classes",
                "imagenet",
            ]
            + ["--format", "onnx,int8", "--output", "/a"],
            "--format int8 needs --sample",
        ),
    ],
)
def test_bad_format_is_a_one_line_usage_error(args, message):
    done = run_in_process(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_export_refuses_pretrained_weights_whose_head_has_another_class_count(
    mobilenet_weights, tmp_path
):
    """Resizing the head would export a randomly initialised classifier that passes parity."""
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    done = run_in_process(
        "jobs.export",
        *("--model", "mobilenet_v2", "--pretrained", mobilenet_weights),
        *("--classes", str(tmp_path / "classes.json"), "--output", str(tmp_path / "art")),
    )
    assert done.returncode == 2
    assert "hold a 1000-class head, not the 2 classes asked for" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art").exists()


def test_predict_starts_without_torchvision():
    """It crops as the label job does; torchvision (with torch._dynamo) was 3 s of the 7.9 s
    that one image's prediction took."""
    assert imported_by("clf.inference.in_process", {"torchvision"}) == []


def test_predicting_with_an_onnx_artifact_never_imports_torch(all_formats):
    """torch was 2.3 s of CPU at the start of every prediction, and ONNX does not need it."""
    _, _, folder = all_formats
    bee = str(sorted((HYMENOPTERA / "val" / "bees").iterdir())[0])
    then = (
        f"assert clf.inference.in_process.predict({str(folder)!r}, [{bee!r}])['format'] == 'onnx'"
    )
    assert imported_by("jobs.predict, clf.inference.in_process", {"torch"}, then=then) == []


def test_predict_a_format_the_artifact_lacks_is_a_one_line_usage_error(exported):
    _, _, folder = exported
    bee = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]
    done = run_in_process("jobs.predict", "--model", str(folder), "--format", "int8", str(bee))
    assert done.returncode == 2 and "holds only torchscript" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_predict_prints_top_k_per_image_and_json(all_formats):
    _, _, folder = all_formats
    bees = [str(p) for p in sorted((HYMENOPTERA / "val" / "bees").iterdir())[:2]]
    command = [sys.executable, "-m", "jobs.predict", "--model", str(folder), "--top-k", "1"]
    text = subprocess.run([*command, *bees], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == bees[0] and lines[2] == bees[1] and len(lines) == 4
    assert lines[1].startswith("  1. ") and lines[1].endswith("%")
    done = subprocess.run(
        [*command, "--json", "--format", "int8", *bees],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    output = json.loads(line)
    assert output["format"] == "int8" and len(output["results"]) == 2
    assert all(len(r["top"]) == 1 and r["error"] is None for r in output["results"])


def test_predict_reports_an_unreadable_image_and_exits_1(all_formats, tmp_path):
    _, _, folder = all_formats
    bee = str(sorted((HYMENOPTERA / "val" / "bees").iterdir())[0])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    done = run_in_process("jobs.predict", "--model", str(folder), "--json", bee, str(broken))
    assert done.returncode == 1
    results = json.loads(done.stdout)["results"]
    assert results[0]["error"] is None and len(results[0]["top"]) == 2
    assert results[1]["image"] == str(broken) and results[1]["error"]
    assert done.stderr.strip() == "jobs.predict: error: 1 of 2 images could not be classified"


def test_predict_refuses_a_folder_before_loading_the_model(exported):
    _, _, folder = exported
    done = run_in_process("jobs.predict", "--model", str(folder), str(HYMENOPTERA))
    assert done.returncode == 2
    assert f"{HYMENOPTERA}: a folder, not an image file" in done.stderr


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_reference_keeps_the_parity_checks_rows_and_they_are_what_the_artifact_says(
    fmt, tmp_path, monkeypatch
):
    """The sample's images are not run again for the reference: their rows come from the
    default format's logits in its parity check, and match running the artifact's file."""
    import pyarrow.parquet as pq

    from clf.artifact import reference
    from clf.artifact.reference import REFERENCE_FILE, record_reference

    run_again = []
    predict = reference.predict_encoded
    monkeypatch.setattr(
        reference,
        "predict_encoded",
        lambda m, images: predict(m, run_again.extend(images) or images),
    )

    val = str(HYMENOPTERA / "val")
    sample = load_sample(val, SPEC, CLASSES, limit=16)
    torch.manual_seed(0)
    model = create_model("small_cnn", 2).eval()
    meta = export_artifact(
        model, str(tmp_path), arch="small_cnn", classes=CLASSES, preprocess=SPEC,
        formats=(fmt,), sample=sample.images, sample_uris=sample.uris, reference=val,
    )  # fmt: skip
    reused = pq.read_table(tmp_path / REFERENCE_FILE).to_pylist()
    assert meta["reference"]["rows"] == len(reused) > len(sample.uris) == 16
    assert len(run_again) == len(reused) - 16
    record_reference(str(tmp_path), val)  # every image through the artifact's file
    again = pq.read_table(tmp_path / REFERENCE_FILE).to_pylist()
    assert [r["uri"] for r in reused] == [r["uri"] for r in again]
    for first, second in zip(reused, again):
        assert first["topk_labels"] == second["topk_labels"] and first["error"] is None
        assert first["model"] == second["model"] == meta["sha256"][:12]
        assert first["topk_scores"] == pytest.approx(second["topk_scores"], abs=1e-5)
