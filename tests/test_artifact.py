"""Artifacts are self-describing, match eager PyTorch, and refuse tampered model files."""

import json

import pytest
import torch

from clf import artifact
from clf.errors import ModelLoadError
from clf.models import create_model
from clf.transforms import Preprocess

SPEC = Preprocess(input_size=32, resize=36)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", 3).eval()
    meta = artifact.export(
        model, str(tmp_path), arch="small_cnn", classes=["a", "b", "c"], preprocess=SPEC
    )
    return model, meta, tmp_path


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


def test_loaded_artifact_matches_eager(exported):
    model, _, folder = exported
    loaded = artifact.load(str(folder))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5)
    assert loaded.classes == ["a", "b", "c"] and loaded.preprocess == SPEC


def test_tampered_model_file_is_refused(exported):
    _, _, folder = exported
    (folder / "model.ts").write_bytes((folder / "model.ts").read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        artifact.load(str(folder))
