"""What an artifact's model says of the images it was made for: label rows of its validation
images (a run's val split, or ``--sample``), kept in the artifact as ``reference.parquet``.
``jobs.monitor`` compares a night's label rows with them."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clf import storage
from clf.artifact.classifier import load_classifier, top_k_of_rows
from clf.artifact.meta import file_sha256, read_meta
from clf.artifact.sample import SampleFile, sample_files
from clf.dataset.label_rows import label_table
from clf.inference.actor import Predictions
from clf.inference.in_process import predict_encoded

REFERENCE_FILE = "reference.parquet"
REFERENCE_IMAGES = 2000
# More than jobs.label's default, so that a night labelled with a larger --top-k still compares.
REFERENCE_TOP_K = 10


def record_reference(
    artifact: str,
    images: str,
    limit: int = REFERENCE_IMAGES,
    known: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Label up to ``limit`` of ``images`` (shards or image files) with the artifact at
    ``artifact``, as ``jobs.label`` would, and record them as its reference. ``known``: the
    artifact's probabilities of images it has already run on, by label-row uri (the export's
    parity check), which are not run again."""
    known = known or {}
    found = sample_files(images, limit)
    meta = read_meta(artifact)
    classes = list(meta["classes"])
    todo = [f for f in found if f.uri not in known]
    predictions = None
    if todo:
        model = load_classifier(artifact, prefer_gpu=False)
        predictions = predict_encoded(model, [f.data for f in todo])
    ok, probs, errors = _merge(found, known, todo, predictions, len(classes))
    k = min(REFERENCE_TOP_K, len(classes))
    scores, indices = top_k_of_rows(ok, probs, k)
    rows = label_table(
        [f.uri for f in found],
        ok,
        scores,
        indices,
        errors,
        np.array(classes, dtype=object),
        file_sha256(meta, meta["format"])[:12],
    )
    return write_reference(artifact, rows, f"{len(found)} images from {storage.normalize(images)}")


def _merge(
    found: list[SampleFile],
    known: Mapping[str, np.ndarray],
    todo: list[SampleFile],
    predictions: Predictions | None,
    classes: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ok, probabilities of the ok rows, error reasons) of ``found``, in its order, from the
    ``known`` rows and the ``predictions`` of the ``todo`` ones."""
    predicted: dict[str, tuple[np.ndarray | None, str]] = {}
    if predictions is not None:
        probs = iter(predictions.probs if predictions.probs is not None else [])
        for f, ok, error in zip(todo, predictions.ok, predictions.errors):
            predicted[f.uri] = (next(probs) if ok else None, error)
    rows = [(known[f.uri], "") if f.uri in known else predicted[f.uri] for f in found]
    ok = np.array([p is not None for p, _ in rows], dtype=bool)
    kept = [p for p, _ in rows if p is not None]
    probs = np.stack(kept).astype(np.float32) if kept else np.zeros((0, classes), np.float32)
    return ok, probs, [error for _, error in rows]


def write_reference(artifact: str, rows: pa.Table, source: str) -> dict[str, Any]:
    """``rows`` as the artifact's reference; meta.json names it, rewritten last."""
    sink = io.BytesIO()
    pq.write_table(rows, sink)
    storage.write_bytes(storage.join(artifact, REFERENCE_FILE), sink.getvalue())
    meta = read_meta(artifact)
    meta["reference"] = {"file": REFERENCE_FILE, "source": source, "rows": rows.num_rows}
    storage.write_json(storage.join(artifact, "meta.json"), meta)
    return meta
