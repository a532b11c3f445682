"""Zero-shot CLIP artifacts: jobs.export builds one from class names and open_clip weights on
disk, never a hub, and every job runs it as an ordinary classifier.

No package ships CLIP weights, so a tiny open_clip model of a custom config (a few million
random parameters) goes through the real loading path."""

import json
import os
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import HYMENOPTERA, job_json, run_in_process, run_job

from clf.artifact.classifier import load_classifier
from clf.config import DEFAULT_MAX_PIXELS
from clf.images.preprocess import eval_pixels
from clf.zeroshot.head import DEFAULT_PROMPTS

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
CLASSES = ["ant", "bee", "flower"]
PHOTOS = (
    sorted((HYMENOPTERA / "val" / "ants").iterdir())[:3]
    + sorted((HYMENOPTERA / "val" / "bees").iterdir())[:3]
)


def tiny_clip(folder, config=TINY):
    """An open_clip model of ``config`` with random weights, saved as open_clip saves one."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": PREPROCESS})
    )
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return model.eval()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip") / "model"
    return folder, tiny_clip(folder)


@pytest.fixture(scope="module")
def classes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("zs-classes") / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def zero_shot_artifact(clip_folder, classes_file, tmp_path_factory):
    folder, _ = clip_folder
    out = str(tmp_path_factory.mktemp("zs-art") / "art")
    done = run_in_process(
        "jobs.export", "--model", "clip:tiny", "--pretrained", str(folder),
        "--classes", classes_file, "--format", "onnx,torchscript", "--output", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def reference_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """open_clip's own zero-shot classifier over the same pixels."""
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    mean = torch.tensor(PREPROCESS["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(PREPROCESS["std"]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSES, DEFAULT_PROMPTS)
        images = (torch.from_numpy(pixels).float() - mean) / std
        features = model.encode_image(images, normalize=True)
        return torch.softmax(model.logit_scale.exp() * features @ head, dim=1).numpy()


def photo_pixels(spec) -> np.ndarray:
    return np.stack([eval_pixels(p.read_bytes(), spec, DEFAULT_MAX_PIXELS) for p in PHOTOS])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_artifact_gives_open_clips_zero_shot_probabilities_on_real_photos(
    zero_shot_artifact, clip_folder, fmt
):
    model = load_classifier(zero_shot_artifact, prefer_gpu=False, format=fmt)
    pixels = photo_pixels(model.preprocess)
    expected = reference_probabilities(clip_folder[1], pixels)
    np.testing.assert_allclose(model.predict_proba(pixels), expected, atol=1e-4)


def test_meta_holds_the_class_names_prompts_clip_preprocessing_and_parity(zero_shot_artifact):
    meta = json.loads(open(os.path.join(zero_shot_artifact, "meta.json")).read())
    assert meta["arch"] == "clip:tiny" and meta["classes"] == CLASSES
    assert meta["metrics"]["zero_shot"]["prompts"][0] == "a photo of a {}."
    assert (meta["input_size"], meta["resize"], meta["interpolation"]) == (64, 64, "bicubic")
    assert meta["mean"] == pytest.approx(PREPROCESS["mean"])
    for fmt in ("onnx", "torchscript"):
        assert meta["parity"][fmt]["top1_agreement"] == 1.0


def test_no_job_that_runs_the_artifact_imports_open_clip(zero_shot_artifact):
    from conftest import imported_by

    then = f"from clf.artifact.classifier import load_classifier; load_classifier({zero_shot_artifact!r}, False)"
    assert imported_by("clf.artifact.classifier", {"open_clip"}, then) == []


@pytest.mark.slow
def test_jobs_label_gives_one_row_per_photo_and_jobs_predict_agrees(zero_shot_artifact, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        (folder / photo.name).write_bytes(photo.read_bytes())
    done = run_job("jobs.label", "--model", zero_shot_artifact, "--input", str(folder),
                   "--output", str(tmp_path / "labels"), "--json")  # fmt: skip
    assert job_json(done)["labelled"] == len(PHOTOS)
    rows = {os.path.basename(r["uri"]): r for r in pq.read_table(tmp_path / "labels").to_pylist()}
    assert sorted(rows) == sorted(p.name for p in PHOTOS)
    assert {r["label"] for r in rows.values()} <= set(CLASSES)
    done = run_in_process("jobs.predict", "--model", zero_shot_artifact, "--json",
                          *(str(folder / p.name) for p in PHOTOS))  # fmt: skip
    for result in json.loads(done.stdout)["results"]:
        row = rows[os.path.basename(result["image"])]
        assert [t["label"] for t in result["top"]] == row["topk_labels"]
        np.testing.assert_allclose(
            [t["probability"] for t in result["top"]], row["topk_scores"], atol=1e-5
        )


def test_a_state_dict_file_for_a_registered_architecture_exports_too(
    clip_folder, classes_file, tmp_path
):
    import open_clip

    (tmp_path / "clf-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "clf-tiny.json")
    weights = tmp_path / "tiny.pt"
    torch.save(clip_folder[1].state_dict(), weights)
    done = run_in_process(
        "jobs.export", "--model", "clip:clf-tiny", "--pretrained", str(weights),
        "--classes", classes_file, "--format", "onnx", "--output", str(tmp_path / "art"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_exporting_attempts_no_network_access(clip_folder, classes_file, tmp_path, monkeypatch):
    """Every connection or name lookup off this machine is refused and recorded; the machine's
    own names and addresses stay open for whatever else the test process runs (moto, a Ray of
    earlier tests)."""
    here = {None, "127.0.0.1", "::1", "localhost", socket.gethostname(), socket.getfqdn()}
    here.add(socket.gethostbyname(socket.gethostname()))
    attempts = []

    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in here:
            attempts.append(address)
            raise OSError("network access blocked by the test")
        return real_connect(self, address, *args)

    def refuse_lookup(host, *args, **kwargs):
        if host not in here:
            attempts.append(host)
            raise socket.gaierror("name lookups blocked by the test")
        return real_lookup(host, *args, **kwargs)

    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    done = run_in_process(
        "jobs.export", "--model", "clip:tiny", "--pretrained", f"local-dir:{clip_folder[0]}",
        "--classes", classes_file, "--format", "onnx", "--output", str(tmp_path / "art"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert attempts == []


def test_missing_weights_are_one_line_naming_the_file(classes_file, tmp_path):
    done = run_in_process(
        "jobs.export", "--model", "clip:ViT-B-32", "--pretrained", str(tmp_path / "nope.pt"),
        "--classes", classes_file, "--output", str(tmp_path / "art"),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"jobs.export: error: --pretrained {tmp_path / 'nope.pt'}: no such file or folder"
    )


def test_weights_of_another_architecture_are_one_line_with_the_count_of_missing_keys(
    clip_folder, classes_file, tmp_path
):
    other = tmp_path / "other"
    narrower = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 1}}
    tiny_clip(other, narrower)
    weights = other / "open_clip_model.safetensors"
    config = clip_folder[0] / "open_clip_config.json"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "open_clip_config.json").write_bytes(config.read_bytes())
    (mixed / "open_clip_model.safetensors").write_bytes(weights.read_bytes())
    done = run_in_process(
        "jobs.export", "--model", "clip:tiny", "--pretrained", str(mixed),
        "--classes", classes_file, "--output", str(tmp_path / "art"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    named = mixed / "open_clip_model.safetensors"
    assert f"--pretrained {named}: does not fit clip:tiny (" in done.stderr
    assert "missing keys" in done.stderr and not done.stderr.count("(0 missing keys")


def test_prompts_from_a_file_must_each_hold_a_place_for_the_class(classes_file, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {}.\na drawing\n")
    done = run_in_process(
        "jobs.export", "--model", "clip:tiny", "--pretrained", str(tmp_path),
        "--classes", classes_file, "--prompts", str(prompts), "--output", str(tmp_path / "a"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "expected one template with {} per line" in done.stderr


def test_training_a_clip_model_starts_from_the_zero_shot_head_of_the_runs_classes(clip_folder):
    import open_clip

    from clf.training.network import create_network, network_preprocess

    folder, model = clip_folder
    network = create_network("clip:tiny", ["ants", "bees"], str(folder))
    with torch.no_grad():
        text = open_clip.build_zero_shot_classifier(
            model, open_clip.tokenizer.SimpleTokenizer(), ["ants", "bees"], DEFAULT_PROMPTS
        )
    expected = text.T * model.logit_scale.exp()
    torch.testing.assert_close(network.head.weight, expected, atol=1e-5, rtol=1e-5)
    assert network_preprocess("clip:tiny", str(folder)).input_size == 64


def test_training_a_clip_model_without_weights_is_refused_before_ray_starts(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"counts": {"train": 4, "val": 2}}))
    done = run_in_process(
        "jobs.train", "--data", str(data), "--model", "clip:ViT-B-32", "--output", str(tmp_path / "r")
    )  # fmt: skip
    assert done.returncode == 2
    assert "--model clip:ViT-B-32 needs --pretrained CLIP weights" in done.stderr


@pytest.mark.slow
def test_jobs_train_fine_tunes_a_clip_model_for_an_epoch_and_its_artifact_labels(
    clip_folder, tmp_path
):
    data, run = tmp_path / "data", tmp_path / "run"
    job_json(run_job("jobs.ingest", "--src", str(HYMENOPTERA), "--dst", str(data), "--json"))
    trained = job_json(
        run_job(
            "jobs.train",
            "--data",
            str(data),
            "--model",
            "clip:tiny",
            "--pretrained",
            str(clip_folder[0]),
            "--output",
            str(run),
            "--epochs",
            "1",
            "--workers",
            "2",
            "--batch-size",
            "16",
            "--strategy",
            "two-phase",
            "--head-epochs",
            "0",
            "--json",
        )  # fmt: skip
    )
    assert trained["epochs_run"] == 1 and trained["model"] == str(run / "model")
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["arch"] == "clip:tiny" and meta["classes"] == ["ants", "bees"]
    assert meta["input_size"] == 64 and meta["interpolation"] == "bicubic"
    labels = tmp_path / "labels"
    done = run_job("jobs.label", "--model", str(run / "model"), "--input", str(data / "val"),
                   "--output", str(labels), "--json")  # fmt: skip
    val = json.loads((data / "manifest.json").read_text())["counts"]["val"]
    assert job_json(done)["labelled"] == sum(val.values()) == 153


def test_imagenet_prompts_are_open_clips_80_templates():
    from clf.zeroshot.head import resolve_prompts

    prompts = resolve_prompts("imagenet")
    assert len(prompts) == 80 and all("{}" in p for p in prompts)


def test_weights_in_a_bucket_export_as_from_disk(clip_folder, classes_file, bucket, tmp_path):
    import boto3

    name = bucket.removeprefix("s3://")
    for path in clip_folder[0].iterdir():
        boto3.client("s3").upload_file(str(path), name, f"weights/tiny/{path.name}")
    out = tmp_path / "art"
    done = run_in_process(
        "jobs.export", "--model", "clip:tiny", "--pretrained", f"{bucket}/weights/tiny",
        "--classes", classes_file, "--format", "onnx", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    model = load_classifier(str(out), prefer_gpu=False)
    pixels = photo_pixels(model.preprocess)
    expected = reference_probabilities(clip_folder[1], pixels)
    np.testing.assert_allclose(model.predict_proba(pixels), expected, atol=1e-4)
