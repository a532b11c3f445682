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
from clf.artifact.meta import model_id, read_meta
from clf.artifact.sample import sample_files
from clf.dataset.label_rows import label_table
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
    found = sample_files(images, limit)
    meta = read_meta(artifact)
    classes = list(meta["classes"])
    probs: dict[str, np.ndarray] = dict(known or {})
    errors: dict[str, str] = {}
    todo = [f for f in found if f.uri not in probs]
    if todo:
        predicted = predict_encoded(
            load_classifier(artifact, prefer_gpu=False), [f.data for f in todo]
        )
        decoded = [f.uri for f, ok in zip(todo, predicted.ok) if ok]
        probs.update(zip(decoded, predicted.probs if predicted.probs is not None else []))
        errors.update((f.uri, error) for f, error in zip(todo, predicted.errors))
    ok = np.array([f.uri in probs for f in found], dtype=bool)
    ok_probs = np.stack([probs[f.uri] for f in found if f.uri in probs]) if ok.any() else None
    scores, indices = top_k_of_rows(ok, ok_probs, min(REFERENCE_TOP_K, len(classes)))
    rows = label_table(
        [f.uri for f in found],
        ok,
        scores,
        indices,
        [errors.get(f.uri, "") for f in found],
        np.array(classes, dtype=object),
        model_id(meta, meta["format"]),
    )
    return write_reference(artifact, rows, f"{len(found)} images from {storage.normalize(images)}")


def write_reference(artifact: str, rows: pa.Table, source: str) -> dict[str, Any]:
    """``rows`` as the artifact's reference; meta.json names it, rewritten last."""
    sink = io.BytesIO()
    pq.write_table(rows, sink)
    storage.write_bytes(storage.join(artifact, REFERENCE_FILE), sink.getvalue())
    meta = read_meta(artifact)
    meta["reference"] = {"file": REFERENCE_FILE, "source": source, "rows": rows.num_rows}
    storage.write_json(storage.join(artifact, "meta.json"), meta)
    return meta
