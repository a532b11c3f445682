"""Top-k prediction for a few images, in-process (no Ray needed for a handful of files)."""

from __future__ import annotations

from typing import Any

import numpy as np

from clf import storage
from clf.artifact import classifier
from clf.config import DEFAULT_MAX_PIXELS
from clf.images.decode import DecodeError
from clf.images.preprocess import eval_pixels

BATCH = 32


def predict(
    model_uri: str, images: list[str], top_k: int = 5, format: str | None = None
) -> dict[str, Any]:
    """``{"model", "format", "results": [{"image", "error", "top": [{"label", "probability"}]}]}``."""
    model = classifier.load_classifier(model_uri, prefer_gpu=False, format=format)
    spec = model.preprocess
    results: list[dict[str, Any]] = [{"image": uri, "error": None, "top": []} for uri in images]
    pixels, rows = [], []
    for row, read in enumerate(storage.read_many(images)):
        try:  # the label job's decode and crop, so both give an image the same label
            pixels.append(eval_pixels(read.result(), spec, DEFAULT_MAX_PIXELS))
        except (DecodeError, storage.StorageError) as e:
            results[row]["error"] = str(e)
            continue
        rows.append(row)
    k = min(top_k, len(model.classes))
    for start in range(0, len(pixels), BATCH):
        probs = model.predict_proba(np.stack(pixels[start : start + BATCH]))
        scores, indices = classifier.top_k(probs, k)
        for row, values, classes in zip(rows[start : start + BATCH], scores, indices):
            results[row]["top"] = [
                {"label": model.classes[i], "probability": round(float(p), 6)}
                for p, i in zip(values, classes)
            ]
    return {"model": model.model_id, "format": model.format, "results": results}
