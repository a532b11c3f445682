"""The label job's model actor: probabilities in, label rows out (``LABEL_SCHEMA``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clf.artifact.classifier import top_k_of_rows
from clf.config import DEFAULT_MAX_PIXELS
from clf.dataset.label_rows import label_table
from clf.inference.actor import Batch, ModelActor, Predictions


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
        ok = predictions.ok
        scores, indices = top_k_of_rows(ok, predictions.probs, self.top_k)
        return label_table(
            batch["uri"], ok, scores, indices, predictions.errors, self.classes, self.model_id
        )
