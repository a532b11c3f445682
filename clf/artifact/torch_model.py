"""Any artifact format through PyTorch, on a CPU or a GPU: TorchScript, or ONNX behind a module
of the same interface (``formats.OnnxModule``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from clf import storage
from clf.artifact import formats as fmts
from clf.artifact.meta import model_id, read_model_file
from clf.images.preprocess import Preprocess


@dataclass
class TorchClassifier:
    """A loaded artifact file as a torch module: a ``Classifier`` that also serves tensors on its
    device (GPU decode, diagnostics)."""

    uri: str
    meta: dict[str, Any]
    module: Any  # a callable: float NCHW batch -> logits
    format: str = "torchscript"
    device: torch.device = torch.device("cpu")

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @cached_property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_meta(self.meta)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a normalized float NCHW batch. TorchScript gets the batch channels_last, in
        which oneDNN's and cuDNN's convolutions run faster (frozen NCHW weights follow it)."""
        if self.format == "torchscript":
            images = fmts.channels_last(images)
        return self.module(images)

    def to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """Host uint8 NCHW pixels -> a tensor on the model's device (through pinned memory to a
        GPU, so the copy overlaps the previous batch's work)."""
        tensor = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NCHW pixels on the host -> float32 class probabilities on the host."""
        return self.probabilities(self.to_device(pixels)).cpu().numpy()

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels on the model's device -> float32 class probabilities; a GPU runs
        the model under bf16 autocast."""
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda, dtype=torch.bfloat16):
            logits = self.logits(self.preprocess.normalize(pixels))
        return torch.softmax(logits.float(), dim=1)

    @property
    def model_id(self) -> str:
        return model_id(self.meta, self.format)


def load_torch(
    uri: str, device: torch.device | str = "cpu", format: str | None = None
) -> TorchClassifier:
    """Load the artifact's default format, or ``format``; the file must match its sha256."""
    meta, fmt, blob = read_model_file(uri, format)
    module = fmts.load_module(fmt, blob, device)
    return TorchClassifier(storage.normalize(uri), meta, module, fmt, torch.device(device))
