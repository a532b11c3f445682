"""jobs.train: fine-tune or train an image classifier with Ray Train (DDP).

Settings come from defaults, then --config FILE.yaml, then --set KEY=VALUE, then the named flags.
Re-running with the same --output resumes from the last checkpoint.
"""

from __future__ import annotations

from clf import cli, runtime
from clf.config import (
    BASELINE_MODEL,
    TrainConfig,
    from_dict,
    get_key,
    load_yaml,
    merge,
    parse_override,
    to_dict,
)
from clf.errors import UsageError
from clf.training import DRIVER_MODULES
from clf.training.checks import check_train

# flag -> config key: the flags that scripts rely on, plus a few common ones.
FLAG_KEYS = {
    "data": "data.path",
    "model": "model.name",
    "output": "output",
    "workers": "workers",
    "epochs": "epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "pretrained": "model.pretrained",
    "strategy": "model.strategy",
    "head_epochs": "model.head_epochs",
    "input_size": "data.input_size",
    "device": "device",
    "seed": "seed",
    "optimizer": "optim.name",
    "schedule": "schedule.name",
    "label_smoothing": "optim.label_smoothing",
    "discriminative_lr": "optim.discriminative_lr",
    "accumulate": "optim.accumulate",
    "class_weights": "optim.class_weights",
    "sampler": "data.sampler",
    "norm": "data.norm",
    "augment": "augment.auto",
    "mixup": "augment.mixup",
    "cutmix": "augment.cutmix",
    "ema": "model.ema_decay",
    "early_stopping": "early_stopping",
    "max_failures": "max_failures",
}


def flag(p, name: str, **kwargs) -> None:
    """A flag of ``FLAG_KEYS``: it defaults to None (not given), so that --config and --set
    stand, and its help shows the config's own default."""
    value = get_key(TrainConfig(), FLAG_KEYS[name[2:].replace("-", "_")])
    text = kwargs.pop("help", "")
    if value not in (None, "") and "default" not in text:
        text = f"{text} (default: {value})"
    p.add_argument(name, help=text, **kwargs)


def build_parser():
    p = cli.parser("train", __doc__)
    flag(p, "--data", type=cli.location, help="jobs.ingest output (DST)")
    flag(p, "--model", help="small_cnn, a torchvision or a timm model name, or hog_svm (baseline)")
    flag(p, "--output", type=cli.location, help="run folder or s3:// prefix (RUN)")
    flag(p, "--workers", type=int, help="Ray Train workers (default 2)")
    flag(p, "--epochs", type=int, help="passes over the train split")
    flag(p, "--batch-size", type=int, help="per worker")
    flag(p, "--lr", type=float, help="peak learning rate, for the global batch")
    flag(p, "--pretrained", type=cli.location, help="state dict path or URI for the backbone")
    flag(p, "--strategy", help="frozen|finetune|two-phase")
    flag(p, "--head-epochs", type=int, help="two-phase: epochs of head-only training")
    flag(p, "--input-size", type=int, help="side of the square crop (default: the model's own)")
    flag(p, "--device", help="auto|cpu|cuda; auto: GPUs if the cluster has or can start GPU nodes")
    flag(p, "--seed", type=int, help="seed of initialisation, shuffling and augmentation")
    flag(p, "--optimizer", help="adamw|sgd")
    flag(p, "--schedule", help="cosine|step|onecycle|constant")
    flag(p, "--label-smoothing", type=float, help="share of the target spread over classes")
    flag(
        p,
        "--discriminative-lr",
        type=float,
        metavar="FACTOR",
        help="lr factor per backbone layer group below the head, e.g. 0.3 (1: off)",
    )
    flag(p, "--accumulate", type=int, help="micro-batches per optimizer step")
    flag(p, "--class-weights", help="none|balanced loss weights")
    flag(p, "--sampler", help="shuffle|balanced (every class equally often)")
    flag(p, "--norm", help="model|imagenet|dataset normalisation statistics")
    flag(p, "--augment", help="none|trivial|randaugment")
    flag(p, "--mixup", type=float, metavar="ALPHA", help="MixUp's Beta(α, α); 0: off")
    flag(p, "--cutmix", type=float, metavar="ALPHA", help="CutMix's Beta(α, α); 0: off")
    flag(p, "--ema", type=float, metavar="DECAY", help="evaluate and export a weight EMA")
    flag(
        p,
        "--early-stopping",
        type=int,
        metavar="PATIENCE",
        help="stop after this many epochs without a better val accuracy (default: off)",
    )
    flag(p, "--max-failures", type=int, help="worker failures to recover from")
    p.add_argument(
        "--preview-augmentations",
        action="store_true",
        help="write OUTPUT/augmentations.png of augmented train images and exit",
    )
    p.add_argument("--config", type=cli.location, help="YAML file of config keys (see README)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any key"
    )
    return p


def resolve(args) -> TrainConfig:
    values = to_dict(TrainConfig())
    if args.config:
        values = merge(values, _flatten(load_yaml(args.config)))
    values = merge(values, dict(parse_override(s) for s in args.set))
    flags = {
        key: getattr(args, flag)
        for flag, key in FLAG_KEYS.items()
        if getattr(args, flag) is not None
    }
    return from_dict(TrainConfig, merge(values, flags)).validate()


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train_baseline(cfg: TrainConfig, as_json: bool) -> None:
    from clf import storage
    from clf.evaluate import baseline

    model = storage.join(cfg.output, "model")
    meta = baseline.train_baseline(cfg.data.path, model, progress=cli.progress(as_json))
    val = meta["metrics"]
    lines = [
        f"fitted HOG+SVM -> {model}",
        f"val accuracy {val.get('top1', float('nan')):.3f}, macro F1 {val.get('f1_macro', float('nan')):.3f}",
    ]
    cli.emit({"model": model, "val_acc": val.get("top1"), "metrics": val}, lines, as_json)


def main() -> None:
    args = build_parser().parse_args()
    cfg = resolve(args)
    if args.preview_augmentations and cfg.model.name == BASELINE_MODEL:
        raise UsageError(f"--preview-augmentations: {BASELINE_MODEL} does not augment images")
    classes, manifest = check_train(cfg)
    if cfg.model.name == BASELINE_MODEL:  # the classical baseline: scikit-learn, no Ray
        return train_baseline(cfg, args.json)
    if args.preview_augmentations:
        from clf import storage
        from clf.training.preview import preview_augmentations
        from clf.training.trainer import resolve_preprocess

        png = preview_augmentations(
            cfg, resolve_preprocess(cfg), storage.join(cfg.output, "augmentations.png")
        )
        cli.emit({"preview": png}, [f"augmentation preview: {png}"], args.json)
        return
    runtime.init_ray_importing(*DRIVER_MODULES)
    from clf.training.trainer import train

    summary = train(
        cfg,
        classes,
        manifest,
        progress=cli.progress(args.json),
        fitted=runtime.shut_down_ray_in_background,
    )
    last = summary.history[-1] if summary.history else {}
    lines = [
        f"trained {cfg.model.name}: {summary.epochs_run} epoch(s) in {summary.seconds:.0f}s "
        f"-> {summary.run}",
        f"best val accuracy {summary.best_val_acc:.3f} at epoch {summary.best_epoch + 1}; "
        f"last train {last.get('images_per_s', 0):.1f} img/s",
        f"model artifact: {summary.model}",
        "seconds: set-up {set_up:.1f}, Ray Train {fit:.1f} (epochs {epochs:.1f}, of which "
        "training {train:.1f}), export {export:.1f}".format(**summary.timings),
    ]
    cli.emit(
        {
            "run": summary.run,
            "best_val_acc": summary.best_val_acc,
            "best_epoch": summary.best_epoch,
            "epochs_run": summary.epochs_run,
            "model": summary.model,
            "seconds": summary.seconds,
            "timings": summary.timings,
        },
        lines,
        args.json,
    )


if __name__ == "__main__":
    cli.run("train", main)
