"""Pictures that show what a model learned and where it fails: first-layer filters, and the
images it got wrong with the most confidence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clf import plots
from clf.artifact.formats import OnnxModule
from clf.dataset.shards import read_images
from clf.images.decode import thumbnail


def first_conv_weight(module: torch.nn.Module) -> np.ndarray | None:
    """The first layer's kernels (out, in, kh, kw), or None if the model has no convolution.

    An artifact is frozen TorchScript: freezing folds parameters into graph constants (and
    batch norm into the conv), so its state_dict is empty and the graph is where to look.
    An ONNX artifact keeps them as the graph's initializers.
    """
    if isinstance(module, OnnxModule):
        return _onnx_first_conv_weight(module.blob)
    if not isinstance(module, torch.jit.ScriptModule):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                return layer.weight.detach().float().cpu().numpy()
        return None
    for tensor in module.state_dict().values():
        if tensor.ndim == 4:
            return tensor.detach().float().cpu().numpy()
    for node in module.graph.nodes():
        if node.kind() in ("aten::conv2d", "aten::_convolution"):
            weight = node.inputsAt(1).toIValue()
            if isinstance(weight, torch.Tensor) and weight.ndim == 4:
                return weight.detach().float().cpu().numpy()
    return None


def _onnx_first_conv_weight(blob: bytes) -> np.ndarray | None:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(blob).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in initializers:
            return numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
    return None  # int8 graphs reach their convolutions through DequantizeLinear


def filters_png(module: torch.nn.Module) -> bytes | None:
    weight = first_conv_weight(module)
    return None if weight is None else plots.filter_grid(weight)


def confident_mistakes(labels: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` wrong predictions made with the highest probability, highest first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:n]]


def caption(true: str, predicted: str, probability: float) -> str:
    return f"{_short(true)} / {_short(predicted)} ({probability:.2f})"


def mistakes_png(images: Sequence[bytes], captions: Sequence[str]) -> bytes:
    """A grid of the encoded ``images``, square-cropped, each under its caption."""
    return plots.image_grid([thumbnail(data) for data in images], captions)


def read_shard_images(refs: Sequence[tuple[str, str]]) -> list[bytes]:
    """Encoded bytes of (shard URI, key) pairs, in order (empty where unreadable)."""
    found = read_images([f"{shard}#{key}" for shard, key in refs])
    return [data if isinstance(data, bytes) else b"" for data in found]


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
