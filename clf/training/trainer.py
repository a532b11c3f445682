"""Driver side of training: resolve the run, launch Ray Train, export the best epoch."""

from __future__ import annotations

import importlib
import os
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from clf import runtime, storage
from clf.artifact.export import export_artifact
from clf.artifact.sample import Sample, load_sample
from clf.config import TrainConfig, to_dict
from clf.errors import UsageError
from clf.images.preprocess import Preprocess
from clf.training import checkpoint, history
from clf.training.network import create_network, network_preprocess
from clf.zeroshot import clip

# Ray Train's controller learns that its workers reported or finished only at its health check,
# every 2 s by default, so the end of every run waited up to two of them. Ray propagates this
# variable from the driver to the controller and the workers; a value the user set stands, and
# an embedded Ray polls its few workers more often (runtime.EMBEDDED_RAY_ENV).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = 0.5


@dataclass
class TrainSummary:
    run: str
    epochs_run: int
    best_epoch: int
    best_val_acc: float
    model: str
    seconds: float
    history: list[dict[str, Any]]
    # Where ``seconds`` went: set_up (datasets, trainer), fit (Ray Train, start to stop),
    # epochs and train (this call's epochs, with and without validation), export.
    timings: dict[str, float]


def resolve_preprocess(cfg: TrainConfig) -> Preprocess:
    spec = network_preprocess(cfg.model.name, cfg.model.pretrained)
    if cfg.data.input_size:
        spec = spec.with_size(cfg.data.input_size)
    if cfg.data.norm == "imagenet":
        spec = Preprocess(spec.input_size, spec.resize, spec.interpolation)
    elif cfg.data.norm == "dataset":
        from clf.training.loader import channel_stats

        spec = channel_stats(cfg.data.path, spec)
    return spec


def class_counts(manifest: dict[str, Any], classes: list[str]) -> list[int]:
    """Train images per class, in class-index order."""
    counts = manifest["counts"]["train"]
    return [int(counts.get(name, 0)) for name in classes]


def _storage_args(run: str) -> dict[str, Any]:
    run = storage.normalize(run)
    parent, name = posixpath.split(run) if run.startswith("s3://") else os.path.split(run)
    if run.startswith("s3://"):
        fs, path = storage.resolve(parent)
        return {"storage_path": path, "storage_filesystem": fs, "name": name}
    return {"storage_path": parent, "name": name}


def cpus_per_worker(workers: int) -> float:
    """Leave at least one CPU of the cluster to Ray Data's read tasks, or training never starts."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    return max(0.25, min(1.0, (total - 1) / workers))


def train(
    cfg: TrainConfig,
    classes: list[str],
    manifest: dict[str, Any],
    progress: Callable[[str], None] = print,
    fitted: Callable[[], Any] | None = None,
) -> TrainSummary:
    """Train ``cfg`` with Ray Train (DDP), then export the best epoch. Re-running with the same
    ``cfg.output`` resumes. ``classes`` and ``manifest``: what ``checks.check_train`` returned.
    ``fitted`` is called once Ray Train is done: the export that follows needs no Ray."""
    started = time.monotonic()
    run = storage.normalize(cfg.output)
    spec = resolve_preprocess(cfg)
    resolved = {**to_dict(cfg), "classes": classes, "preprocess": spec.to_meta()}
    storage.write_json(storage.join(run, "config.json"), resolved)
    earlier = len(history.read(run))
    trainer = build_trainer(cfg, run, spec, classes, manifest, progress)
    # The export's images and the curves' plotting code need no training: they are made ready
    # while Ray Train starts its workers, when a core sits idle (benchmarks/RESULTS.md).
    with ThreadPoolExecutor(1, thread_name_prefix="export-inputs") as pool:
        images = pool.submit(run_sample, resolved)
        pool.submit(importlib.import_module, "clf.plots")
        fit_started = time.monotonic()
        trainer.fit()
        fit_ended = time.monotonic()
    if fitted is not None:
        fitted()
    epochs = history.read(run)
    history.plot_curves(run)
    folder, best = checkpoint.best_in_run(run)
    model_uri = export_run(run, folder, images=images.result())
    finished = time.monotonic()
    this_call = epochs[earlier:]
    return TrainSummary(
        run=run,
        epochs_run=len(epochs),
        best_epoch=best["epoch"],
        best_val_acc=best["val_acc"],
        model=model_uri,
        seconds=finished - started,
        history=epochs,
        timings={
            "set_up": fit_started - started,
            "fit": fit_ended - fit_started,
            "epochs": sum(r["epoch_seconds"] for r in this_call),
            "train": sum(r["train_seconds"] for r in this_call),
            "export": finished - fit_ended,
        },
    )


def build_trainer(
    cfg: TrainConfig,
    run: str,
    spec: Preprocess,
    classes: list[str],
    manifest: dict[str, Any],
    progress: Callable[[str], None],
):
    """The TorchTrainer of the run: each worker's data, its loop's config, and where the run's
    checkpoints and metrics lines go."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from clf.training.embedded_trainer import EmbeddedTorchTrainer
    from clf.training.loader import worker_datasets
    from clf.training.loop import train_loop_per_worker

    os.environ.setdefault(HEALTH_CHECK_ENV, str(HEALTH_CHECK_INTERVAL_S))
    n_train = sum(manifest["counts"]["train"].values())
    gpu = runtime.use_gpu(cfg.device)
    datasets, streamed = worker_datasets(
        cfg.data.path, cfg.workers, cfg.data.read_cpus, cfg.data.batch_size, cfg.seed
    )
    if cfg.data.norm == "dataset":
        progress(f"[train] train-split statistics: mean {spec.mean}, std {spec.std}")
    progress(
        f"[train] {cfg.model.name} on {n_train} images, {len(classes)} classes, {cfg.workers} workers "
        f"({'GPU' if gpu else 'CPU'}), {cfg.epochs} epochs, strategy {cfg.model.strategy}"
    )
    trainer_cls = EmbeddedTorchTrainer if runtime.ray_is_embedded() else TorchTrainer
    return trainer_cls(
        train_loop_per_worker,
        train_loop_config={
            "train": to_dict(cfg),
            "classes": classes,
            "preprocess": spec.to_meta(),
            "run": run,
            "steps_per_epoch": max(1, n_train // (cfg.data.batch_size * cfg.workers)),
            "class_counts": class_counts(manifest, classes),
            "streamed": streamed,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=gpu,
            resources_per_worker=None if gpu else {"CPU": cpus_per_worker(cfg.workers)},
            placement_strategy="SPREAD",
        ),
        run_config=ray.train.RunConfig(
            **_storage_args(run),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max",
            ),
            worker_runtime_env={
                # Ray Train's print patch both prints and logs each line: progress came twice.
                "env_vars": {**runtime.forwarded_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
            },
            callbacks=[history.CommittedEpochLog(run)],
            # Its INFO lines restate every report and checkpoint that our progress lines show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=streamed),
    )


def run_config(run: str) -> dict[str, Any]:
    """The resolved config a run wrote, with its classes and preprocessing."""
    config_uri = storage.join(run, "config.json")
    if not storage.exists(config_uri):
        raise UsageError(f"--run {run}: not a training run (no config.json)")
    return storage.read_json(config_uri)


def run_sample(resolved: dict[str, Any], sample: str | None = None) -> Sample:
    """The images the export of a run (its ``run_config``) is checked on: ``sample``, by default
    the first 256 images of its val split, or the packaged photos if that split has moved away."""
    if sample is None:
        val = storage.join(resolved["data"]["path"], "val")
        sample = val if storage.is_dir(val) else None  # data moved away: packaged photos
    spec = Preprocess.from_meta(resolved["preprocess"])
    return load_sample(sample, spec, resolved["classes"])


def export_run(
    run: str,
    folder: str | None = None,
    output: str | None = None,
    formats: tuple[str, ...] = ("torchscript",),
    sample: str | None = None,
    min_int8_agreement: float | None = None,
    images: Sample | None = None,
) -> str:
    """Export a run's best checkpoint (or ``folder``) as an artifact (default ``RUN/model``).

    Parity is checked on ``images``, by default those of ``run_sample``, and the model's labels
    of up to 2,000 images of their source are its reference for ``jobs.monitor``.
    """
    resolved = run_config(run)
    if folder is None:
        try:
            folder, _ = checkpoint.best_in_run(run)
        except FileNotFoundError:
            raise UsageError(f"--run {run}: no checkpoint yet") from None
    state = checkpoint.load_state_uri(folder)
    classes = resolved["classes"]
    name = resolved["model"]["name"]
    # The checkpoint holds every weight; only a CLIP network needs its weights' folder, for the
    # architecture they describe.
    pretrained = resolved["model"]["pretrained"] if clip.is_clip(name) else None
    model = create_network(name, classes, pretrained)
    model.load_state_dict(state.get("ema", state["model"]))  # the EMA weights were the ones scored
    epoch_metrics = {r["epoch"]: r for r in history.read(run)}.get(state["epoch"], {})
    output = output or storage.join(run, "model")
    spec = Preprocess.from_meta(resolved["preprocess"])
    if images is None:
        images = run_sample(resolved, sample)
    export_artifact(
        model,
        output,
        arch=resolved["model"]["name"],
        classes=classes,
        preprocess=spec,
        formats=tuple(formats),
        source_run=run,
        metrics={
            k: epoch_metrics[k] for k in ("epoch", "val_acc", "val_loss") if k in epoch_metrics
        },
        sample=images.images,
        labels=images.labels,
        sample_source=images.source,
        min_int8_agreement=min_int8_agreement,
        sample_uris=images.uris,
        reference=images.location,  # None for the packaged photos, which are nobody's data
    )
    return output
