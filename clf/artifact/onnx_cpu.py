"""An ONNX artifact on the CPU, run by onnxruntime and numpy alone: its process never imports
torch, which a CPU labelling job would otherwise pay for before its first batch while decode
tasks need the same cores (RESULTS.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from clf.artifact.meta import model_id, read_model_file
from clf.images.preprocess import Preprocess


def onnx_session(blob: bytes, threads: int | None, cuda: bool = False):
    """An onnxruntime session on ``threads`` CPU threads (None: one per core, onnxruntime's
    default, too many for an actor beside others), on CUDA too when asked and available."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or 0
    # A predictor's threads share cores with decode tasks: a spinning idle thread holds a
    # core they need (RESULTS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(blob, options, providers=providers)


def softmax(logits: np.ndarray) -> np.ndarray:
    # Not scipy.special.softmax: importing scipy would slow every actor's start.
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


# Pixels per onnxruntime call on a CPU: a few images' activations stay in cache, so small calls
# cost less CPU an image than large batches (RESULTS.md).
CALL_PIXELS = 4 * 224 * 224


class OnnxCpuClassifier:
    """An ONNX artifact in onnxruntime on the CPU: a ``Classifier``."""

    device = "cpu"

    def __init__(
        self,
        uri: str,
        threads: int | None = None,
        format: str | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.meta, self.format, blob = read_model_file(uri, format, meta)
        self.preprocess = Preprocess.from_meta(self.meta)
        self.session = onnx_session(blob, threads)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def model_id(self) -> str:
        return model_id(self.meta, self.format)

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NCHW pixels -> float32 class probabilities, a few images per model call."""
        per_call = max(1, CALL_PIXELS // (pixels.shape[2] * pixels.shape[3]))
        logits = [
            self._logits(pixels[start : start + per_call])
            for start in range(0, len(pixels), per_call)
        ]
        return softmax(np.concatenate(logits) if logits else self._logits(pixels))

    def _logits(self, pixels: np.ndarray) -> np.ndarray:
        normalized = self.preprocess.normalize_array(pixels)
        (logits,) = self.session.run(None, {self.input_name: normalized})
        return logits.astype(np.float32, copy=False)
