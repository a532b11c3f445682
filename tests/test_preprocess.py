"""The torch-free eval crop that decode tasks use is the v2 eval transform, pixel for pixel."""

import numpy as np
import pytest
from conftest import HYMENOPTERA, IMAGENET_SAMPLES, imported_by
from PIL import Image

from clf.images.preprocess import Preprocess, eval_crop
from clf.images.transforms import eval_transform

SPECS = [
    Preprocess(),
    Preprocess(input_size=224, resize=256, interpolation="bicubic"),
    Preprocess(input_size=96, resize=110),
    Preprocess(input_size=32, resize=32, interpolation="lanczos"),
]


def real_images() -> list[Image.Image]:
    paths = sorted((HYMENOPTERA / "val" / "bees").iterdir())[:6]
    paths += sorted(IMAGENET_SAMPLES.iterdir())[:6]
    images = [Image.open(p).convert("RGB") for p in paths]
    # Portrait, landscape, square and smaller than the crop, so every branch of the size rule runs.
    return images + [images[0].transpose(Image.Transpose.ROTATE_90), images[1].resize((200, 200))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.input_size}-{s.interpolation}")
def test_eval_crop_matches_torchvisions_eval_transform(spec):
    for image in real_images():
        expected = eval_transform(spec)(image).numpy()
        got = eval_crop(image, spec)
        assert got.shape == (3, spec.crop, spec.crop) and got.dtype == np.uint8
        assert np.array_equal(got, expected), image.size


def test_decode_tasks_start_without_torch():
    """A Ray worker imports a task's module before its first task: torch would cost ~5 s."""
    assert imported_by("clf.inference.pixels", {"torch", "torchvision"}) == []


def test_normalize_scales_uint8_pixels_by_the_specs_mean_and_std():
    import torch

    spec = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    pixels[1] = 0
    out = spec.normalize(pixels)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 1.0]  # (1 - mean) / std per channel
    assert out[1, :, 0, 0].tolist() == [-1.0, -1.0, 0.0]


def test_normalizing_numpy_pixels_gives_torchs_float32_values_bit_for_bit():
    """The ONNX actor normalizes with numpy: its model must see what the torch path feeds."""
    import torch

    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    spec = Preprocess()
    out = spec.normalize_array(pixels)
    assert out.dtype == np.float32
    assert np.array_equal(out, spec.normalize(torch.from_numpy(pixels)).numpy())
