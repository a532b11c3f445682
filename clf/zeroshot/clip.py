"""An open_clip model from local or ``s3://`` weights, never from a hub, and its preprocessing.

``--pretrained`` is a state dict (``.pt``, ``.bin``, ``.safetensors``) for the architecture
``clip:ARCH`` names, or a folder as open_clip saves one (``open_clip_config.json`` beside the
weights; ``local-dir:`` before the path is accepted too), which also names the architecture.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from clf import storage
from clf.errors import ModelLoadError, UsageError
from clf.images.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

PREFIX = "clip:"
LOCAL_DIR = "local-dir:"
FOLDER_CONFIG = "open_clip_config.json"

# Nothing here may reach a model hub: open_clip and huggingface_hub read these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def is_clip(name: str) -> bool:
    return name.startswith(PREFIX)


def arch_of(name: str) -> str:
    arch = name[len(PREFIX) :]
    if not arch:
        raise UsageError(f"--model {name}: name an open_clip architecture, e.g. clip:ViT-B-32")
    return arch


def load_clip(name: str, pretrained: str) -> tuple[nn.Module, object]:  # noqa: F821
    """(open_clip model in eval mode, its tokenizer) for ``clip:ARCH`` and the weights at
    ``pretrained``, checked key by key."""
    from clf import models  # torch: not for the checks that only read PREFIX

    with tempfile.TemporaryDirectory(prefix="clf-clip-") as local:
        model, tokenizer, weights = _create(name, pretrained, local)
        _load_state(model, dict(models.load_state_dict_file(weights)), weights, name)
    return model.eval(), tokenizer


def clip_preprocess_of(name: str, pretrained: str) -> Preprocess:
    """CLIP's preprocessing for ``clip:ARCH`` and ``pretrained``, without loading weights."""
    with tempfile.TemporaryDirectory(prefix="clf-clip-") as local:
        model, _, _ = _create(name, pretrained, local)
    return clip_preprocess(model.visual)


def _create(name: str, pretrained: str, local: str) -> tuple[nn.Module, object, str]:  # noqa: F821
    """(open_clip model with random weights, tokenizer, the weights' URI)."""
    import open_clip

    arch = arch_of(name)
    source = pretrained.removeprefix(LOCAL_DIR)
    if not storage.exists(source):
        raise UsageError(f"--pretrained {pretrained}: no such file or folder")
    if storage.exists(storage.join(source, FOLDER_CONFIG)):
        # The config alone, in a folder of its own: open_clip would load the weights beside
        # it by itself, with an error that names no file.
        config = os.path.join(local, "config")
        os.makedirs(config)
        with open(os.path.join(config, FOLDER_CONFIG), "wb") as f:
            f.write(storage.read_bytes(storage.join(source, FOLDER_CONFIG)))
        with _quiet_root_logger():  # it warns that no weights were loaded: they are, later
            model = open_clip.create_model(f"{LOCAL_DIR}{config}", pretrained=None)
        return model, open_clip.get_tokenizer(f"{LOCAL_DIR}{config}"), _weights_in(source)
    if arch not in open_clip.list_models():
        raise UsageError(f"--model {name}: open_clip has no architecture {arch!r}")
    with _quiet_root_logger():
        model = open_clip.create_model(arch, pretrained=None)
    return model, open_clip.get_tokenizer(arch), source


def clip_preprocess(visual: nn.Module) -> Preprocess:  # noqa: F821
    """CLIP's eval transform for an image tower: the shorter side resized to the input size,
    then a center crop."""
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return Preprocess(
        input_size=size,
        resize=size,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
    )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _weights_in(folder: str) -> str:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.pt"):
        if storage.exists(storage.join(folder, name)):
            return storage.join(folder, name)
    raise UsageError(f"--pretrained {folder}: no open_clip_model.safetensors or .bin in it")


def _load_state(model: nn.Module, state: dict, pretrained: str, name: str) -> None:  # noqa: F821
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise ModelLoadError(
            f"--pretrained {pretrained}: does not fit {name} ({len(missing)} missing keys, "
            f"{len(unexpected)} unexpected, {len(reshaped)} of another shape)"
        )
    model.load_state_dict(state)
