"""The model behind the label and evaluate actors and jobs.predict: uint8 pixel batches in,
class probabilities out, both numpy.

An ONNX format off the GPU runs in ``onnx_cpu``, without torch; anything else (TorchScript, a
GPU) loads through ``torch_model``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from clf import runtime
from clf.artifact.meta import check_format_in, read_meta
from clf.artifact.onnx_cpu import OnnxCpuClassifier
from clf.images.preprocess import Preprocess

ONNX_FORMATS = ("onnx", "int8")


class Classifier(Protocol):
    """What every job runs: an artifact loaded in one of its formats."""

    meta: dict[str, Any]
    format: str
    preprocess: Preprocess

    @property
    def classes(self) -> list[str]: ...

    @property
    def model_id(self) -> str:
        """The loaded file's sha256, first 12 hex characters."""

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NCHW pixels on the host -> float32 class probabilities on the host."""


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, class indices) of each row's ``k`` most probable classes, best first."""
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, indices, axis=1), indices


def top_k_of_rows(
    ok: np.ndarray, probs: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``top_k`` of the ``ok`` rows' ``probs``, as (scores, indices) over every row; the rows
    that failed hold zeros."""
    scores = np.zeros((len(ok), k), dtype=np.float32)
    indices = np.zeros((len(ok), k), dtype=np.int64)
    if probs is not None and ok.any():
        scores[ok], indices[ok] = top_k(probs, k)
    return scores, indices


def load_classifier(
    uri: str, prefer_gpu: bool, threads: int | None = None, format: str | None = None
) -> Classifier:
    """The artifact at ``uri`` in its default format or ``format``: ``OnnxCpuClassifier`` for an
    ONNX format off the GPU, else a ``TorchClassifier``, on the GPU when there is one.
    ``threads``: CPU threads for the model (None: the runtime's default)."""
    meta = read_meta(uri)
    fmt = check_format_in(meta, uri, format)
    if not prefer_gpu and fmt in ONNX_FORMATS:
        return OnnxCpuClassifier(uri, threads and runtime.cpu_threads(threads), fmt, meta)
    from clf.artifact.torch_model import load_torch

    if threads:
        runtime.use_cpu_threads(threads)
    return load_torch(uri, runtime.torch_device(prefer_gpu), fmt)
