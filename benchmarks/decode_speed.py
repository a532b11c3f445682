"""Decode speed-up of JPEG draft mode: large photos decoded at a reduced DCT scale before the
resize, against a full-size decode followed by the same resize and crop.

Both paths run ``clf.images.decode.decode_image`` and the eval transform on the same bytes in one
process, one thread; only ``min_size`` differs (None disables draft). Prints images/s for each
and the ratio, for the large photos of ../shared/data and for the ImageNet samples (about
500 x 375, where draft cannot shrink anything for a 256-pixel resize).

    python -m benchmarks.decode_speed [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks._jobs import SHARED
from clf.images.decode import decode_image
from clf.images.preprocess import Preprocess
from clf.images.transforms import eval_transform


def rate(images: list[bytes], min_size: int | None, repeats: int) -> float:
    transform = eval_transform(Preprocess())
    started = time.perf_counter()
    for _ in range(repeats):
        for data in images:
            transform(decode_image(data, min_size=min_size))
    return len(images) * repeats / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    sets = {
        "large-photos": SHARED / "large-photos",
        "imagenet-samples (first 200)": SHARED / "imagenet-samples",
    }
    print(f"decode speed, 1 thread, {time.strftime('%Y-%m-%d')}")
    for name, folder in sets.items():
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg")))
        images = [(folder / f).read_bytes() for f in files[:200]]
        resize = Preprocess().resize
        rate(images[:2], resize, 1)  # warm-up
        draft, full = rate(images, resize, args.repeats), rate(images, None, args.repeats)
        print(
            f"{name:<30} {len(images):4d} images  draft {draft:7.1f} img/s  "
            f"full {full:7.1f} img/s  speed-up {draft / full:.2f}x"
        )


if __name__ == "__main__":
    main()
