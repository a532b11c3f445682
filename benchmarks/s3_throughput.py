"""Labelling from object storage: jobs.label on the same images as local files and as S3 objects.

The images are N real CIFAR-10 JPEGs, cycled under new names past the 10,000 there are. A moto
server on loopback holds them as objects (``benchmarks._moto``). In front of it the tests' fault
proxy, with no faults, holds every request for a fixed delay, as a real object store's round
trip would, and counts the requests by S3 call. Each run is ``python -m jobs.label`` in a fresh
process, as users run it, writing to a local folder, so the requests counted are the job's own
reads and listings.

For local files, S3 direct (the proxy with no delay) and S3 at each --delays, it prints the
job's img/s (the fastest of --repeat rounds), its ratio to S3 direct and to local, the object
requests (GET and HEAD) per image read, the peak PSS of the job's process tree, and moto's CPU
per image. ``--memory A,B`` labels A and then B images from S3 for the peak-memory ratio;
``--listing-keys N`` lists N keys directly and at +20 ms. ``--model-load`` times the artifact's
load from the bucket, first on an empty machine cache and then from the machine's copy.

    python -m benchmarks.s3_throughput [--images 3000] [--delays 20,50] [--model tiny]
        [--repeat 2] [--label-args "--read-concurrency 16"] [--memory 2000,20000]
        [--listing-keys 200000] [--model-load]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from benchmarks._jobs import SHARED, free_port, mobilenet_weights, scratch_dir
from benchmarks._moto import CREDENTIALS, MotoServer, moto_server, object_key
from benchmarks.label_memory import tree_pss
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]
CIFAR = SHARED / "cifar10-small" / "train"
BUCKET = "bench"
JOB_TIMEOUT_S = 1800  # each run is bounded; a run that hangs fails the benchmark


def images(count: int) -> list[str]:
    cifar = sorted(glob.glob(str(CIFAR / "*" / "*.jpg")))
    return [cifar[i % len(cifar)] for i in range(count)]


def local_folder(paths: list[str]) -> str:
    """The same files under the same names as the objects: hard links in a scratch folder."""
    folder = scratch_dir("clf-s3-bench-local-")
    for i, path in enumerate(paths):
        os.link(path, os.path.join(folder, os.path.basename(object_key("", i, path))))
    return folder


def artifact(name: str) -> str:
    art = os.path.join(scratch_dir("clf-s3-bench-art-"), "art")
    if name == "tiny":  # a random 32 px CNN: the model costs next to nothing, reading is all
        import torch

        from clf.artifact.export import export_artifact
        from clf.images.preprocess import Preprocess
        from clf.models import create_model

        torch.manual_seed(0)
        export_artifact(
            create_model("small_cnn", 10, drop_rate=0.0).eval(),
            art,
            arch="small_cnn",
            classes=[str(i) for i in range(10)],
            preprocess=Preprocess(input_size=32, resize=32),
            formats=("onnx",),
        )
    else:
        from clf.artifact.export import from_pretrained

        from_pretrained(name, mobilenet_weights(), "imagenet", art, ("onnx",))
    return art


def label(
    art: str, source: str, proxy: FaultProxy, label_args: list[str], moto: MotoServer
) -> dict:
    """One jobs.label run; its summary, the requests it made, its peak memory, and the CPU
    that the moto server spent meanwhile (it shares this machine's cores with the job)."""
    work = scratch_dir("clf-s3-bench-run-")
    moto_cpu = psutil.Process(moto.pid).cpu_times()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url}
    before = Counter(proxy.calls)
    with open(os.path.join(work, "stderr"), "w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.label", "--model", art, "--input", source]
            + ["--output", os.path.join(work, "rows"), "--json", *label_args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        peak, stop = 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(process.pid)
            while not stop.wait(0.5):
                peak = max(peak, tree_pss(root))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, _ = process.communicate(timeout=JOB_TIMEOUT_S)
        finally:
            stop.set()
            sampler.join()
        if process.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"jobs.label failed on {source}:\n{stderr.read()[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    calls = Counter(proxy.calls)
    calls.subtract(before)
    reads = calls["GetObject"] + calls["HeadObject"]
    moto_now = psutil.Process(moto.pid).cpu_times()
    moto_cpu_s = moto_now.user + moto_now.system - moto_cpu.user - moto_cpu.system
    return {
        "img_per_s": summary["images_per_s"],
        "labelled": summary["labelled"],
        "listing_s": summary["listing_seconds"],
        "requests_per_image": reads / summary["labelled"] if summary["labelled"] else 0.0,
        "list_requests": calls["ListObjects"],
        "peak_mib": peak / 2**20,
        "moto_cpu_ms_per_image": 1000 * moto_cpu_s / max(summary["labelled"], 1),
    }


def throughput(args, label_args: list[str]) -> None:
    paths = images(args.images)
    art = artifact(args.model)
    folder = local_folder(paths)
    prefix = f"{BUCKET}/images-{args.images}"
    with moto_server(free_port(), files={prefix: paths}) as moto:
        proxy = FaultProxy(moto.url, rate=0.0).start()
        runs: dict[str, dict] = {}

        def keep_fastest(name: str, run: dict) -> None:
            print(f"  {name}: {json.dumps(run)}", flush=True)
            if name not in runs or run["img_per_s"] > runs[name]["img_per_s"]:
                runs[name] = run

        try:
            # Rounds of every place in turn, so that the machine's slow spells fall on all.
            for _ in range(args.repeat):
                keep_fastest("local", label(art, folder, proxy, label_args, moto))
                for delay in [0, *args.delays]:
                    proxy.delay_s = delay / 1000
                    name = "S3 direct" if delay == 0 else f"S3 +{delay} ms"
                    keep_fastest(name, label(art, f"s3://{prefix}", proxy, label_args, moto))
        finally:
            proxy.stop()
    direct, local = runs["S3 direct"]["img_per_s"], runs["local"]["img_per_s"]
    print(
        f"\n{'where':<12} {'img/s':>8} {'/direct':>8} {'/local':>7} {'req/img':>8} "
        f"{'peak MiB':>9} {'moto ms/img':>12}"
    )
    for name, r in runs.items():
        print(
            f"{name:<12} {r['img_per_s']:8.1f} {r['img_per_s'] / direct:8.2f} "
            f"{r['img_per_s'] / local:7.2f} {r['requests_per_image']:8.2f} {r['peak_mib']:9.0f} "
            f"{r['moto_cpu_ms_per_image']:12.1f}"
        )


def memory(args, label_args: list[str]) -> None:
    counts = [int(n) for n in args.memory.split(",")]
    paths = images(max(counts))
    art = artifact(args.model)
    files = {f"{BUCKET}/memory-{n}": paths[:n] for n in counts}
    with moto_server(free_port(), files=files) as moto:
        proxy = FaultProxy(moto.url, rate=0.0).start()
        try:
            peaks = []
            for n in counts:
                r = label(art, f"s3://{BUCKET}/memory-{n}", proxy, label_args, moto)
                peaks.append(r["peak_mib"])
                print(f"  {n} images from S3: {json.dumps(r)}", flush=True)
        finally:
            proxy.stop()
    print(f"peak at {counts[-1]} / peak at {counts[0]}: {peaks[-1] / peaks[0]:.2f}x")


def listing(args) -> None:
    from clf.label.inputs import list_inputs

    keys = args.listing_keys
    with moto_server(free_port(), keys={f"{BUCKET}/listing": keys}) as moto:
        proxy = FaultProxy(moto.url, rate=0.0).start()
        os.environ.update(CREDENTIALS)
        try:
            for delay in (0, 20):
                proxy.delay_s = delay / 1000
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                before = proxy.calls["ListObjects"]
                started = time.monotonic()
                listed = len(list_inputs(f"s3://{BUCKET}/listing").uris)
                seconds = time.monotonic() - started
                pages = proxy.calls["ListObjects"] - before
                assert listed == keys, (listed, keys)
                print(
                    f"listing {keys} keys at +{delay} ms: {seconds:.1f} s, {pages} list requests, "
                    f"{seconds / max(pages, 1) * 1000:.0f} ms a request",
                    flush=True,
                )
        finally:
            proxy.stop()


def model_load(args) -> None:
    """An artifact's load from the bucket, as each predictor actor does: the first on a machine
    reads the model file, the later ones take the machine's copy."""
    import shutil

    from clf import storage
    from clf.artifact.classifier import load_classifier

    local = artifact(args.model)
    load_classifier(local, prefer_gpu=False)  # the imports, once, outside the timings
    os.environ["CLF_CACHE_DIR"] = scratch_dir("clf-s3-bench-cache-")  # an empty machine cache
    with moto_server(free_port(), keys={f"{BUCKET}/empty": 1}) as moto:
        proxy = FaultProxy(moto.url, rate=0.0).start()
        os.environ.update(CREDENTIALS)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        art = f"s3://{BUCKET}/models/{args.model}"
        for name in os.listdir(local):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(f"{art}/{name}", f.read())
        try:
            for delay in (0, *args.delays):
                proxy.delay_s = delay / 1000
                shutil.rmtree(storage.cache_dir(), ignore_errors=True)
                seconds, gets = [], []
                for _ in range(4):
                    before, started = proxy.calls["GetObject"], time.monotonic()
                    load_classifier(art, prefer_gpu=False)
                    seconds.append(time.monotonic() - started)
                    gets.append(proxy.calls["GetObject"] - before)
                warm = sorted(seconds[1:])[1]
                print(
                    f"model load at +{delay} ms ({args.model}): first {seconds[0]:.2f} s with "
                    f"{gets[0]} GETs; later {warm:.2f} s (median of 3) with {gets[1]} GETs, "
                    f"{seconds[0] / warm:.1f}x faster",
                    flush=True,
                )
        finally:
            proxy.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--delays", default="20,50", help="added ms per request, comma-separated")
    p.add_argument("--model", default="tiny", help="tiny (a random 32 px CNN) or mobilenet_v2")
    p.add_argument("--label-args", default="", help="extra jobs.label flags")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the fastest of each place")
    p.add_argument("--memory", default="", help="A,B: peak memory labelling A then B images")
    p.add_argument("--listing-keys", type=int, default=0, help="list this many keys")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--model-load", action="store_true", help="time the artifact's load")
    args = p.parse_args()
    args.delays = [int(d) for d in args.delays.split(",") if d]
    label_args = shlex.split(args.label_args)
    print(
        f"s3 throughput: {args.images} CIFAR JPEGs, model {args.model}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}" + (f"; jobs.label {args.label_args}" if label_args else "")
    )
    if not args.skip_throughput:
        throughput(args, label_args)
    if args.memory:
        memory(args, label_args)
    if args.listing_keys:
        listing(args)
    if args.model_load:
        model_load(args)


if __name__ == "__main__":
    main()
