"""Start-up: what every job costs before and after its work, from six photos to a thousand.

In one run, each job in a fresh process as users start it, with the pretrained MobileNetV2 as
an ONNX artifact (the CPU format):

  jobs.predict   6 photos (the demo's, from scikit-image and scikit-learn)
  jobs.label     6 photos and 1,000 ImageNet-sample JPEGs: by default (no cluster to join, so
                 at most --small-input images run in the job's process) and through the Ray
                 pipeline (--small-input 0)
  jobs.evaluate  6 and 1,000 ImageNet samples as shards, both ways
  jobs.train     1 epoch of hymenoptera, against Ray's documented TorchTrainer pattern for the
                 same epoch (benchmarks.train_throughput's ray-dl)
  actor start    the label pipeline's predictor actors (one per GPU, else one per 4 CPUs) from
                 Ray's asking to all of them ready: a bare actor's, then the predictor's, which
                 imports its runtime and loads the artifact (TorchScript on a GPU, else ONNX)

A job's parts: its summary's listing and work seconds; the rest of its wall time is imports,
Ray's start and stop and the model's load. Training's fixed cost is its wall time outside the
epoch: outside its training seconds alone, and outside the epoch as metrics.jsonl counts it
(training and validation); the pattern's epoch is its training. jobs.train's summary's timings
split its wall time into parts. The cheap runs repeat (--repeats) and report their median; the
training pair repeats as often, and each pair's ratio is taken within the pair.

    python -m benchmarks.startup [--repeats 3] [--no-train | --train-only | --actors-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks._jobs import ROOT, SHARED, mobilenet_weights, scratch_dir
from benchmarks.label_throughput import corpus
from clf.config import DEFAULT_MAX_PIXELS
from clf.label.predictor import Predictor

SAMPLES = SHARED / "imagenet-samples"


def run(*args: str) -> tuple[float, dict]:
    """(wall seconds, summary) of ``python -m ARGS --json``."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", *args, "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "local"},  # an embedded Ray, as on a laptop
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed with exit code {done.returncode}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def median_run(repeats: int, make_output, *args: str) -> tuple[float, dict]:
    """The median wall time of ``repeats`` runs, each into a fresh output."""
    runs = []
    for _ in range(repeats):
        output = make_output()
        runs.append(run(*args, *(["--output", output] if output else [])))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def photos(folder: str) -> list[str]:
    from examples.demo import write_photos

    write_photos(folder)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def sample_shards(work: str, classes: list[str], count: int) -> str:
    """``count`` ImageNet samples ingested as a test split whose classes match the model's:
    by name for a few, by position for all 1,000 (one image per class)."""
    from clf.config import IngestConfig
    from clf.dataset.ingest import ingest

    names = sorted(os.listdir(SAMPLES))
    src = os.path.join(work, f"samples-{count}")
    for name in names[:: len(names) // count][:count]:
        label = classes[names.index(name)] if count < len(names) else name.split("_", 1)[0]
        os.makedirs(os.path.join(src, label.replace("/", " ")), exist_ok=True)
        os.link(SAMPLES / name, os.path.join(src, label.replace("/", " "), name))
    dst = os.path.join(work, f"data-{count}")
    ingest(IngestConfig(src=src, dst=dst, val_fraction=0, test_fraction=0.9))
    return os.path.join(dst, "test")


class BareActor:
    def ready(self) -> bool:
        return True


class ReadyPredictor(Predictor):
    """The label pipeline's predictor, with a call that says it has started."""

    def ready(self) -> bool:
        return True


def print_actor_start(work: str, repeats: int) -> None:
    """Seconds from asking Ray for the label pipeline's predictor actors to all of them ready."""
    import ray

    from clf import runtime
    from clf.inference.stage import CPUS_PER_CPU_ACTOR, model_threads

    runtime.init_ray(streaming=True)
    gpus = runtime.gpu_actor_slots(1.0) if runtime.cluster_gpus() else 0
    count = gpus or max(1, int(ray.cluster_resources()["CPU"]) // CPUS_PER_CPU_ACTOR)
    art = os.path.join(work, "actor-art")
    run("jobs.export", "--model", "mobilenet_v2", "--pretrained", mobilenet_weights(),
        "--classes", "imagenet", "--format", "torchscript" if gpus else "onnx",
        "--output", art)  # fmt: skip

    def ready_after(cls, *args) -> float:
        started = time.perf_counter()
        actors = [
            ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(cls).remote(*args)
            for _ in range(count)
        ]
        ray.get([actor.ready.remote() for actor in actors])
        seconds = time.perf_counter() - started
        for actor in actors:
            ray.kill(actor)
        return seconds

    where = f"{count} on GPUs" if gpus else f"{count} on CPU"
    for attempt in range(repeats):
        bare = ready_after(BareActor)
        predictor = ready_after(ReadyPredictor, art, 5, bool(gpus), DEFAULT_MAX_PIXELS,
                                model_threads(count, bool(gpus)))  # fmt: skip
        print(
            f"predictor actors ({where}), try {attempt + 1}: a bare actor ready after {bare:.1f}s, "
            f"the predictor (imports, the artifact's load) after {predictor:.1f}s"
        )
    ray.shutdown()


def train_pair(work: str, shards: str, attempt: int) -> dict[str, float]:
    """One run of jobs.train and one of the Ray docs pattern, one epoch each: their wall times,
    their time outside the epoch, and where jobs.train's wall time went."""
    from benchmarks.train_throughput import DATA, measure

    run_dir = os.path.join(work, f"run-{attempt}")
    train = ["jobs.train", "--data", shards, "--output", run_dir, "--model", "mobilenet_v2"]
    train += ["--pretrained", mobilenet_weights(), "--epochs", "1", "--batch-size", "16"]
    wall, summary = run(*train, "--workers", "2")
    t = summary["timings"]
    args = argparse.Namespace(data=str(DATA), epochs=1, batch=32)
    docs = measure("ray-dl", args, {**os.environ, "RAY_ADDRESS": "local"})
    return {
        "imports, Ray start, exit": wall - summary["seconds"],
        "datasets and trainer": t["set_up"],
        "Ray Train start and stop": t["fit"] - t["epochs"],
        "the epoch's training": t["train"],
        "validation": t["epochs"] - t["train"],
        "export: parity, reference, curves": t["export"],
        "jobs.train wall": wall,
        # The epoch is its training, or its training and validation, as metrics.jsonl's
        # epoch_seconds counts it; the pattern's epoch has no validation.
        "jobs.train outside the training": wall - t["train"],
        "jobs.train outside the epoch": wall - t["epochs"],
        "pattern wall": docs["wall_seconds"],
        "pattern outside the epoch": docs["fixed_seconds"],
    }


def print_train(work: str, repeats: int) -> None:
    from benchmarks.train_throughput import DATA
    from clf.config import IngestConfig
    from clf.dataset.ingest import ingest

    shards = os.path.join(work, "hymenoptera")
    ingest(IngestConfig(src=str(DATA), dst=shards))
    pairs = [train_pair(work, shards, attempt) for attempt in range(repeats)]
    print(
        "| 1 epoch of hymenoptera, s | " + " | ".join(f"run {i + 1}" for i in range(repeats)) + " |"
    )
    print("|---|" + "---|" * repeats)
    for name in pairs[0]:
        print(f"| {name} | " + " | ".join(f"{p[name]:.1f}" for p in pairs) + " |")
    for outside in ("training", "epoch"):
        ratios = sorted(
            p[f"jobs.train outside the {outside}"] / p["pattern outside the epoch"] for p in pairs
        )
        print(
            f"jobs.train outside its {outside} / the Ray docs pattern outside its epoch: "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + f" (median {statistics.median(ratios):.2f}x)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-train", action="store_true", help="skip the two training runs")
    p.add_argument("--train-only", action="store_true", help="only the two training runs")
    p.add_argument("--actors-only", action="store_true", help="only the predictor actors' start")
    args = p.parse_args()
    work = scratch_dir("clf-startup-")
    if args.train_only:
        return print_train(work, args.repeats)
    if args.actors_only:
        return print_actor_start(work, args.repeats)
    art = os.path.join(work, "art")
    run("jobs.export", "--model", "mobilenet_v2", "--pretrained", mobilenet_weights(),
        "--classes", "imagenet", "--format", "onnx", "--output", art)  # fmt: skip
    classes = json.load(open(os.path.join(art, "meta.json")))["classes"]
    six = photos(os.path.join(work, "photos"))
    thousand = os.path.dirname(corpus(os.path.join(work, "jpegs"), 1000)[0])
    shards = {6: sample_shards(work, classes, 6), 1000: sample_shards(work, classes, 1000)}
    outputs = iter(range(10**6))

    def fresh() -> str:
        return os.path.join(work, f"out-{next(outputs)}")

    print(f"start-up: {os.cpu_count()} CPUs, ONNX MobileNetV2, {time.strftime('%Y-%m-%d')}")
    print("| job | images | path | wall s | listing s | work s | the rest s |")
    print("|---|---|---|---|---|---|---|")
    walls = {}
    wall, _ = median_run(args.repeats, lambda: None, "jobs.predict", "--model", art, *six)
    walls["predict", 6] = wall
    print(f"| jobs.predict | 6 | in process | {wall:.1f} | | | |")
    for images, folder in ((6, os.path.dirname(six[0])), (1000, thousand)):
        for path, flag in (("default", []), ("Ray", ["--small-input", "0"])):
            repeats = args.repeats if images == 6 else 1
            wall, s = median_run(
                repeats, fresh, "jobs.label", "--model", art, "--input", folder, *flag
            )
            walls["label", images, path] = wall
            rest = wall - s["listing_seconds"] - s["seconds"]
            print(
                f"| jobs.label | {images} | {path} | {wall:.1f} | {s['listing_seconds']:.1f} "
                f"| {s['seconds']:.1f} | {rest:.1f} |"
            )
    for images, split in shards.items():
        for path, flag in (("default", []), ("Ray", ["--small-input", "0"])):
            repeats = args.repeats if images == 6 else 1
            wall, s = median_run(
                repeats, fresh, "jobs.evaluate", "--model", art, "--data", split, *flag
            )
            walls["evaluate", images, path] = wall
            print(
                f"| jobs.evaluate | {images} | {path} | {wall:.1f} | | {s['seconds']:.1f} "
                f"| {wall - s['seconds']:.1f} |"
            )
    print(
        f"jobs.label / jobs.predict on 6 photos: {walls['label', 6, 'default'] / walls['predict', 6]:.2f}x "
        f"(the Ray path: {walls['label', 6, 'Ray'] / walls['predict', 6]:.2f}x)"
    )
    for job in ("label", "evaluate"):
        for images in (6, 1000):
            ratio = walls[job, images, "Ray"] / walls[job, images, "default"]
            print(
                f"jobs.{job} on {images}: the Ray path takes {ratio:.2f}x the default's wall time"
            )
    print_actor_start(work, args.repeats)
    if not args.no_train:
        print_train(work, args.repeats)


if __name__ == "__main__":
    main()
