"""The evaluate job's model actor: every row passes on with its class probabilities.

Apart from the report code, so that its process imports neither matplotlib nor scikit-learn,
which would delay the first batch of every evaluation.
"""

from __future__ import annotations

import numpy as np

from clf.inference.actor import Batch, ModelActor, Predictions

# What the decode tasks added for the model: the driver needs none of it back.
MODEL_INPUTS = ("pixels", "data", "kind")


class Scorer(ModelActor):
    def rows(self, batch: Batch, predictions: Predictions) -> Batch:
        ok = predictions.ok
        probs = np.zeros((len(ok), len(self.model.classes)), dtype=np.float32)
        if ok.any():
            probs[ok] = predictions.probs
        kept = {key: column for key, column in batch.items() if key not in MODEL_INPUTS}
        return {**kept, "probs": probs, "error": np.array(predictions.errors, dtype=object)}
