"""jobs.train: fine-tune or train an image classifier with Ray Train (DDP).

Settings come from defaults, then --config FILE.yaml, then --set KEY=VALUE, then the named flags.
Re-running with the same --output resumes from the last checkpoint.
"""

from __future__ import annotations

from clf import cli, runtime
from clf.config import TrainConfig, from_dict, load_yaml, merge, parse_override, to_dict

# flag -> config key; the flags scripts rely on (DESIGN.md) plus a few common ones.
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
}


def build_parser():
    p = cli.parser("train", __doc__)
    p.add_argument("--data", help="jobs.ingest output (DST)")
    p.add_argument("--model", help="small_cnn, a torchvision or a timm model name")
    p.add_argument("--output", help="run folder or s3:// prefix (RUN)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--lr", type=float)
    p.add_argument("--pretrained", help="state dict path or URI for the backbone")
    p.add_argument("--strategy", help="frozen|finetune|two-phase")
    p.add_argument("--head-epochs", type=int, help="two-phase: epochs of head-only training")
    p.add_argument("--input-size", type=int)
    p.add_argument("--device", help="auto|cpu|cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML file of config keys (see README)")
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


def main() -> None:
    args = build_parser().parse_args()
    cfg = resolve(args)
    from clf.training import train
    from clf.training.trainer import check

    check(cfg)
    runtime.init_ray()
    summary = train(cfg, progress=cli.progress(args.json))
    last = summary.history[-1] if summary.history else {}
    lines = [
        f"trained {cfg.model.name} for {summary.epochs_run} epoch lines in {summary.seconds:.0f}s -> {summary.run}",
        f"best val accuracy {summary.best_val_acc:.3f} at epoch {summary.best_epoch + 1}; "
        f"last train {last.get('images_per_s', 0):.1f} img/s",
        f"model artifact: {summary.model}",
    ]
    cli.emit(
        {
            "run": summary.run,
            "best_val_acc": summary.best_val_acc,
            "best_epoch": summary.best_epoch,
            "epochs_run": summary.epochs_run,
            "model": summary.model,
            "seconds": summary.seconds,
        },
        lines,
        args.json,
    )


if __name__ == "__main__":
    cli.run("train", main)
