"""The per-worker training loop that Ray Train runs on every worker (DDP)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clf import models, runtime
from clf.config import TrainConfig, from_dict
from clf.images.preprocess import Preprocess
from clf.images.transforms import batch_mixer
from clf.training import checkpoint, metrics
from clf.training.data import BalancedResampler, DecodeCollate, balanced_weights, shard_name
from clf.training.optim import create_optimizer, create_scheduler


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


def should_stop(cfg: TrainConfig, epoch: int, best_epoch: int) -> bool:
    """Early stopping: ``patience`` epochs have passed without a better val_acc."""
    return cfg.early_stopping is not None and epoch - best_epoch >= cfg.early_stopping


def tally(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss sum, correct, count) of a batch, summed over batches and then across workers."""
    n = torch.tensor(len(labels), dtype=torch.float64, device=labels.device)
    return torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double(), n])


@dataclass
class Phase:
    """What changes when the trainable parameters change: the DDP wrapper and the optimizer."""

    name: str
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def start_phase(cfg, model, name, epoch, steps, device, world, scaler, restored) -> Phase:
    set_trainable(model, name)
    # DDP registers the trainable parameters when it is built, so it is rebuilt per phase.
    cuda = device.type == "cuda"
    ddp = (
        DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        if world > 1
        else model
    )
    lr, phase_start, phase_epochs = phase_schedule(cfg, name)
    optimizer = create_optimizer(model, cfg.optim, lr)
    scheduler = create_scheduler(optimizer, cfg.schedule, steps, phase_epochs)
    if restored is not None and restored.get("phase") == name:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        scaler.load_state_dict(restored["scaler"])
    else:  # a resume into a phase the checkpoint had not reached starts its schedule late
        for _ in range((epoch - phase_start) * steps):
            scheduler.step()
    return Phase(name, ddp, optimizer, scheduler)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    # Ray Train sets the worker's root logger to INFO, and its per-report line is logged under a
    # file-path logger name that the RunConfig's ray.train level does not reach.
    logging.getLogger().setLevel(logging.WARNING)
    runtime.quiet_ray_logs()
    cfg = from_dict(TrainConfig, config["train"])
    spec = Preprocess.from_meta(config["preprocess"])
    classes, run, batches_per_epoch = config["classes"], config["run"], config["steps_per_epoch"]
    steps = max(1, batches_per_epoch // cfg.optim.accumulate)  # optimizer steps per epoch
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard(shard_name("train", rank, config["streamed"]))
    cuda = device.type == "cuda"

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = models.create_model(
        cfg.model.name, len(classes), pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate
    ).to(device)
    torch.manual_seed(cfg.seed * 1000 + rank)  # different augmentations per rank
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=cfg.model.ema_decay) if cfg.model.ema_decay else None
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = cuda and cfg.amp

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    weights = None
    if cfg.optim.class_weights == "balanced":
        weights = torch.tensor(balanced_weights(config["class_counts"]), dtype=torch.float32)
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else weights.to(device),
        label_smoothing=cfg.optim.label_smoothing,
    )
    val_criterion = nn.CrossEntropyLoss()
    mixer = batch_mixer(cfg.augment, len(classes))

    start_epoch, restored, best = 0, None, {"val_acc": -1.0, "epoch": -1}
    if (ckpt := ray.train.get_checkpoint()) is not None:
        restored = checkpoint.load(ckpt)
        model.load_state_dict(restored["model"])
        if ema is not None and "ema" in restored:
            ema.module.load_state_dict(restored["ema"])
        start_epoch, best = restored["epoch"] + 1, restored.get("best", best)
        if rank == 0:
            if "row" in restored:  # a kill between its commit and its metrics line lost the line
                metrics.append(run, restored["row"])
            print(
                f"[train] resumed from the checkpoint of epoch {restored['epoch'] + 1}", flush=True
            )

    resampler = (
        BalancedResampler(config["class_counts"], cfg.seed * 1000 + rank)
        if cfg.data.sampler == "balanced"
        else None
    )
    train_collate = DecodeCollate(spec, cfg.augment, resampler)
    val_collate = DecodeCollate(spec)
    phase: Phase | None = None
    board = metrics.TensorBoard(run) if rank == 0 and cfg.tensorboard else None

    for epoch in range(start_epoch, cfg.epochs):
        if phase is None or phase_of(cfg, epoch) != phase.name:
            name = phase_of(cfg, epoch)
            phase = start_phase(cfg, model, name, epoch, steps, device, world, scaler, restored)
        set_train_mode(model, phase.name)
        if resampler is not None:
            resampler.epoch = epoch
        started = time.monotonic()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        phase.optimizer.zero_grad(set_to_none=True)  # drops a last partial accumulation
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            collate_fn=train_collate,
            local_shuffle_buffer_size=cfg.data.batch_size * 4,
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
            prefetch_batches=2,
            drop_last=True,
        )
        for i, batch in enumerate(batches):
            if len(batch["label"]) == 0:  # every image of the batch failed to decode
                continue
            images, labels = spec.normalize(batch["image"]), batch["label"]
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels)
            step_now = (i + 1) % cfg.optim.accumulate == 0
            # Between optimizer steps, DDP must not all-reduce the partial gradients.
            sync = contextlib.nullcontext() if step_now or world == 1 else phase.ddp.no_sync()
            with sync:
                with autocast():
                    logits = phase.ddp(images)
                    loss = criterion(logits, targets)
                scaler.scale(loss / cfg.optim.accumulate).backward()
            if step_now:
                if cfg.optim.clip_grad:
                    scaler.unscale_(phase.optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(phase.optimizer)
                scaler.update()
                phase.optimizer.zero_grad(set_to_none=True)
                phase.scheduler.step()
                if ema is not None:
                    ema.update(model)
            totals += tally(loss, logits, labels)
        train_seconds = time.monotonic() - started
        scored = ema.module if ema is not None else model
        # Asked for at validation, a val split's coordinator does not delay the first batch.
        val_shard = ray.train.get_dataset_shard(shard_name("val", rank, config["streamed"]))
        val_loss, val_acc = evaluate(
            scored, val_shard, val_collate, spec, val_criterion, autocast, cfg
        )
        if world > 1:
            dist.all_reduce(totals)
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch}
        row = {
            "epoch": epoch,
            "phase": phase.name,
            "train_loss": float(totals[0] / max(totals[2], 1)),
            "train_acc": float(totals[1] / max(totals[2], 1)),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": phase.optimizer.param_groups[0]["lr"],
            "images_per_s": float(totals[2]) / train_seconds,
            "train_seconds": train_seconds,
            "epoch_seconds": time.monotonic() - started,
            "start_epoch": start_epoch,
            "world_size": world,
        }
        stop = should_stop(cfg, epoch, best["epoch"])
        state = {
            "model": model.state_dict(),
            "optimizer": phase.optimizer.state_dict(),
            "scheduler": phase.scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "phase": phase.name,
            "best": best,
            "row": row,
            **({"ema": ema.module.state_dict()} if ema is not None else {}),
        }
        report_epoch(state, row, rank, cfg, board, stopping=stop)
        if stop:
            break
    if board is not None:
        board.close()


@torch.no_grad()
def evaluate(model, shard, collate, spec, criterion, autocast, cfg) -> tuple[float, float]:
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    for batch in shard.iter_torch_batches(
        batch_size=cfg.data.batch_size * 2, collate_fn=collate, prefetch_batches=2
    ):
        with autocast():
            logits = model(spec.normalize(batch["image"])).float()
        totals += tally(criterion(logits, batch["label"]), logits, batch["label"])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / max(totals[2], 1)), float(totals[1] / max(totals[2], 1))


def report_epoch(state, row, rank, cfg, board, stopping: bool) -> None:
    """Every rank reports; only rank 0 attaches the checkpoint. The metrics line is written on
    the controller once the checkpoint is committed (``metrics.CommittedEpochLog``)."""
    ckpt = None
    if rank == 0:
        if board is not None:
            board.log(row)
        print(
            f"[train] epoch {row['epoch'] + 1}/{cfg.epochs} {row['phase']}: "
            f"train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f} | "
            f"lr {row['lr']:.2e} | {row['images_per_s']:.1f} img/s",
            flush=True,
        )
        if stopping:
            print(
                f"[train] early stop: no better val accuracy for {cfg.early_stopping} epochs "
                f"(best {state['best']['val_acc']:.3f} at epoch {state['best']['epoch'] + 1})",
                flush=True,
            )
        ckpt = checkpoint.save(state, {"epoch": row["epoch"], "val_acc": row["val_acc"]})
    # The local copy is in a temp folder; kept, every epoch would leave a model's worth behind.
    ray.train.report(row, checkpoint=ckpt, delete_local_checkpoint_after_upload=ckpt is not None)
