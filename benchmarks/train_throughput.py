"""Training throughput: jobs.train against the seeds' loop and Ray's two documented patterns.

Every method fine-tunes the pretrained MobileNetV2 (all layers, 224 px) on the same real images
with the same global batch and epochs, each in a fresh process:

  (a) seeds   the seeds' single-process loop: ImageFolder + DataLoader
  (b) ray-dl  TorchTrainer, 2 workers, DataLoader through prepare_data_loader
  (c) ray-data TorchTrainer, 2 workers, read_images + iter_torch_batches
  (d) jobs.train with 2 workers

Training images/s counts only the epochs' training time; the rest of the wall time is the
fixed cost (imports, Ray start-up, worker set-up, shut-down; for jobs.train also validation and
export). The whole set runs twice: in the default environment, and with the best glibc
allocator settings given to every method.

    python -m benchmarks.train_throughput [--data DIR] [--epochs 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._jobs import environments, mobilenet_weights, scratch_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
METHODS = ("seeds", "ray-dl", "ray-data", "jobs.train")


def seeds_model(num_classes: int):
    import torch
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_weights(), weights_only=True))
    model.classifier[1] = torch.nn.Linear(model.last_channel, num_classes)
    return model


def seeds_transform():
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(224),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


def train_epochs(model, batches_of_epoch, epochs: int) -> tuple[float, int, list[float]]:
    """The seeds' loop body. Returns (training seconds, images, images/s of each epoch)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    seconds, images, rates = 0.0, 0, []
    for epoch in range(epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for x, y in batches_of_epoch(epoch):
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        seconds += time.perf_counter() - started
        images += seen
        rates.append(seen / (time.perf_counter() - started))
        print(f"  epoch {epoch + 1}: {rates[-1]:.1f} img/s (this worker)")
    return seconds, images, rates


# ------------------------------------------------------------------------------------------
# The methods, each run in its own process


def run_seeds(args) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(os.path.join(args.data, "train"), transform=seeds_transform())
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=2)
    model = seeds_model(len(dataset.classes))
    seconds, images, rates = train_epochs(model, lambda epoch: loader, args.epochs)
    return {"train_seconds": seconds, "images": images, "epoch_rates": rates}


def write_result(config: dict, seconds: float, images: int, rates: list[float]) -> None:
    """Rank 0's training time and the global image count (Train V2 results carry no metrics
    without a checkpoint, so the worker writes them itself)."""
    import ray.train

    context = ray.train.get_context()
    if context.get_world_rank() == 0:
        with open(config["result"], "w") as f:
            world = context.get_world_size()
            rates = [rate * world for rate in rates]
            json.dump({"train_seconds": seconds, "images": images * world, "epoch_rates": rates}, f)


def ray_dl_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(os.path.join(config["data"], "train"), transform=seeds_transform())
    loader = DataLoader(dataset, batch_size=config["batch"] // 2, shuffle=True)
    loader = ray.train.torch.prepare_data_loader(loader)
    model = ray.train.torch.prepare_model(seeds_model(len(dataset.classes)))

    def batches(epoch):
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        return loader

    seconds, images, rates = train_epochs(model, batches, config["epochs"])
    write_result(config, seconds, images, rates)


def ray_data_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    shard = ray.train.get_dataset_shard("train")
    model = ray.train.torch.prepare_model(seeds_model(config["classes"]))

    def batches(epoch):
        for batch in shard.iter_torch_batches(batch_size=config["batch"] // 2):
            yield batch["image"], batch["label"]

    seconds, images, rates = train_epochs(model, batches, config["epochs"])
    write_result(config, seconds, images, rates)


def run_ray(args, data_pattern: bool) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")
    classes = sorted(os.listdir(os.path.join(args.data, "train")))
    datasets = None
    if data_pattern:
        import numpy as np

        transform = seeds_transform()

        def preprocess(row: dict) -> dict:
            from PIL import Image

            image = transform(Image.fromarray(row["image"]))
            label = classes.index(os.path.basename(os.path.dirname(row["path"])))
            return {"image": image.numpy(), "label": np.int64(label)}

        datasets = {
            "train": ray.data.read_images(
                os.path.join(args.data, "train"), mode="RGB", include_paths=True
            ).map(preprocess)
        }
    trainer = TorchTrainer(
        ray_data_worker if data_pattern else ray_dl_worker,
        train_loop_config={
            "data": args.data,
            "batch": args.batch,
            "epochs": args.epochs,
            "classes": len(classes),
            "result": args.result,
        },
        # With the documented default of 1 CPU per worker, the two workers hold both CPUs of
        # this machine and Ray Data's read task never gets one (measured: no row in 7 minutes).
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": 0.5} if data_pattern else None
        ),
        run_config=ray.train.RunConfig(storage_path=scratch_dir("bench-ray-")),
        datasets=datasets,
    )
    trainer.fit()
    ray.shutdown()
    return json.load(open(args.result))


def run_jobs_train(args) -> dict:
    from clf.config import IngestConfig
    from clf.dataset.ingest import ingest

    work = scratch_dir("bench-jobs-")
    shards, run = os.path.join(work, "shards"), os.path.join(work, "run")
    ingest(IngestConfig(src=args.data, dst=shards))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "--data",
            shards,
            "--output",
            run,
            "--model",
            "mobilenet_v2",
            "--pretrained",
            mobilenet_weights(),
            "--strategy",
            "finetune",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch // 2),
            "--workers",
            "2",
            "--json",
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    seconds = sum(r["train_seconds"] for r in rows)
    images = sum(round(r["images_per_s"] * r["train_seconds"]) for r in rows)
    return {
        "train_seconds": seconds,
        "images": images,
        "epoch_rates": [r["images_per_s"] for r in rows],
    }


def child(args) -> None:
    runners = {
        "seeds": run_seeds,
        "ray-dl": lambda a: run_ray(a, data_pattern=False),
        "ray-data": lambda a: run_ray(a, data_pattern=True),
        "jobs.train": run_jobs_train,
    }
    result = runners[args.method](args)
    with open(args.result, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------
# The parent: every method in a fresh process, in both environments


def measure(method: str, args, env: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--method", method]
    command += ["--result", result_path, "--data", args.data]
    command += ["--epochs", str(args.epochs), "--batch", str(args.batch)]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    result = json.load(open(result_path))
    result["wall_seconds"] = wall
    result["fixed_seconds"] = wall - result["train_seconds"]
    result["images_per_s"] = result["images"] / result["train_seconds"]
    return result


def rates(result: dict) -> str:
    return " / ".join(f"{rate:.1f}" for rate in result["epoch_rates"])


def report(name: str, results: dict[str, dict]) -> None:
    peers = {m: r for m, r in results.items() if m != "jobs.train"}
    fastest = max(peers, key=lambda m: peers[m]["images_per_s"]) if peers else None
    print(f"\n== {name} (fastest peer: {fastest}) ==")
    print(
        f"{'method':<11} {'img/s':>7} {'fixed s':>8} {'wall s':>7} {'vs fastest peer':>16}"
        "  img/s by epoch"
    )
    for method, r in results.items():
        ratio = (
            f"{r['images_per_s'] / peers[fastest]['images_per_s']:15.2f}x" if peers else " " * 16
        )
        print(
            f"{method:<11} {r['images_per_s']:7.1f} {r['fixed_seconds']:8.1f} "
            f"{r['wall_seconds']:7.1f} {ratio}  {rates(r)}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="ImageFolder root with train/")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--envs", default="default,tuned")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        return child(args)
    print(
        f"train throughput: MobileNetV2 full fine-tune, 224 px, global batch {args.batch}, "
        f"{args.epochs} epochs, {args.data}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}"
    )
    for env_name, env in environments(args.envs):
        results = {}
        for method in args.methods.split(","):
            results[method] = measure(method, args, env)
            r = results[method]
            print(
                f"  {env_name:<7} {method:<11} {r['images_per_s']:6.1f} img/s, "
                f"fixed {r['fixed_seconds']:.1f}s, by epoch {rates(r)}",
                flush=True,
            )
        report(f"{env_name} environment", results)


if __name__ == "__main__":
    main()
