"""What a model expects of its input, and the eval crop of one image, without torch.

The CPU decode tasks of jobs.label and jobs.evaluate need only this (through
``clf.inference.pixels``), so their Ray workers start without importing torch and torchvision,
seconds of CPU per worker that every job would pay before its first image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from clf.images.decode import DEFAULT_MAX_ONE_COLOUR, decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,  # as torchvision maps it for PIL images
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


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

    def normalize(self, batch):
        """uint8 NCHW torch tensor on any device -> normalized float32. Tensor methods only:
        the module stays free of torch for decode tasks, and of torchvision for label actors."""
        pixels = batch.float()
        mean = pixels.new_tensor(self.mean).view(1, 3, 1, 1) * 255
        std = pixels.new_tensor(self.std).view(1, 3, 1, 1) * 255
        return (pixels - mean) / std

    def normalize_array(self, pixels: np.ndarray) -> np.ndarray:
        """``normalize`` of a uint8 NCHW numpy batch: the same float32 values, without torch."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
        # In place: under glibc's default allocator, each batch-sized temporary costs page
        # faults worth more than the arithmetic (RESULTS.md).
        normalized = pixels.astype(np.float32)
        normalized -= mean
        normalized /= std
        return normalized

    def with_size(self, input_size: int) -> Preprocess:
        ratio = self.resize / self.input_size
        return Preprocess(
            input_size, round(input_size * ratio), self.interpolation, self.mean, self.std
        )


def eval_crop(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB image -> uint8 CHW: the shorter side resized to ``spec.resize``, then center-cropped.

    Pixel for pixel ``transforms.eval_transform``, whose torchvision v2 kernels also resize PIL
    images with PIL (tests check the two agree); written out so that decode tasks skip torch.
    """
    width, height = image.size
    short, long = sorted((width, height))
    new_long = int(spec.resize * long / short)
    size = (spec.resize, new_long) if width <= height else (new_long, spec.resize)
    if size != image.size:
        image = image.resize(size, resample=PIL_FILTERS[spec.interpolation])
    top = int(round((size[1] - spec.crop) / 2.0))
    left = int(round((size[0] - spec.crop) / 2.0))
    image = image.crop((left, top, left + spec.crop, top + spec.crop))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def eval_pixels(
    data: bytes,
    spec: Preprocess,
    max_pixels: int,
    max_one_colour: float | None = DEFAULT_MAX_ONE_COLOUR,
) -> np.ndarray:
    """Encoded image -> its eval crop, uint8 CHW, decoded at reduced scale where the resize
    allows; raises ``DecodeError`` with the reason."""
    image = decode_image(
        data, min_size=spec.resize, max_pixels=max_pixels, max_one_colour=max_one_colour
    )
    return eval_crop(image, spec)
