"""Prediction for a few images in the caller's process (no Ray needed for a handful), with the
label job's decode and crop, so that both give an image the same label."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from clf import storage
from clf.artifact import classifier
from clf.config import DEFAULT_MAX_PIXELS
from clf.dataset.shards import read_images
from clf.images.decode import DecodeError
from clf.images.preprocess import eval_pixels
from clf.inference.actor import Predictions

BATCH = 32


def predict_encoded(
    model: classifier.Classifier, images: Iterable[bytes | Exception], batch: int = BATCH
) -> Predictions:
    """Class probabilities of encoded ``images``; an image that failed to read (an exception in
    its place) or to decode gets its error reason instead."""
    pixels, errors = [], []
    for image in images:
        try:
            if isinstance(image, Exception):
                raise image
            pixels.append(eval_pixels(image, model.preprocess, DEFAULT_MAX_PIXELS))
            errors.append("")
        except (DecodeError, storage.StorageError) as e:
            errors.append(str(e))
    ok = np.array([e == "" for e in errors], dtype=bool)
    parts = [
        model.predict_proba(np.stack(pixels[start : start + batch]))
        for start in range(0, len(pixels), batch)
    ]
    return Predictions(ok, np.concatenate(parts) if parts else None, errors)


def predict(
    model_uri: str, images: list[str], top_k: int = 5, format: str | None = None
) -> dict[str, Any]:
    """``{"model", "format", "results": [{"image", "error", "top": [{"label", "probability"}]}]}``."""
    model = classifier.load_classifier(model_uri, prefer_gpu=False, format=format)
    found = predict_encoded(model, read_images(images))
    results: list[dict[str, Any]] = [
        {"image": uri, "error": error or None, "top": []}
        for uri, error in zip(images, found.errors)
    ]
    if found.probs is not None:
        scores, indices = classifier.top_k(found.probs, min(top_k, len(model.classes)))
        for row, values, classes in zip(np.flatnonzero(found.ok), scores, indices):
            results[row]["top"] = [
                {"label": model.classes[i], "probability": round(float(p), 6)}
                for p, i in zip(values, classes)
            ]
    return {"model": model.model_id, "format": model.format, "results": results}
