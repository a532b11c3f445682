"""Label stages without a cluster: decode never raises, rows follow DESIGN.md's schema."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from clf import artifact
from clf.labeling import LABEL_SCHEMA, Predictor, decode_batch, list_inputs, part_name
from clf.models import create_model
from clf.transforms import Preprocess

SPEC = Preprocess(input_size=32, resize=36)


def test_decode_batch_turns_every_file_into_pixels_or_a_reason(bad_files_dir):
    uris = sorted(str(p) for p in bad_files_dir.iterdir())
    out = decode_batch({"uri": np.array(uris, dtype=object)}, SPEC.to_meta(), 10**8)
    reasons = {u.rsplit("/", 1)[1]: e for u, e in zip(out["uri"], out["error"])}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"] == "not an image"
    assert reasons["truncated.jpg"] in ("truncated JPEG", "corrupt JPEG")
    assert reasons["imageNotFound.gif"].startswith("blank or placeholder image")
    good = [i for i, e in enumerate(out["error"]) if e == ""]
    assert len(good) == 6 and out["pixels"].shape == (len(uris), 3, 32, 32)
    assert all(out["pixels"][i].std() > 0 for i in good)


@pytest.fixture
def small_artifact(tmp_path):
    torch.manual_seed(0)
    artifact.export(
        create_model("small_cnn", 4).eval(),
        str(tmp_path),
        arch="small_cnn",
        classes=["w", "x", "y", "z"],
        preprocess=SPEC,
    )
    return str(tmp_path)


def test_predictor_rows_have_the_label_schema_and_null_on_error(small_artifact):
    predictor = Predictor(small_artifact, top_k=3, prefer_gpu=False)
    batch = {
        "uri": np.array(["a.jpg", "b.jpg"], dtype=object),
        "pixels": np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "error": np.array(["", "corrupt JPEG"], dtype=object),
    }
    table = predictor(batch)
    assert table.schema == LABEL_SCHEMA
    good, bad = table.to_pylist()
    assert good["error"] is None and good["label"] == good["topk_labels"][0]
    assert len(good["topk_scores"]) == 3 and good["confidence"] == pytest.approx(
        good["topk_scores"][0]
    )
    assert sorted(good["topk_scores"], reverse=True) == good["topk_scores"]
    assert bad["error"] == "corrupt JPEG"
    assert all(
        bad[k] is None for k in ("label", "label_id", "confidence", "topk_labels", "topk_scores")
    )
    assert good["model"] == bad["model"] == artifact.read_meta(small_artifact)["sha256"][:12]


def test_part_names_depend_only_on_the_inputs_covered():
    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a", "c"])


def test_shard_inputs_are_addressed_by_shard_and_key(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"key": ["x/1.jpg", "x/2.jpg"], "image": [b"", b""]}), tmp_path / "s.parquet"
    )
    inputs = list_inputs(str(tmp_path))
    assert inputs.kind == "shards"
    assert inputs.uris == [f"{tmp_path}/s.parquet#x/1.jpg", f"{tmp_path}/s.parquet#x/2.jpg"]
