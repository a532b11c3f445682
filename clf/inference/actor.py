"""The model actor of the label and evaluate pipelines: it loads the artifact once, masks the
rows that failed to decode, and predicts the rest. A job's subclass shapes its rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clf.artifact.classifier import load_classifier
from clf.config import DEFAULT_MAX_PIXELS

Batch = dict[str, np.ndarray]


@dataclass
class Predictions:
    ok: np.ndarray  # the rows that decoded
    probs: np.ndarray | None  # their class probabilities, in order; None when none decoded
    errors: list[str]  # each row's error reason, "" where it decoded


class ModelActor:
    """Takes ``decode_batch`` rows (``pixels``) or ``read_batch`` rows (``data`` and ``kind``,
    whose JPEGs it decodes on its GPU) and returns ``rows(batch, predictions)``."""

    def __init__(
        self,
        model_uri: str,
        prefer_gpu: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int = 1,
    ):
        self.model = load_classifier(model_uri, prefer_gpu, threads)
        self.max_pixels = max_pixels

    def __call__(self, batch: Batch) -> Any:
        if "pixels" in batch:
            errors = list(batch["error"])
            ok = np.array([e == "" for e in errors], dtype=bool)
            probs = self.model.predict_proba(batch["pixels"][ok]) if ok.any() else None
        else:
            probs, errors = self._decode_and_predict(batch)
            ok = np.array([e == "" for e in errors], dtype=bool)
        return self.rows(batch, Predictions(ok, probs, errors))

    def rows(self, batch: Batch, predictions: Predictions) -> Any:
        """The job's rows of ``batch``."""
        raise NotImplementedError

    def _decode_and_predict(self, batch: Batch):
        """``read_batch`` rows -> (probabilities of the rows that decoded, every row's error),
        the JPEGs decoded on the model's device (a ``TorchClassifier``'s)."""
        import torch

        from clf.images.nvjpeg import decode_on_device

        model, kinds = self.model, batch["kind"]
        crop = model.preprocess.crop
        errors = list(batch["error"])
        pixels = torch.zeros((len(kinds), 3, crop, crop), dtype=torch.uint8, device=model.device)
        done = [i for i, kind in enumerate(kinds) if kind == "pixels"]
        if done:
            shape = (3, crop, crop)
            host = [np.frombuffer(batch["data"][i], dtype=np.uint8).reshape(shape) for i in done]
            pixels[done] = model.to_device(np.stack(host))
        jpegs = [i for i, kind in enumerate(kinds) if kind == "jpeg"]
        if jpegs:
            data = [batch["data"][i] for i in jpegs]
            decoded, reasons = decode_on_device(
                data, model.preprocess, model.device, self.max_pixels
            )
            pixels[jpegs] = decoded
            for i, reason in zip(jpegs, reasons):
                errors[i] = reason
        ok = torch.tensor([e == "" for e in errors], dtype=torch.bool, device=model.device)
        if not ok.any():
            return None, errors
        return model.probabilities(pixels[ok]).cpu().numpy(), errors
