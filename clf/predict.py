"""Top-k prediction for a few images, in-process (no Ray needed for a handful of files)."""

from __future__ import annotations

from typing import Any

import torch

from clf import artifact, storage
from clf.decode import DecodeError, decode_image
from clf.transforms import eval_transform, normalize


def predict(model_uri: str, images: list[str], top_k: int = 5) -> list[dict[str, Any]]:
    loaded = artifact.load(model_uri)
    spec = loaded.preprocess
    transform = eval_transform(spec)
    results = []
    for uri in images:
        try:
            image = decode_image(storage.read_bytes(uri), min_size=spec.resize)
        except (DecodeError, storage.StorageError) as e:
            results.append({"image": uri, "error": str(e), "top": []})
            continue
        with torch.inference_mode():
            logits = loaded.module(normalize(transform(image).unsqueeze(0), spec))
        top = torch.softmax(logits, 1)[0].topk(min(top_k, len(loaded.classes)))
        results.append(
            {
                "image": uri,
                "error": None,
                "top": [
                    {"label": loaded.classes[i], "probability": round(float(p), 6)}
                    for p, i in zip(top.values, top.indices)
                ],
            }
        )
    return results
