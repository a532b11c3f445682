"""Preprocessing specs and the train/eval transforms built from them (torchvision transforms v2).

Per-image transforms stop at a uint8 CHW tensor: a quarter of the bytes of float32 on their way
to the device. ``normalize`` then runs once per batch, on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from clf.config import AugmentConfig
from clf.decode import DEFAULT_MAX_ONE_COLOUR, decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; stored in every artifact's meta.json."""

    input_size: int = 224
    resize: int = 256  # shorter side before the center crop
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def crop(self) -> int:
        return self.input_size

    def to_meta(self) -> dict:
        meta = asdict(self)
        meta["crop"] = self.crop
        meta["mean"], meta["std"] = list(self.mean), list(self.std)
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> Preprocess:
        return cls(
            input_size=int(meta["input_size"]),
            resize=int(meta["resize"]),
            interpolation=str(meta["interpolation"]),
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
        )

    def with_size(self, input_size: int) -> Preprocess:
        ratio = self.resize / self.input_size
        return Preprocess(
            input_size, round(input_size * ratio), self.interpolation, self.mean, self.std
        )


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode(name)


@lru_cache(maxsize=16)  # stateless, and label decode tasks ask for it once per batch
def eval_transform(spec: Preprocess) -> v2.Compose:
    """Resize the shorter side, then center-crop: the only eval transforms."""
    return v2.Compose(
        [
            v2.Resize(spec.resize, interpolation=_interp(spec.interpolation), antialias=True),
            v2.CenterCrop(spec.crop),
            v2.PILToTensor(),
        ]
    )


def eval_pixels(
    data: bytes,
    spec: Preprocess,
    max_pixels: int,
    max_one_colour: float | None = DEFAULT_MAX_ONE_COLOUR,
) -> torch.Tensor:
    """Encoded image -> its eval crop, uint8 CHW, decoded at reduced scale where the resize
    allows; raises ``DecodeError`` with the reason."""
    image = decode_image(
        data, min_size=spec.resize, max_pixels=max_pixels, max_one_colour=max_one_colour
    )
    return eval_transform(spec)(image)


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


def normalize(batch: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """uint8 NCHW on any device -> normalized float32."""
    mean = torch.tensor(spec.mean, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=batch.device).view(1, 3, 1, 1) * 255
    return (batch.float() - mean) / std


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
