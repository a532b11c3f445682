"""Top-k prediction for a few images, in-process (no Ray needed for a handful of files)."""

from __future__ import annotations

from typing import Any

import torch

from clf import artifact, storage
from clf.config import DEFAULT_MAX_PIXELS
from clf.decode import DecodeError
from clf.preprocess import eval_pixels

BATCH = 32


def predict(
    model_uri: str, images: list[str], top_k: int = 5, format: str | None = None
) -> dict[str, Any]:
    """``{"model", "format", "results": [{"image", "error", "top": [{"label", "probability"}]}]}``."""
    loaded = artifact.load(model_uri, format=format)
    spec = loaded.preprocess
    results: list[dict[str, Any]] = [{"image": uri, "error": None, "top": []} for uri in images]
    pixels, rows = [], []
    for row, uri in enumerate(images):
        try:  # the label job's decode and crop, so both give an image the same label
            crop = eval_pixels(storage.read_bytes(uri), spec, DEFAULT_MAX_PIXELS)
        except (DecodeError, storage.StorageError) as e:
            results[row]["error"] = str(e)
            continue
        pixels.append(torch.tensor(crop))  # a copy: the crop is a read-only view of the image
        rows.append(row)
    k = min(top_k, len(loaded.classes))
    for start in range(0, len(pixels), BATCH):
        top = loaded.probabilities(torch.stack(pixels[start : start + BATCH])).topk(k)
        for row, values, indices in zip(rows[start : start + BATCH], top.values, top.indices):
            results[row]["top"] = [
                {"label": loaded.classes[i], "probability": round(float(p), 6)}
                for p, i in zip(values, indices)
            ]
    return {"model": loaded.model_id, "format": loaded.format, "results": results}
