"""Optimizer and schedule factories."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from clf import models
from clf.config import OptimConfig, ScheduleConfig


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    discriminative_lr: float = 1.0,
    layer_groups: int = 1,
) -> list[dict]:
    """Trainable parameters in groups by depth and by decay.

    Norms and biases (1-D tensors) get no weight decay. With ``discriminative_lr`` below 1 the
    backbone is cut into ``layer_groups`` slices in definition order (input first), and the slice
    ``d`` steps below the head trains at ``lr * discriminative_lr ** d``.
    """
    heads = models.head_parameter_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trainable if n not in heads]
    slices: list[tuple[list[nn.Parameter], float]] = [
        ([p for n, p in trainable if n in heads], 1.0)
    ]
    if discriminative_lr < 1 and backbone:
        # array_split keeps depth order; the slice nearest the head comes last.
        chunks = [c for c in np.array_split(np.arange(len(backbone)), layer_groups) if len(c)]
        for depth, chunk in enumerate(reversed(chunks), start=1):
            slices.append(([backbone[i] for i in chunk], discriminative_lr**depth))
    else:
        slices.append((backbone, 1.0))
    groups = []
    for params, scale in slices:
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append(
                    {"params": chosen, "lr": lr * scale, "weight_decay": weight_decay * decay}
                )
    return groups


def create_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, cfg.weight_decay, cfg.discriminative_lr, cfg.layer_groups)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Multiplier of each group's lr at optimizer step ``step``.

    Every schedule is a LambdaLR factor, so resuming and an epoch longer than planned behave the
    same for all of them (torch's OneCycleLR raises past its last step).
    """
    total = max(1, steps_per_epoch * epochs)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def cosine(start: float, end: float, progress: float) -> float:
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if cfg.name == "onecycle":  # torch's OneCycleLR shape: 1/25 -> 1 -> 1/(25 * 1e4)
            peak = max(1, int(cfg.onecycle_pct_start * total))
            if step < peak:
                return cosine(1 / 25, 1.0, step / peak)
            return cosine(1.0, 1 / 25e4, (step - peak) / max(1, total - peak))
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** int(step / (cfg.step_epochs * steps_per_epoch))
        return cosine(1.0, 0.0, (step - warmup) / max(1, total - warmup))

    return factor


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step schedule: warmup + cosine, step, one-cycle or constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, epochs))
