"""The train and eval transforms built from a ``Preprocess`` spec (torchvision transforms v2).

Per-image transforms stop at a uint8 CHW tensor: a quarter of the bytes of float32 on their way
to the device. ``Preprocess.normalize`` then runs once per batch, on the device.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from clf.config import AugmentConfig
from clf.images.preprocess import Preprocess


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode(name)


@lru_cache(maxsize=16)  # stateless; GPU decode asks for it once per batch
def eval_transform(spec: Preprocess) -> v2.Compose:
    """Resize the shorter side, then center-crop: the only eval transforms."""
    return v2.Compose(
        [
            v2.Resize(spec.resize, interpolation=_interp(spec.interpolation), antialias=True),
            v2.CenterCrop(spec.crop),
            v2.PILToTensor(),
        ]
    )


def train_transform(spec: Preprocess, aug: AugmentConfig) -> v2.Compose:
    steps: list = [
        v2.RandomResizedCrop(
            spec.crop, scale=(aug.scale_min, 1.0), interpolation=_interp(spec.interpolation)
        )
    ]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation))
    if aug.color_jitter > 0:
        steps.append(v2.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    if aug.auto == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=_interp(spec.interpolation)))
    elif aug.auto == "randaugment":
        steps.append(v2.RandAugment(interpolation=_interp(spec.interpolation)))
    steps.append(v2.PILToTensor())
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(aug.random_erasing, value=0))
    return v2.Compose(steps)


def decode_size(spec: Preprocess, train: bool) -> int:
    """Shortest side a JPEG may be draft-decoded to without losing pixels the transform needs."""
    return spec.crop if train else spec.resize


def to_tensor_batch(images: list[Image.Image], transform: v2.Compose) -> torch.Tensor:
    return torch.stack([transform(image) for image in images])


def batch_mixer(aug: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix over a normalized float batch: (images, labels) -> (images, soft)."""
    mixers = []
    if aug.mixup > 0:
        mixers.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
    if aug.cutmix > 0:
        mixers.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
