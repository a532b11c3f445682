"""GPU check of the library's CUDA paths, for a machine with a GPU but without Ray.

- the label Predictor under bf16 autocast with pinned copies: ImageNet-sample top-1 and agreement
  with CPU fp32, then model-bound images/s (pre-decoded uint8 batches -> label rows);
- CPU decode throughput of the same images (decode_batch in a thread pool);
- JPEG decode on the GPU (read_batch, then the Predictor decodes with nvJPEG): top-1 agreement
  with CPU decode, and decode + resize + blank check images/s;
- training steps with AMP (bf16) and channels_last: images/s.

Prints one JSON line; usage: python benchmarks/gpu_check.py WEIGHTS IMAGENET_SAMPLES_DIR
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clf.artifact.export import export_artifact, from_pretrained
from clf.artifact.meta import read_meta
from clf.images.nvjpeg import decode_on_device
from clf.images.preprocess import Preprocess
from clf.inference.pixels import decode_batch, read_batch
from clf.label.predictor import Predictor
from clf.models import create_model


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main(weights: str, samples: str) -> dict:
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    art = tempfile.mkdtemp()
    from_pretrained("mobilenet_v2", weights, "imagenet", art)
    spec = Preprocess.from_meta(read_meta(art)).to_meta()
    uris = sorted(glob.glob(os.path.join(samples, "*.JPEG")))
    chunks = [np.array(uris[i : i + 25], dtype=object) for i in range(0, len(uris), 25)]
    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        decoded = list(pool.map(lambda c: decode_batch({"uri": c}, spec, 10**8), chunks))
    out["decode_img_per_s_threads"] = len(uris) / (time.perf_counter() - started)

    gpu, cpu = Predictor(art, 5, prefer_gpu=True), Predictor(art, 5, prefer_gpu=False)
    assert gpu.model.device.type == "cuda"
    # A subset carries the full class order in wnids.txt; the whole folder defines it itself.
    listing = os.path.join(samples, "wnids.txt")
    wnids = (
        open(listing).read().split()
        if os.path.exists(listing)
        else sorted(os.path.basename(u).split("_", 1)[0] for u in uris)
    )
    gpu_ids, cpu_ids, truth = [], [], []
    for batch in decoded:
        gpu_ids += gpu(batch).column("label_id").to_pylist()
        cpu_ids += cpu(batch).column("label_id").to_pylist()
        truth += [wnids.index(os.path.basename(u).split("_", 1)[0]) for u in batch["uri"]]
    out["gpu_bf16_top1"] = float(np.mean(np.array(gpu_ids) == np.array(truth)))
    out["cpu_fp32_top1"] = float(np.mean(np.array(cpu_ids) == np.array(truth)))
    out["gpu_cpu_top1_agreement"] = float(np.mean(np.array(gpu_ids) == np.array(cpu_ids)))

    read = [read_batch({"uri": c}, spec, 10**8) for c in chunks]
    out["device_decoded_share"] = float(
        np.mean(np.concatenate([r["kind"] for r in read]) == "jpeg")
    )
    device_ids = sum((gpu(r).column("label_id").to_pylist() for r in read), [])
    out["device_decode_top1"] = float(np.mean(np.array(device_ids) == np.array(truth)))
    out["device_vs_cpu_decode_top1_agreement"] = float(
        np.mean(np.array(device_ids) == np.array(gpu_ids))
    )
    jpegs = [open(uris[i % len(uris)], "rb").read() for i in range(256)]
    seconds = timed(
        lambda: decode_on_device(jpegs, gpu.model.preprocess, gpu.model.device, 10**8), 5
    )
    out["device_decode_img_per_s_batch256"] = 256 / seconds

    pixels = np.resize(np.concatenate([d["pixels"] for d in decoded]), (512, 3, 224, 224))
    batch = {
        "uri": np.array([f"u{i}" for i in range(512)], dtype=object),
        "pixels": pixels,
        "error": np.array([""] * 512, dtype=object),
    }
    for name in ("mobilenet_v2", "resnet50"):
        predictor = gpu
        if name != "mobilenet_v2":
            path = tempfile.mkdtemp()
            export_artifact(
                create_model(name, 1000).eval(),
                path,
                arch=name,
                classes=[str(i) for i in range(1000)],
                preprocess=Preprocess(),
            )
            predictor = Predictor(path, 5, prefer_gpu=True)
        seconds = timed(lambda p=predictor: p(batch), 5)
        out[f"predictor_{name}_img_per_s_batch512"] = 512 / seconds

    model = create_model("mobilenet_v2", 10).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(pixels[:128]).cuda()
    y = torch.randint(0, 10, (128,), device="cuda")

    def step():
        images = Preprocess().normalize(x).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out["train_amp_channels_last_img_per_s_batch128"] = 128 / timed(step, 10)
    return out


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    print(json.dumps(result))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=2)
