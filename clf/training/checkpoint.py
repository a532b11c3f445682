"""Training state <-> Ray Train checkpoints. Loading never runs pickled code."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from clf import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def save(state: dict[str, Any], meta: dict[str, Any]):
    """A ``ray.train.Checkpoint`` holding ``state`` (tensors and plain values) and ``meta``."""
    from ray.train import Checkpoint

    directory = tempfile.mkdtemp(prefix="clf-ckpt-")
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f)
    return Checkpoint.from_directory(directory)


def load(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(
            os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True
        )


def best_in_run(run: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint folder of the best epoch (val accuracy, later epoch on ties) under ``run``."""
    candidates = []
    for uri in storage.list_files(run, recursive=True):
        if uri.endswith("/" + META_FILE) and "/checkpoint_" in uri:
            folder = uri[: -len(META_FILE) - 1]
            meta = storage.read_json(uri)
            candidates.append(((meta.get("val_acc", 0.0), meta.get("epoch", 0)), folder, meta))
    if not candidates:
        raise FileNotFoundError(f"{run}: no checkpoints")
    _, folder, meta = max(candidates, key=lambda c: c[0])
    return folder, meta


def load_state_uri(folder: str) -> dict[str, Any]:
    path = storage.local_copy(storage.join(folder, STATE_FILE))
    return torch.load(path, map_location="cpu", weights_only=True)
