"""The actor of jobs.evaluate: pixel batches in, class probabilities out.

Apart from the report code, so that its process imports neither matplotlib nor scikit-learn
(1.6 s before the first batch, on the critical path of every evaluation).
"""

from __future__ import annotations

import numpy as np

from clf.artifact.classifier import load_classifier


class Scorer:
    """Actor: loads the artifact once, then turns pixel batches into class probabilities."""

    def __init__(self, model_uri: str, prefer_gpu: bool, threads: int = 1):
        self.model = load_classifier(model_uri, prefer_gpu, threads)
        self.num_classes = len(self.model.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        probs = np.zeros((len(ok), self.num_classes), dtype=np.float32)
        if ok.any():
            probs[ok] = self.model.predict_proba(batch["pixels"][ok])
        return {
            "key": batch["key"],
            "path": batch["path"],
            "label": batch["label"],
            "probs": probs,
            "error": batch["error"],
        }
