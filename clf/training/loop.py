"""The per-worker training loop that Ray Train runs on every worker (DDP)."""

from __future__ import annotations

import time
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clf import models
from clf.config import TrainConfig, from_dict
from clf.training import checkpoint, metrics
from clf.training.data import DecodeCollate
from clf.training.optim import create_optimizer, create_scheduler
from clf.transforms import Preprocess, normalize


def phase_of(cfg: TrainConfig, epoch: int) -> str:
    """``head`` trains the classifier alone on a frozen backbone; ``full`` trains everything."""
    if cfg.model.strategy == "frozen":
        return "head"
    if cfg.model.strategy == "two-phase" and epoch < cfg.model.head_epochs:
        return "head"
    return "full"


def set_trainable(model: nn.Module, phase: str) -> None:
    heads = models.head_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad = phase == "full" or name in heads


def set_train_mode(model: nn.Module, phase: str) -> None:
    model.train()
    if phase == "head":  # a frozen backbone keeps its BatchNorm statistics
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def phase_schedule(cfg: TrainConfig, phase: str) -> tuple[float, int, int]:
    """Learning rate, first epoch and epoch count of a phase."""
    if cfg.model.strategy != "two-phase":
        return cfg.optim.lr, 0, cfg.epochs
    if phase == "head":
        return cfg.optim.lr, 0, cfg.model.head_epochs
    head = cfg.model.head_epochs
    return cfg.optim.lr * cfg.optim.finetune_lr_scale, head, cfg.epochs - head


def tally(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss sum, correct, count) of a batch, summed over batches and then across workers."""
    n = torch.tensor(len(labels), dtype=torch.float64, device=labels.device)
    return torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double(), n])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(TrainConfig, config["train"])
    spec = Preprocess.from_meta(config["preprocess"])
    classes, run, steps_per_epoch = config["classes"], config["run"], config["steps_per_epoch"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"

    model = models.create_model(
        cfg.model.name, len(classes), pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate
    ).to(device)
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = cuda and cfg.amp

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    start_epoch, restored = 0, None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        restored = checkpoint.load(ckpt)
        model.load_state_dict(restored["model"])
        start_epoch = restored["epoch"] + 1
        if rank == 0:
            print(f"[train] resumed from the checkpoint of epoch {restored['epoch']}", flush=True)

    train_collate, val_collate = DecodeCollate(spec, cfg.augment), DecodeCollate(spec)
    train_shard, val_shard = (
        ray.train.get_dataset_shard("train"),
        ray.train.get_dataset_shard("val"),
    )
    phase, ddp, optimizer, scheduler = None, None, None, None

    for epoch in range(start_epoch, cfg.epochs):
        if phase_of(cfg, epoch) != phase:
            phase = phase_of(cfg, epoch)
            set_trainable(model, phase)
            # DDP registers the trainable parameters when it is built, so rebuild it per phase.
            ddp = (
                DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
                if world > 1
                else model
            )
            lr, phase_start, phase_epochs = phase_schedule(cfg, phase)
            optimizer = create_optimizer(model, cfg.optim, lr)
            scheduler = create_scheduler(optimizer, cfg.schedule, steps_per_epoch, phase_epochs)
            if restored is not None and restored.get("phase") == phase:
                optimizer.load_state_dict(restored["optimizer"])
                scheduler.load_state_dict(restored["scheduler"])
                scaler.load_state_dict(restored["scaler"])
            else:  # a resume into a phase the checkpoint had not reached starts its schedule late
                for _ in range((epoch - phase_start) * steps_per_epoch):
                    scheduler.step()
        set_train_mode(model, phase)
        started = time.monotonic()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        for batch in train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            collate_fn=train_collate,
            local_shuffle_buffer_size=cfg.data.batch_size * 4,
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
            prefetch_batches=2,
            drop_last=True,
        ):
            if len(batch["label"]) == 0:  # every image of the batch failed to decode
                continue
            images = normalize(batch["image"], spec)
            if cuda and cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"]
            with autocast():
                logits = ddp(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            totals += tally(loss, logits, labels)
        train_seconds = time.monotonic() - started
        val_loss, val_acc = evaluate(model, val_shard, val_collate, spec, criterion, autocast, cfg)
        if world > 1:
            dist.all_reduce(totals)
        row = {
            "epoch": epoch,
            "phase": phase,
            "train_loss": float(totals[0] / max(totals[2], 1)),
            "train_acc": float(totals[1] / max(totals[2], 1)),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": float(totals[2]) / train_seconds,
            "epoch_seconds": time.monotonic() - started,
            "start_epoch": start_epoch,
            "world_size": world,
        }
        report_epoch(model, optimizer, scheduler, scaler, phase, row, rank, run, cfg)


@torch.no_grad()
def evaluate(model, shard, collate, spec, criterion, autocast, cfg) -> tuple[float, float]:
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    for batch in shard.iter_torch_batches(
        batch_size=cfg.data.batch_size * 2, collate_fn=collate, prefetch_batches=2
    ):
        with autocast():
            logits = model(normalize(batch["image"], spec)).float()
        totals += tally(criterion(logits, batch["label"]), logits, batch["label"])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / max(totals[2], 1)), float(totals[1] / max(totals[2], 1))


def report_epoch(model, optimizer, scheduler, scaler, phase, row, rank, run, cfg) -> None:
    """Rank 0 writes the metrics line, then every rank reports; only rank 0 attaches the checkpoint."""
    ckpt = None
    if rank == 0:
        metrics.append(run, row)
        print(
            f"[train] epoch {row['epoch'] + 1}/{cfg.epochs} {row['phase']}: "
            f"train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f} | "
            f"lr {row['lr']:.2e} | {row['images_per_s']:.1f} img/s",
            flush=True,
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": row["epoch"],
            "phase": phase,
        }
        ckpt = checkpoint.save(state, {"epoch": row["epoch"], "val_acc": row["val_acc"]})
    ray.train.report({k: v for k, v in row.items() if k != "phase"}, checkpoint=ckpt)
