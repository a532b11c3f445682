"""The model artifact: a folder that labels, evaluates and predicts without our training code.

``meta.json`` describes the model (classes, preprocessing, provenance) and lists its files, one
per format (TorchScript, ONNX, int8 ONNX), each with its sha256. None of them needs the model's
Python class, and none runs pickled code when loaded. ``format`` is the one loaded by default.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from clf import formats as fmts
from clf import storage
from clf.artifact_meta import FORMATS, file_sha256, read_model_file
from clf.errors import UsageError
from clf.images.preprocess import Preprocess

RANDOM_SAMPLE = "random tensors (no real images given)"


@dataclass
class Artifact:
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
            images = images.contiguous(memory_format=torch.channels_last)
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
        """The loaded file's sha256, first 12 hex characters."""
        return file_sha256(self.meta, self.format)[:12]


def export(
    model: nn.Module,
    output: str,
    *,
    arch: str,
    classes: list[str],
    preprocess: Preprocess,
    formats: tuple[str, ...] = ("torchscript",),
    source_run: str | None = None,
    metrics: dict[str, Any] | None = None,
    sample: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    sample_source: str | None = None,
    min_int8_agreement: float | None = None,
) -> dict[str, Any]:
    """Write the artifact in every format of ``formats``; the first is the default one.

    ``sample`` (normalized float NCHW, real images) is what each format is checked on, and what
    int8 is calibrated on; ``labels``, if given, add the accuracy drop of int8 to meta.json.
    Any check that fails raises ``ModelLoadError`` before anything is written.
    """
    check_formats(formats)
    if "int8" in formats and (sample is None or len(sample) < fmts.INT8_MIN_IMAGES):
        raise UsageError(
            f"int8 needs at least {fmts.INT8_MIN_IMAGES} real images to calibrate and check on, "
            f"got {0 if sample is None else len(sample)} (give more with --sample)"
        )
    if sample is None:
        sample = torch.randn(4, 3, preprocess.input_size, preprocess.input_size)
        sample_source = RANDOM_SAMPLE
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    if min_int8_agreement is None:
        min_int8_agreement = fmts.INT8_MIN_AGREEMENT
    exported = fmts.export_all(model, formats, sample.float(), labels, min_int8_agreement)

    meta_uri = storage.join(output, "meta.json")
    storage.delete(meta_uri)  # an old meta.json must never describe the new files
    for fmt, (blob, _) in exported.items():
        storage.write_bytes(storage.join(output, fmts.FILES[fmt]), blob)
    sha = {fmt: hashlib.sha256(blob).hexdigest() for fmt, (blob, _) in exported.items()}
    meta = {
        "format": formats[0],
        "files": {fmt: fmts.FILES[fmt] for fmt in formats},
        "file_sha256": sha,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        **preprocess.to_meta(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": source_run,
        "metrics": metrics or {},
        "parity": {
            "sample": sample_source or "given by the caller",
            **{fmt: report for fmt, (_, report) in exported.items()},
        },
        "sha256": sha[formats[0]],
    }
    storage.write_json(meta_uri, meta)  # last: marks a complete artifact
    return meta


def parse_formats(text: str) -> tuple[str, ...]:
    """``torchscript,onnx`` -> ("torchscript", "onnx"), checked."""
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    check_formats(formats)
    return formats


def check_formats(formats: tuple[str, ...]) -> None:
    if not formats:
        raise UsageError(f"--format: give at least one of {', '.join(FORMATS)}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise UsageError(f"--format {','.join(formats)}: a format is listed twice")


def load(uri: str, device: torch.device | str = "cpu", format: str | None = None) -> Artifact:
    """Load the artifact's default format, or ``format``; the file must match its sha256."""
    meta, fmt, blob = read_model_file(uri, format)
    module = fmts.load_module(fmt, blob, device)
    return Artifact(storage.normalize(uri), meta, module, fmt, torch.device(device))
