"""Model file formats: export each one from an eager model, check it on real images, load it.

- ``torchscript``: traced and frozen; runs in PyTorch.
- ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter; the TorchScript one is
  deprecated), batch axis dynamic; runs in onnxruntime.
- ``int8``: the ONNX model after onnxruntime's static quantization (QDQ, per-channel weights),
  calibrated on real images. Static, because dynamic quantization leaves activations in float
  and runs convolutions as ``ConvInteger``, which made MobileNetV2 far slower than fp32 here.

An export returns the file's bytes and a parity report; it raises ``ModelLoadError`` when the
file disagrees with the eager model beyond the format's criterion.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from clf.artifact.onnx_cpu import onnx_session
from clf.errors import ModelLoadError

TORCHSCRIPT_ATOL = 1e-4
ONNX_ATOL = 1e-3
INT8_MIN_AGREEMENT = 0.99
INT8_MIN_IMAGES = 32  # half calibrate, half check
CALIBRATION_IMAGES = 64  # percentile calibration keeps every activation of every image in memory
BATCH = 32


class Exported(NamedTuple):
    """A format's file, its parity report, and its own logits on every image it was checked
    on (the artifact's reference reuses them rather than running the file again)."""

    blob: bytes
    report: dict[str, Any]
    logits: torch.Tensor


# TorchScript is deprecated upstream but remains the contract's pickle-free, class-free format.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")


def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def channels_last(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last)


def eager_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The eager model's logits, which every format must match: computed channels_last, in which
    oneDNN's convolutions run faster, by a copy, since the formats export ``model`` as it is."""
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    try:
        return batched(fast, channels_last(images))
    except RuntimeError:  # a model that views its activations as contiguous
        return batched(model, images)


def compare(expected: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    return {
        "max_abs_logit_diff": float((expected - got).abs().max()),
        "top1_agreement": float((expected.argmax(1) == got.argmax(1)).float().mean()),
        "images": int(len(expected)),
    }


def _check_close(fmt: str, report: dict[str, Any], atol: float) -> dict[str, Any]:
    report["tolerance"] = atol
    if report["max_abs_logit_diff"] > atol or report["top1_agreement"] < 1.0:
        raise ModelLoadError(
            f"{fmt} export disagrees with eager on {report['images']} images: "
            f"max |logit diff| {report['max_abs_logit_diff']:.2e} (tolerance {atol:.0e}), "
            f"top-1 agreement {report['top1_agreement']:.1%}"
        )
    return report


# ------------------------------------------------------------------------------------------
# Export


def export_torchscript(model: nn.Module, images: torch.Tensor, expected: torch.Tensor) -> Exported:
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(model, images[:1], check_trace=False))
    # Checked on the channels_last batches that TorchClassifier.logits gives it at run time.
    got = batched(traced, channels_last(images))
    report = _check_close("torchscript", compare(expected, got), TORCHSCRIPT_ATOL)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return Exported(buffer.getvalue(), report, got)


def to_onnx(model: nn.Module, images: torch.Tensor) -> bytes:
    # torch.export specialises a dimension whose example size is 1, so trace with a batch of 2.
    example = images[:2] if len(images) >= 2 else images[:1].expand(2, -1, -1, -1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example.contiguous(),),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def export_onnx(model: nn.Module, images: torch.Tensor, expected: torch.Tensor) -> Exported:
    blob = to_onnx(model, images)
    got = batched(OnnxModule(blob), images)
    report = _check_close("onnx", compare(expected, got), ONNX_ATOL)
    return Exported(blob, {**report, "exporter": "torch.onnx (dynamo)"}, got)


def export_int8(
    onnx_blob: bytes,
    images: torch.Tensor,
    expected: torch.Tensor,
    labels: torch.Tensor | None = None,
    min_agreement: float = INT8_MIN_AGREEMENT,
) -> Exported:
    """Quantize on up to 64 images spread over the sample; measure agreement on the rest."""
    calibrate = torch.zeros(len(images), dtype=torch.bool)
    picks = min(CALIBRATION_IMAGES, len(images) // 2)
    calibrate[torch.linspace(0, len(images) - 1, picks).round().long()] = True
    check = ~calibrate
    blob = quantize(onnx_blob, images[calibrate])
    logits = batched(OnnxModule(blob), images)
    got = logits[check]
    report = compare(expected[check], got)
    report.update(
        method="onnxruntime static QDQ, per-channel 7-bit weights, percentile calibration",
        calibration_images=int(calibrate.sum()),
        min_top1_agreement=min_agreement,
    )
    if labels is not None:
        truth = labels[check]
        fp32 = float((expected[check].argmax(1) == truth).float().mean())
        int8 = float((got.argmax(1) == truth).float().mean())
        report.update(accuracy_fp32=fp32, accuracy_int8=int8, accuracy_drop=fp32 - int8)
    if report["top1_agreement"] < min_agreement:
        raise ModelLoadError(
            f"int8 export agrees with fp32 on {report['top1_agreement']:.1%} of "
            f"{report['images']} images (needs at least {min_agreement:.0%})"
        )
    return Exported(blob, report, logits)


def quantize(onnx_blob: bytes, calibration: torch.Tensor) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray):
            # The percentile calibrator stacks batches, so every batch must be the same size.
            size = min(8, len(images))
            self.batches = iter(
                {"input": images[i : i + size]} for i in range(0, len(images) - size + 1, size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "q.onnx"))
        with open(fp32, "wb") as f:
            f.write(onnx_blob)
        # Calibration prints progress; --json promises one line on stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(fp32, prepared)
            quantize_static(
                prepared,
                int8,
                Reader(calibration.float().numpy()),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # 7-bit weights: u8 x s8 products saturate on AVX2 CPUs without VNNI, which cost
                # MobileNetV2 much of its agreement (RESULTS.md), and the file must run anywhere.
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
            )
        with open(int8, "rb") as f:
            return f.read()


def export_all(
    model: nn.Module,
    formats: tuple[str, ...],
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    min_int8_agreement: float = INT8_MIN_AGREEMENT,
) -> dict[str, Exported]:
    """Every requested format's file, parity report and logits; raises before returning if any
    fails."""
    expected = eager_logits(model, images)
    out: dict[str, Exported] = {}
    for fmt in formats:
        if fmt == "torchscript":
            out[fmt] = export_torchscript(model, images, expected)
        elif fmt == "onnx":
            out[fmt] = export_onnx(model, images, expected)
    if "int8" in formats:
        onnx_blob = out["onnx"].blob if "onnx" in out else to_onnx(model, images)
        out["int8"] = export_int8(onnx_blob, images, expected, labels, min_int8_agreement)
    return {fmt: out[fmt] for fmt in formats}


# ------------------------------------------------------------------------------------------
# Load


class OnnxModule(nn.Module):
    """An onnxruntime session behind the interface of a TorchScript module: tensor in, tensor out."""

    def __init__(self, blob: bytes, device: torch.device | str = "cpu"):
        super().__init__()
        # Torch's thread count: Ray's default for the process, or an actor's share of the cores.
        cuda = torch.device(device).type == "cuda"
        self.session = onnx_session(blob, torch.get_num_threads(), cuda)
        self.blob = blob  # the graph's weights, for diagnostics; the session does not expose them
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)


def load_module(fmt: str, blob: bytes, device: torch.device | str = "cpu") -> nn.Module:
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(blob), map_location=device).eval()
    return OnnxModule(blob, device).eval()
