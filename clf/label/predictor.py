"""The label job's model actor: probabilities in, label rows out (``sink.LABEL_SCHEMA``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clf.artifact.classifier import top_k
from clf.config import DEFAULT_MAX_PIXELS
from clf.inference.actor import Batch, ModelActor, Predictions
from clf.label.sink import LABEL_SCHEMA


class Predictor(ModelActor):
    """Turns pixel batches (``decode_batch``) or bytes-and-pixels batches (``read_batch``,
    decoded here on the GPU) into label rows; a row that failed has only its ``error``."""

    def __init__(
        self,
        model_uri: str,
        top_k: int,
        prefer_gpu: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int = 1,
    ):
        super().__init__(model_uri, prefer_gpu, max_pixels, threads)
        self.classes = np.array(self.model.classes, dtype=object)
        self.model_id = self.model.model_id
        self.top_k = min(top_k, len(self.classes))

    def rows(self, batch: Batch, predictions: Predictions) -> pa.Table:
        ok, errors = predictions.ok, predictions.errors
        n = len(ok)
        label_ids = np.zeros(n, dtype=np.int32)
        scores = np.zeros((n, self.top_k), dtype=np.float32)
        indices = np.zeros((n, self.top_k), dtype=np.int64)
        if ok.any():
            scores[ok], indices[ok] = top_k(predictions.probs, self.top_k)
            label_ids[ok] = indices[ok, 0]
        # Columnar: at thousands of rows a second, per-row Python lists cost more than the GPU.
        failed = ~ok
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * self.top_k)
        rows = {
            "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(self.classes[label_ids], pa.string(), mask=failed),
            "label_id": pa.array(label_ids, pa.int32(), mask=failed),
            "confidence": pa.array(scores[:, 0], pa.float32(), mask=failed),
            "topk_labels": pa.ListArray.from_arrays(
                offsets, pa.array(self.classes[indices.ravel()], pa.string()), mask=pa.array(failed)
            ),
            "topk_scores": pa.ListArray.from_arrays(
                offsets, pa.array(scores.ravel(), pa.float32()), mask=pa.array(failed)
            ),
            "model": pa.array([self.model_id] * n, pa.string()),
            "error": pa.array([None if good else e for e, good in zip(errors, ok)], pa.string()),
        }
        return pa.table(rows, schema=LABEL_SCHEMA)
