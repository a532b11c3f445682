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
from clf.training import checkpoint, history
from clf.training.loader import BalancedResampler, DecodeCollate, balanced_weights, shard_name
from clf.training.network import create_network
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


@dataclass
class Worker:
    """What one worker sets up once and every epoch uses."""

    cfg: TrainConfig
    spec: Preprocess
    run: str
    streamed: list[str]
    steps: int  # optimizer steps per epoch
    rank: int
    world: int
    device: torch.device
    train_shard: Any  # this worker's DataIterator of the train split
    model: nn.Module
    ema: ModelEmaV3 | None
    amp_dtype: torch.dtype
    use_amp: bool
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mixer: Any
    resampler: BalancedResampler | None
    train_collate: DecodeCollate
    val_collate: DecodeCollate
    board: history.TensorBoard | None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    @property
    def scored(self) -> nn.Module:
        """What validation and the checkpoint's metrics judge: the EMA weights when kept."""
        return self.ema.module if self.ema is not None else self.model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: set up, restore, then one epoch after another."""
    # Ray Train sets the worker's root logger to INFO, and its per-report line is logged under a
    # file-path logger name that the RunConfig's ray.train level does not reach.
    logging.getLogger().setLevel(logging.WARNING)
    runtime.quiet_ray_logs()
    w = set_up_worker(config)
    start_epoch, restored, best = restore(w)
    phase: Phase | None = None
    for epoch in range(start_epoch, w.cfg.epochs):
        if phase is None or phase_of(w.cfg, epoch) != phase.name:
            name = phase_of(w.cfg, epoch)
            phase = start_phase(
                w.cfg, w.model, name, epoch, w.steps, w.device, w.world, w.scaler, restored
            )
        started = time.monotonic()
        totals = train_one_epoch(w, phase, epoch)
        train_seconds = time.monotonic() - started
        val_loss, val_acc = validate(w)
        if w.world > 1:
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
            "world_size": w.world,
        }
        stop = should_stop(w.cfg, epoch, best["epoch"])
        report_epoch(checkpoint_state(w, phase, epoch, best, row), row, w, stopping=stop)
        if stop:
            break
    if w.board is not None:
        w.board.close()


def set_up_worker(config: dict[str, Any]) -> Worker:
    cfg = from_dict(TrainConfig, config["train"])
    classes, rank = config["classes"], ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = create_network(
        cfg.model.name, classes, cfg.model.pretrained, drop_rate=cfg.model.drop_rate
    ).to(device)
    torch.manual_seed(cfg.seed * 1000 + rank)  # different augmentations per rank
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = cuda and cfg.amp
    weights = None
    if cfg.optim.class_weights == "balanced":
        weights = torch.tensor(balanced_weights(config["class_counts"]), dtype=torch.float32)
    spec = Preprocess.from_meta(config["preprocess"])
    resampler = (
        BalancedResampler(config["class_counts"], cfg.seed * 1000 + rank)
        if cfg.data.sampler == "balanced"
        else None
    )
    return Worker(
        cfg=cfg,
        spec=spec,
        run=config["run"],
        streamed=config["streamed"],
        steps=max(1, config["steps_per_epoch"] // cfg.optim.accumulate),
        rank=rank,
        world=ray.train.get_context().get_world_size(),
        device=device,
        train_shard=ray.train.get_dataset_shard(shard_name("train", rank, config["streamed"])),
        model=model,
        ema=ModelEmaV3(model, decay=cfg.model.ema_decay) if cfg.model.ema_decay else None,
        amp_dtype=amp_dtype,
        use_amp=use_amp,
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(device),
            label_smoothing=cfg.optim.label_smoothing,
        ),
        mixer=batch_mixer(cfg.augment, len(classes)),
        resampler=resampler,
        train_collate=DecodeCollate(spec, cfg.augment, resampler),
        val_collate=DecodeCollate(spec),
        board=history.TensorBoard(config["run"]) if rank == 0 and cfg.tensorboard else None,
    )


def restore(w: Worker) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """(first epoch to train, the restored checkpoint or None, the best epoch so far)."""
    best = {"val_acc": -1.0, "epoch": -1}
    if (ckpt := ray.train.get_checkpoint()) is None:
        return 0, None, best
    restored = checkpoint.load(ckpt)
    w.model.load_state_dict(restored["model"])
    if w.ema is not None and "ema" in restored:
        w.ema.module.load_state_dict(restored["ema"])
    if w.rank == 0:
        if "row" in restored:  # a kill between its commit and its metrics line lost the line
            history.append(w.run, restored["row"])
        print(f"[train] resumed from the checkpoint of epoch {restored['epoch'] + 1}", flush=True)
    return restored["epoch"] + 1, restored, restored.get("best", best)


def train_one_epoch(w: Worker, phase: Phase, epoch: int) -> torch.Tensor:
    """One pass over this worker's train shard; returns its (loss sum, correct, count)."""
    cfg = w.cfg
    set_train_mode(w.model, phase.name)
    if w.resampler is not None:
        w.resampler.epoch = epoch
    totals = torch.zeros(3, dtype=torch.float64, device=w.device)
    phase.optimizer.zero_grad(set_to_none=True)  # drops a last partial accumulation
    batches = w.train_shard.iter_torch_batches(
        batch_size=cfg.data.batch_size,
        collate_fn=w.train_collate,
        local_shuffle_buffer_size=cfg.data.batch_size * 4,
        local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + w.rank,
        prefetch_batches=2,
        drop_last=True,
    )
    for i, batch in enumerate(batches):
        if len(batch["label"]) == 0:  # every image of the batch failed to decode
            continue
        totals += train_step(w, phase, batch, step_now=(i + 1) % cfg.optim.accumulate == 0)
    return totals


def model_input(w: Worker, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the normalized batch, in the model's memory format."""
    images = w.spec.normalize(pixels)
    if w.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_step(w: Worker, phase: Phase, batch: dict[str, torch.Tensor], step_now: bool):
    """Forward and backward of one micro-batch, and an optimizer step when ``step_now``;
    returns the batch's (loss sum, correct, count)."""
    cfg = w.cfg
    images, labels = model_input(w, batch["image"]), batch["label"]
    targets = labels
    if w.mixer is not None:
        images, targets = w.mixer(images, labels)
    # Between optimizer steps, DDP must not all-reduce the partial gradients.
    sync = contextlib.nullcontext() if step_now or w.world == 1 else phase.ddp.no_sync()
    with sync:
        with w.autocast():
            logits = phase.ddp(images)
            loss = w.criterion(logits, targets)
        w.scaler.scale(loss / cfg.optim.accumulate).backward()
    if step_now:
        if cfg.optim.clip_grad:
            w.scaler.unscale_(phase.optimizer)
            nn.utils.clip_grad_norm_(w.model.parameters(), cfg.optim.clip_grad)
        w.scaler.step(phase.optimizer)
        w.scaler.update()
        phase.optimizer.zero_grad(set_to_none=True)
        phase.scheduler.step()
        if w.ema is not None:
            w.ema.update(w.model)
    return tally(loss, logits, labels)


@torch.no_grad()
def validate(w: Worker) -> tuple[float, float]:
    """(val loss, val accuracy) of ``w.scored`` over the whole val split, all ranks summed."""
    # Asked for here, a val split's coordinator does not delay the first training batch.
    shard = ray.train.get_dataset_shard(shard_name("val", w.rank, w.streamed))
    model, criterion = w.scored, nn.CrossEntropyLoss()
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    for batch in shard.iter_torch_batches(
        batch_size=w.cfg.data.batch_size * 2, collate_fn=w.val_collate, prefetch_batches=2
    ):
        with w.autocast():
            logits = model(model_input(w, batch["image"])).float()
        totals += tally(criterion(logits, batch["label"]), logits, batch["label"])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / max(totals[2], 1)), float(totals[1] / max(totals[2], 1))


def checkpoint_state(
    w: Worker, phase: Phase, epoch: int, best: dict[str, Any], row: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": w.model.state_dict(),
        "optimizer": phase.optimizer.state_dict(),
        "scheduler": phase.scheduler.state_dict(),
        "scaler": w.scaler.state_dict(),
        "epoch": epoch,
        "phase": phase.name,
        "best": best,
        "row": row,
        **({"ema": w.ema.module.state_dict()} if w.ema is not None else {}),
    }


def report_epoch(state: dict[str, Any], row: dict[str, Any], w: Worker, stopping: bool) -> None:
    """Every rank reports; only rank 0 attaches the checkpoint. The metrics line is written on
    the controller once the checkpoint is committed (``history.CommittedEpochLog``)."""
    ckpt = None
    cfg = w.cfg
    if w.rank == 0:
        if w.board is not None:
            w.board.log(row)
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
