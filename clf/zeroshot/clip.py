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
    import torch
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
    import open_clip

    arch = arch_of(name)
    source = pretrained.removeprefix(LOCAL_DIR)
    if not storage.exists(source):
        raise UsageError(f"--pretrained {pretrained}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="clf-clip-") as local:
        if storage.exists(storage.join(source, FOLDER_CONFIG)):
            # The config alone, in a folder of its own: open_clip would load the weights beside
            # it by itself, with an error that names no file.
            config = os.path.join(local, "config")
            os.makedirs(config)
            with open(os.path.join(config, FOLDER_CONFIG), "wb") as f:
                f.write(storage.read_bytes(storage.join(source, FOLDER_CONFIG)))
            with _quiet_root_logger():  # it warns that no weights were loaded: they are, below
                model = open_clip.create_model(f"{LOCAL_DIR}{config}", pretrained=None)
            tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR}{config}")
            weights = _weights_in(source)
        else:
            if arch not in open_clip.list_models():
                raise UsageError(f"--model {name}: open_clip has no architecture {arch!r}")
            with _quiet_root_logger():
                model = open_clip.create_model(arch, pretrained=None)
            tokenizer = open_clip.get_tokenizer(arch)
            weights = source
        _load_state(model, _read_state(_local_copy(weights, local), weights), weights, name)
    return model.eval(), tokenizer


def clip_preprocess(model: nn.Module) -> Preprocess:
    """CLIP's eval transform: the shorter side resized to the input size, then a center crop."""
    cfg = model.visual.preprocess_cfg
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


def _local_copy(uri: str, local: str) -> str:
    """A local path for the file ``uri``: itself when local, else downloaded under ``local``."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    path = os.path.join(local, os.path.basename(uri))
    with open(path, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path


def _weights_in(folder: str) -> str:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.pt"):
        if storage.exists(storage.join(folder, name)):
            return storage.join(folder, name)
    raise UsageError(f"--pretrained {folder}: no open_clip_model.safetensors or .bin in it")


def _read_state(path: str, uri: str) -> dict[str, torch.Tensor]:
    """The state dict in the local file ``path``, a copy of ``uri``."""
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        raise ModelLoadError(f"--pretrained {uri}: not a readable state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


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
