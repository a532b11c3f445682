"""Labelling throughput: jobs.label against the seeds' loop, plain PyTorch and Ray's docs pattern.

All methods label the same real JPEG files (the ImageNet samples, copied under new names until
there are --images of them) with the pretrained MobileNetV2 and write the same rows (uri, top-5)
to Parquet, each in a fresh process:

  (a) seeds     one image at a time: PIL open, transform, forward, top-5
  (b) pytorch   DataLoader with 2 workers, batch 64, inference_mode, pyarrow writer
  (c) ray-docs  read_images -> map(preprocess) -> map_batches(actor pool) -> write_parquet
  (d) bound     forward passes only, on pre-decoded tensors, at the best batch size
      bound-artifact  the same, through the artifact and model call jobs.label runs
                  (onnxruntime on a CPU), on every core: the job's predictor with decoding free
      jobs.label

Images/s is inputs over the method's wall time from its first image to its output written
(start-up excluded, since every method pays its own); a second figure counts the whole process,
start-up and shutdown included (for jobs.label, the job's own process, not the export). The
set runs twice: in the default environment and with the best glibc allocator settings given to
every method.

    python -m benchmarks.label_throughput [--images 2000] [--envs default,tuned]

On a machine with a GPU, (d) and jobs.label run there (bf16 autocast, channels_last, TorchScript
artifact); ``--arch resnet50`` and ``--random-init`` serve a GPU host without the weights package.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks._jobs import environments, mobilenet_weights, scratch_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "imagenet-samples"
METHODS = ("seeds", "pytorch", "ray-docs", "bound", "bound-artifact", "jobs.label")


def corpus(folder: str, count: int, samples: str = str(SAMPLES)) -> list[str]:
    """``count`` real JPEGs: the samples, cycled under new names so every file is distinct.

    Hard links where the file system allows, copies elsewhere: the job lists, opens and reads
    each name as a file of its own either way, and a GPU node's 300,000-file corpus is made in
    seconds and fits its disk.
    """
    names = sorted(n for n in os.listdir(samples) if n.lower().endswith((".jpeg", ".jpg")))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        name = names[i % len(names)]
        source, path = os.path.join(samples, name), os.path.join(folder, f"{i:06d}_{name}")
        if not os.path.exists(path):
            try:
                os.link(source, path)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(source, path)
        paths.append(path)
    return paths


def weights_file(arch: str, random_init: bool) -> str:
    """The state dict every method loads: MobileNetV2's shipped ImageNet weights, or a seeded
    random init (throughput does not depend on the weights' values)."""
    if arch == "mobilenet_v2" and not random_init:
        return mobilenet_weights()
    import torch
    import torchvision

    path = os.path.join(tempfile.gettempdir(), f"clf-bench-random-{arch}.pth")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(arch).state_dict(), path)
    return path


def model(arch: str, weights: str):
    import torch
    import torchvision

    net = torchvision.models.get_model(arch)
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net.eval()


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def transform():
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


def write_rows(path: str, uris: list[str], scores, indices) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "uri": uris,
                "topk_ids": [list(map(int, row)) for row in indices],
                "topk_scores": [list(map(float, row)) for row in scores],
            }
        ),
        path,
    )


# ------------------------------------------------------------------------------------------
# Methods (each in its own process; each returns the seconds of its labelling work)


def run_seeds(files: list[str], out: str, arch: str, weights: str) -> float:
    import torch
    from PIL import Image

    net, tf = model(arch, weights), transform()
    started = time.perf_counter()
    scores, indices = [], []
    with torch.no_grad():
        for path in files:
            x = tf(Image.open(path).convert("RGB")).unsqueeze(0)
            top = torch.softmax(net(x), 1).topk(5)
            scores.append(top.values[0].tolist())
            indices.append(top.indices[0].tolist())
    write_rows(out, files, scores, indices)
    return time.perf_counter() - started


class Files:
    def __init__(self, files):
        self.files, self.tf = files, transform()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.open(self.files[i]).convert("RGB"))


def run_pytorch(files: list[str], out: str, arch: str, weights: str) -> float:
    import torch
    from torch.utils.data import DataLoader

    net = model(arch, weights)
    started = time.perf_counter()
    scores, indices = [], []
    loader = DataLoader(Files(files), batch_size=64, num_workers=2)
    with torch.inference_mode():
        for x in loader:
            top = torch.softmax(net(x), 1).topk(5)
            scores += top.values.tolist()
            indices += top.indices.tolist()
    write_rows(out, files, scores, indices)
    return time.perf_counter() - started


class DocsClassifier:
    def __init__(self, arch: str, weights: str):
        self.net = model(arch, weights)

    def __call__(self, batch):
        import torch

        with torch.inference_mode():
            top = torch.softmax(self.net(torch.as_tensor(batch["image"])), 1).topk(5)
        return {
            "uri": batch["path"],
            "topk_ids": top.indices.numpy(),
            "topk_scores": top.values.numpy(),
        }


def run_ray_docs(files: list[str], out: str, arch: str, weights: str) -> float:
    import ray
    from ray.data import ActorPoolStrategy

    ray.init(logging_level="WARNING")
    tf = transform()

    def preprocess(row):
        from PIL import Image

        row["image"] = tf(Image.fromarray(row["image"])).numpy()
        return row

    started = time.perf_counter()
    ray.data.read_images(files, mode="RGB", include_paths=True).map(preprocess).map_batches(
        DocsClassifier,
        fn_constructor_kwargs={"arch": arch, "weights": weights},
        compute=ActorPoolStrategy(size=1),
        batch_size=64,
    ).write_parquet(out)
    seconds = time.perf_counter() - started
    ray.shutdown()
    return seconds


def fastest(
    name: str,
    step: Callable[[int, int], None],
    count: int,
    batches: tuple[int, ...],
    sync: Callable[[], None] = lambda: None,
) -> float:
    """Images/s of ``step(start, batch)`` over the pre-decoded images ``[0, count)``, at the
    fastest of ``batches``; ``sync`` waits for a GPU's queued work."""
    passes = 8 if gpu() else 1
    best = 0.0
    for batch in batches:
        assert count % batch == 0, (count, batch)
        step(0, batch)  # warm-up
        sync()
        started, seen = time.perf_counter(), 0
        while seen < count * passes:
            step(seen % count, batch)
            seen += batch
        sync()
        rate = seen / (time.perf_counter() - started)
        print(f"  {name} at batch {batch}: {rate:.1f} img/s", flush=True)
        best = max(best, rate)
    return best


def run_bound(files: list[str], out: str, arch: str, weights: str) -> float:
    """Forward passes on pre-decoded tensors at the best of a few batch sizes; scaled to N.
    channels_last, which oneDNN runs 1.4x faster here too; on a GPU also bf16 autocast, as
    jobs.label's predictor runs there."""
    import torch
    from PIL import Image

    cuda = gpu()
    device = torch.device("cuda" if cuda else "cpu")
    net, tf = model(arch, weights).to(device), transform()
    net = net.to(memory_format=torch.channels_last)
    count = 512 if cuda else 128
    tensors = torch.stack([tf(Image.open(p).convert("RGB")) for p in files[:count]]).to(device)
    tensors = tensors.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if cuda else lambda: None

    def step(start: int, batch: int) -> None:
        net(tensors[start : start + batch]).float().softmax(1).topk(5)

    with torch.inference_mode(), torch.autocast("cuda", enabled=cuda, dtype=torch.bfloat16):
        best = fastest("bound", step, count, (64, 256, 512) if cuda else (1, 8, 32, 64), sync)
    return len(files) / best


def export_artifact(arch: str, weights: str) -> str:
    """The artifact jobs.label runs: ONNX on a CPU, where on one thread onnxruntime outruns
    eager PyTorch on two (RESULTS.md); TorchScript on a GPU."""
    art = os.path.join(scratch_dir("bench-label-"), "art")
    subprocess.run(
        [sys.executable, "-m", "jobs.export", "--model", arch, "--pretrained", weights]
        + ["--classes", "imagenet", "--format", "torchscript" if gpu() else "onnx"]
        + ["--output", art],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return art


def run_bound_artifact(files: list[str], out: str, arch: str, weights: str) -> float:
    """(d) through jobs.label's own artifact and model call (``predict_proba`` and top-5 on
    uint8 pixels that the job's decode made), with every core for the model."""
    import numpy as np

    from clf.artifact.classifier import load_classifier, top_k
    from clf.artifact.meta import read_meta
    from clf.config import DEFAULT_MAX_PIXELS, LabelConfig
    from clf.images.preprocess import Preprocess
    from clf.inference.pixels import decode_batch

    art = export_artifact(arch, weights)
    cuda = gpu()
    classifier = load_classifier(art, prefer_gpu=cuda, threads=None if cuda else os.cpu_count())
    count = 512 if cuda else 128
    uris = np.array(files[:count], dtype=object)
    preprocess = Preprocess.from_meta(read_meta(art)).to_meta()
    pixels = decode_batch({"uri": uris}, preprocess, DEFAULT_MAX_PIXELS)["pixels"]

    def step(start: int, batch: int) -> None:
        top_k(classifier.predict_proba(pixels[start : start + batch]), 5)

    # On a CPU the classifier sizes its own onnxruntime calls; the job's batch is what it gets.
    batches = (64, 256, 512) if cuda else (LabelConfig.batch_size,)
    return len(files) / fastest("artifact bound", step, count, batches)


def run_jobs_label(files: list[str], out: str, arch: str, weights: str) -> dict:
    """The job's labelling seconds, and its whole process's wall time (the export that makes
    its artifact is not the job's)."""
    art = export_artifact(arch, weights)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--model", art, "--input", os.path.dirname(files[0])]
        + ["--output", out, "--json"]
        + shlex.split(os.environ.get("CLF_BENCH_LABEL_ARGS", "")),
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,  # the summary line; progress goes on to stderr, live
        text=True,
    )
    wall = time.perf_counter() - started
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["labelled"] == len(files), summary
    print(f"  jobs.label summary: {json.dumps(summary)}")
    return {"seconds": summary["seconds"], "wall": wall}


RUNNERS = {
    "seeds": run_seeds,
    "pytorch": run_pytorch,
    "ray-docs": run_ray_docs,
    "bound": run_bound,
    "bound-artifact": run_bound_artifact,
    "jobs.label": run_jobs_label,
}


def measure(
    method: str, files: list[str], env: dict[str, str], arch: str, weights: str
) -> tuple[float, float]:
    """(images/s of the labelling work, images/s over the whole process's wall time)."""
    out = scratch_dir(f"bench-{method}-")
    output = os.path.join(out, "rows" if method in ("jobs.label", "ray-docs") else "rows.parquet")
    listing = os.path.join(out, "files.json")
    with open(listing, "w") as f:
        json.dump(files, f)
    code = (
        "import json; from benchmarks.label_throughput import RUNNERS; "
        f"files = json.load(open({listing!r})); "
        f"print(json.dumps(RUNNERS[{method!r}](files, {output!r}, {arch!r}, {weights!r})))"
    )
    # stderr passes through: a long run shows its progress, and a failure its traceback.
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{method} failed with exit code {done.returncode} (stderr above)")
    for line in done.stdout.splitlines()[:-1]:
        print(line)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if isinstance(result, dict):  # a method that knows its own process's wall time
        result, wall = result["seconds"], result["wall"]
    return len(files) / result, len(files) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--envs", default="default,tuned")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--arch", default="mobilenet_v2", help="a torchvision model name")
    p.add_argument("--random-init", action="store_true", help="seeded random weights")
    p.add_argument("--samples", default=str(SAMPLES), help="folder of JPEGs to cycle")
    p.add_argument(
        "--label-args",
        default="",
        help="extra jobs.label flags, e.g. '--gpus-per-actor 0.25 --batch-size 256'",
    )
    args = p.parse_args()
    os.environ["CLF_BENCH_LABEL_ARGS"] = args.label_args
    weights = weights_file(args.arch, args.random_init or args.arch != "mobilenet_v2")
    folder = os.path.join(tempfile.gettempdir(), f"clf-label-bench-{args.images}")
    files = corpus(folder, args.images, args.samples)
    device = "CPU only"
    if gpu():
        import torch

        device = torch.cuda.get_device_name(0)
    print(
        f"label throughput: {args.arch} ({os.path.basename(weights)}), {args.images} real JPEGs, "
        f"{os.cpu_count()} CPUs, {device}, {time.strftime('%Y-%m-%d')}"
        + (f"; jobs.label {args.label_args}" if args.label_args else "")
    )
    for env_name, env in environments(args.envs):
        rates, whole = {}, {}
        for method in args.methods.split(","):
            rates[method], whole[method] = measure(method, files, env, args.arch, weights)
            print(
                f"  {env_name:<7} {method:<14} {rates[method]:7.1f} img/s, "
                f"{whole[method]:7.1f} img/s over the whole process",
                flush=True,
            )
        peers = {m: r for m, r in rates.items() if m in ("seeds", "pytorch", "ray-docs")}
        fastest_peer = max(peers, key=peers.get) if peers else None
        print(f"\n== {env_name} environment (fastest of a-c: {fastest_peer}) ==")
        for method, rate in rates.items():
            ratio = f"  {rate / peers[fastest_peer]:5.2f}x fastest a-c" if fastest_peer else ""
            print(f"{method:<14} {rate:7.1f} img/s{ratio}")
        if fastest_peer and "jobs.label" in rates:
            wholes = {m: whole[m] for m in peers}
            best = max(wholes, key=wholes.get)
            print(
                f"whole process wall time counted: jobs.label {whole['jobs.label']:.1f} img/s, "
                f"{whole['jobs.label'] / wholes[best]:.2f}x the fastest of a-c ({best}, "
                f"{wholes[best]:.1f} img/s)"
            )
        if "jobs.label" in rates:
            mine = rates["jobs.label"]
            if "ray-docs" in rates:
                print(f"jobs.label / ray-docs: {mine / rates['ray-docs']:.2f}x")
            if "bound" in rates:
                print(f"jobs.label / model-only bound: {mine / rates['bound']:.0%}")
            if "bound-artifact" in rates:
                print(
                    f"jobs.label / its own artifact's bound: {mine / rates['bound-artifact']:.0%}"
                )


if __name__ == "__main__":
    main()
