"""The model artifact: a folder that labels, evaluates and predicts without our training code.

``meta.json`` describes the model (classes, preprocessing, provenance, sha256); the model file
is TorchScript, which loads without the model's Python class and without running pickled code.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clf import storage
from clf.errors import ModelLoadError, UsageError
from clf.transforms import Preprocess

FORMATS = ("torchscript",)
MODEL_FILES = {"torchscript": "model.ts"}
PARITY_ATOL = 1e-4

# TorchScript is deprecated upstream but remains the contract's pickle-free, class-free format.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")


@dataclass
class Artifact:
    uri: str
    meta: dict[str, Any]
    module: Any  # a callable: float NCHW batch -> logits

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_meta(self.meta)

    @property
    def model_id(self) -> str:
        return self.meta["sha256"][:12]


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
) -> dict[str, Any]:
    """Write the artifact; refuses (``ModelLoadError``) if the exported model disagrees with eager."""
    check_formats(formats)
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    example = (
        sample
        if sample is not None
        else torch.randn(4, 3, preprocess.input_size, preprocess.input_size)
    )
    with torch.no_grad():
        traced = torch.jit.trace(model, example[:1], check_trace=False)
        traced = torch.jit.freeze(traced)
        expected, got = model(example), traced(example)
    diff = float((expected - got).abs().max())
    if diff > PARITY_ATOL or not torch.equal(expected.argmax(1), got.argmax(1)):
        raise ModelLoadError(
            f"torchscript export disagrees with eager (max |logit diff| {diff:.2e})"
        )
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    blob = buffer.getvalue()
    storage.write_bytes(storage.join(output, MODEL_FILES["torchscript"]), blob)
    meta = {
        "format": "torchscript",
        "files": {"torchscript": MODEL_FILES["torchscript"]},
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        **preprocess.to_meta(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": source_run,
        "metrics": metrics or {},
        "parity": {"torchscript": {"max_abs_logit_diff": diff, "images": int(example.shape[0])}},
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    storage.write_json(storage.join(output, "meta.json"), meta)  # last: marks a complete artifact
    return meta


def check_formats(formats: tuple[str, ...]) -> None:
    for fmt in formats:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")


def read_meta(uri: str) -> dict[str, Any]:
    meta_uri = storage.join(uri, "meta.json")
    if not storage.exists(meta_uri):
        raise UsageError(f"--model {uri}: not a model artifact (no meta.json)")
    return storage.read_json(meta_uri)


def load(uri: str, device: torch.device | str = "cpu") -> Artifact:
    meta = read_meta(uri)
    blob = storage.read_bytes(storage.join(uri, meta["files"][meta["format"]]))
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ModelLoadError(f"{uri}: model file does not match the sha256 in meta.json")
    module = torch.jit.load(io.BytesIO(blob), map_location=device).eval()
    return Artifact(storage.normalize(uri), meta, module)
