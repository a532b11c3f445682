"""Online prediction under load: jobs.serve against the tutorials' Flask server and a plain
FastAPI process, on loopback, in one run.

Three servers of the same MobileNetV2 ImageNet weights, each alone on the machine while it is
measured:

- (a) ``flask``: the pattern the tutorials write, one threaded Flask process with the eager
  torchvision model and torchvision transforms, one image per model call;
- (b) ``serve``: ``python -m jobs.serve`` with its defaults, on the artifact that
  ``jobs.export`` makes of those weights (``--format``, default ONNX as a CPU user exports);
- (c) ``fastapi``: one uvicorn process that runs the same artifact file through the same
  decoding as (b), one image per request, so (b)/(c) shows what Ray Serve's proxy and batching
  cost or buy here.

First every server answers the same --check images, and their top-1 must agree. Then an asyncio
client sends real JPEGs from ``../shared/data/imagenet-samples`` as raw bodies at each
--concurrency, for at most --seconds and --max-requests per level, and the benchmark prints
requests/s, p50 and p99 latency, errors, (b)'s mean batch size, and the ratios (b)/(a) and
(b)/(c).

    python -m benchmarks.serve_load [--concurrency 1,4,16,64] [--seconds 15] [--format onnx]
"""

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._jobs import ROOT, SHARED, free_port, job, mobilenet_weights, scratch_dir

SAMPLES = SHARED / "imagenet-samples"
START_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------
# The two servers that are not jobs.serve, each run as ``python -m benchmarks.serve_load --run``


def run_flask(port: int, weights: str) -> None:
    """(a): as the tutorials write it."""
    import torch
    import torchvision
    from flask import Flask, jsonify, request
    from PIL import Image
    from torchvision import transforms

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    classes = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        image = Image.open(io.BytesIO(request.get_data())).convert("RGB")
        with torch.no_grad():
            probs = torch.softmax(model(preprocess(image).unsqueeze(0)), dim=1)[0]
        scores, indices = probs.topk(5)
        top = [
            {"label": classes[i], "index": int(i), "score": float(s)}
            for s, i in zip(scores, indices)
        ]
        return jsonify({"top": top})

    @app.get("/readyz")
    def readyz():
        return {"ready": True}

    app.run(host="127.0.0.1", port=port, threaded=True)


def run_fastapi(port: int, model_uri: str) -> None:
    """(c): the artifact and decoding of jobs.serve, one image per request, no Ray."""
    import numpy as np
    import uvicorn
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    from clf.artifact.classifier import load_classifier, top_k
    from clf.config import DEFAULT_MAX_PIXELS
    from clf.images.preprocess import eval_pixels

    model = load_classifier(model_uri, prefer_gpu=False, threads=os.cpu_count())
    app = FastAPI()

    def classify(body: bytes) -> dict:
        pixels = eval_pixels(body, model.preprocess, DEFAULT_MAX_PIXELS)
        scores, indices = top_k(model.predict_proba(pixels[np.newaxis]), 5)
        top = [
            {"label": model.classes[i], "index": int(i), "score": float(s)}
            for s, i in zip(scores[0], indices[0])
        ]
        return {"top": top}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        # The model runs in FastAPI's thread pool, as a plain `def` route would.
        return await run_in_threadpool(classify, await request.body())

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------
# Starting, checking and loading the servers


class Server:
    def __init__(self, name: str, command: list[str], port: int):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        # A file, not a pipe: Flask logs every request, and a full pipe would stall it.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        import requests

        started = time.monotonic()
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{self.name} exited: {self.log.read()[-2000:]}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} was not ready after {START_TIMEOUT_S} s")

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def top1(server: Server, images: list[bytes]) -> list[int]:
    import requests

    answers = []
    for data in images:
        answer = requests.post(
            f"{server.url}/predict", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        answer.raise_for_status()
        answers.append(answer.json()["top"][0]["index"])
    return answers


async def load(url: str, images: list[bytes], concurrency: int, seconds: float, most: int) -> dict:
    """``concurrency`` clients, each sending one request after another, cycling ``images``."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal errors, sent
        i = offset
        while time.monotonic() < deadline and sent < most:
            sent += 1
            data = images[i % len(images)]
            i += concurrency
            started = time.perf_counter()
            async with session.post(
                f"{url}/predict", data=data, headers={"Content-Type": "image/jpeg"}
            ) as answer:
                await answer.read()
                if answer.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def batch_totals(url: str, scrapes: int = 20) -> dict[str, tuple[float, float]]:
    """{replica: (model calls, images)} so far, from jobs.serve's /metrics. Each scrape is
    answered by one replica, so several scrapes collect them all."""
    import requests

    totals: dict[str, dict[str, float]] = {}
    for _ in range(scrapes):
        for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith(("clf_serve_batch_size_count{", "clf_serve_batch_size_sum{")):
                name, _, rest = line.partition("{")
                replica = rest.split('replica="', 1)[1].split('"', 1)[0]
                totals.setdefault(replica, {})[name] = float(line.rsplit(" ", 1)[1])
    return {
        r: (t["clf_serve_batch_size_count"], t["clf_serve_batch_size_sum"])
        for r, t in totals.items()
    }


def mean_batch(before: dict, after: dict) -> float:
    calls = sum(after[r][0] - before.get(r, (0, 0))[0] for r in after)
    images = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    return images / calls if calls else float("nan")


def measure(server: Server, args, images: list[bytes]) -> list[dict]:
    asyncio.run(load(server.url, images, 4, 3, 200))  # warm-up: threads, connections, caches
    rows = []
    for concurrency in args.concurrency:
        before = batch_totals(server.url) if server.name == "serve" else None
        row = asyncio.run(load(server.url, images, concurrency, args.seconds, args.max_requests))
        if before is not None:
            row["mean_batch"] = mean_batch(before, batch_totals(server.url))
        rows.append(row)
        print(
            f"  {server.name:8s} c={concurrency:<3d} {row['rps']:7.1f} req/s  "
            f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}"
            + (f"  mean batch {row['mean_batch']:.2f}" if "mean_batch" in row else ""),
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    p.add_argument("--max-requests", type=int, default=5000, help="per concurrency level")
    p.add_argument("--format", default="onnx", help="of the artifact that (b) and (c) run")
    p.add_argument("--check", type=int, default=100, help="images whose top-1 must agree")
    p.add_argument("--serve-args", default="", help="more flags for jobs.serve")
    p.add_argument("--run", choices=["flask", "fastapi"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run == "flask":
        return run_flask(args.port, mobilenet_weights())
    if args.run == "fastapi":
        return run_fastapi(args.port, args.model)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    files = sorted(SAMPLES.glob("*.JPEG"))
    images = [f.read_bytes() for f in files]
    art = scratch_dir("serve-load-art-")
    weights = mobilenet_weights()
    job("jobs.export", "--model", "mobilenet_v2", "--pretrained", weights,
        "--classes", "imagenet", "--format", args.format, "--output", art)  # fmt: skip
    me = [sys.executable, "-m", "benchmarks.serve_load"]
    commands = {
        "flask": lambda port: [*me, "--run", "flask", "--port", str(port)],
        "serve": lambda port: [
            sys.executable,
            "-m",
            "jobs.serve",
            "--model",
            art,
            "--port",
            str(port),
            *args.serve_args.split(),
        ],  # fmt: skip
        "fastapi": lambda port: [*me, "--run", "fastapi", "--port", str(port), "--model", art],
    }
    print(f"{len(images)} ImageNet sample JPEGs; artifact format {args.format}; "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    results, top1s = {}, {}
    for name, command in commands.items():
        port = free_port()
        server = Server(name, command(port), port)
        try:
            ready_s = server.wait_ready()
            print(f"{name}: ready in {ready_s:.1f} s", flush=True)
            top1s[name] = top1(server, images[: args.check])
            results[name] = measure(server, args, images)
        finally:
            server.stop()
    agree = [a == b == c for a, b, c in zip(*top1s.values())]
    print(f"\ntop-1 agreement of (a), (b), (c) on {len(agree)} images: {sum(agree)}/{len(agree)}")
    print("\n| c | (a) flask req/s | (b) serve req/s | (c) fastapi req/s | (b)/(a) | (b)/(c) "
          "| p50 a / b / c ms | p99 a / b / c ms | (b) mean batch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b, c in zip(results["flask"], results["serve"], results["fastapi"]):
        print(
            f"| {a['concurrency']} | {a['rps']:.1f} | {b['rps']:.1f} | {c['rps']:.1f} "
            f"| {b['rps'] / a['rps']:.2f} | {b['rps'] / c['rps']:.2f} "
            f"| {a['p50_ms']:.0f} / {b['p50_ms']:.0f} / {c['p50_ms']:.0f} "
            f"| {a['p99_ms']:.0f} / {b['p99_ms']:.0f} / {c['p99_ms']:.0f} "
            f"| {b.get('mean_batch', float('nan')):.2f} |"
        )
    print(json.dumps({"results": results, "top1_agreement": sum(agree) / len(agree)}))


if __name__ == "__main__":
    main()
