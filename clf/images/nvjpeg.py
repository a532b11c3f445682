"""JPEG decode on the predictor's GPU (nvJPEG through torchvision), for GPU nodes whose CPUs
cannot keep up: a GPU runs MobileNetV2 an order of magnitude faster than its node's cores
decode and resize JPEGs (benchmarks/RESULTS.md).

The CPU task still reads the bytes and parses the header (Pillow reads no pixel data for that).
Only the plain case goes to the GPU: a complete baseline RGB or greyscale JPEG without EXIF
rotation, inside the pixel limits. Everything else, and anything nvJPEG rejects, is decoded on
the CPU by ``preprocess.eval_pixels``, so every error reason stays the CPU path's.
"""

from __future__ import annotations

import warnings

import torch

from clf.images.decode import DEFAULT_MAX_ONE_COLOUR, DecodeError
from clf.images.preprocess import Preprocess, eval_pixels

# Pillow's nearest-neighbour sample for the blank check is at most 128 x 128.
BLANK_SAMPLE = 128


def decode_on_device(
    jpegs: list[bytes],
    spec: Preprocess,
    device: torch.device,
    max_pixels: int,
    max_one_colour: float | None = DEFAULT_MAX_ONE_COLOUR,
) -> tuple[torch.Tensor, list[str]]:
    """JPEG bytes -> uint8 N x 3 x crop x crop on ``device``, and one error reason per image
    ("" when fine). Resize and center crop match ``transforms.eval_transform``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from clf.images.transforms import eval_transform  # torchvision: only GPU decode needs it

    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 points to TorchCodec
        try:
            images: list[torch.Tensor | None] = list(
                decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            )
        except RuntimeError:  # one bad image fails the whole batched call: retry one by one
            images = [_decode_one(e, device) for e in encoded]
    resize = eval_transform(spec)  # its PILToTensor step passes tensors through
    pixels = torch.zeros((len(jpegs), 3, spec.crop, spec.crop), dtype=torch.uint8, device=device)
    errors = [""] * len(jpegs)
    decoded = [i for i, image in enumerate(images) if image is not None]
    if decoded and max_one_colour is not None:
        shares = one_colour_shares([images[i] for i in decoded]).tolist()
        for i, share in zip(decoded, shares):
            if share >= max_one_colour:
                errors[i] = f"blank or placeholder image ({share:.0%} one colour)"
    for i, image in enumerate(images):
        if image is not None:
            pixels[i] = resize(image)
        else:  # nvJPEG declined it: the CPU path decodes it or names the reason
            pixels[i], errors[i] = _decode_on_cpu(jpegs[i], spec, max_pixels, max_one_colour)
    return pixels, errors


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _decode_on_cpu(
    data: bytes, spec: Preprocess, max_pixels: int, max_one_colour: float | None
) -> tuple[torch.Tensor, str]:
    try:
        return torch.from_numpy(eval_pixels(data, spec, max_pixels, max_one_colour)), ""
    except DecodeError as e:
        return torch.zeros(3, spec.crop, spec.crop, dtype=torch.uint8), str(e)


def one_colour_shares(images: list[torch.Tensor]) -> torch.Tensor:
    """Share of the most common exact colour in each image's nearest-neighbour sample of at
    most 128 x 128, as ``decode`` measures it on the CPU; batched, so one sort per batch."""
    samples = []
    for image in images:
        _, height, width = image.shape
        rows = _nearest(height, min(height, BLANK_SAMPLE), image.device)
        cols = _nearest(width, min(width, BLANK_SAMPLE), image.device)
        rgb = image[:, rows][:, :, cols].to(torch.int32).flatten(1)
        samples.append((rgb[0] << 16) | (rgb[1] << 8) | rgb[2])
    size = BLANK_SAMPLE * BLANK_SAMPLE
    device = images[0].device
    # Padding with distinct negative values never joins a run of a real colour.
    padded = -1 - torch.arange(size, device=device).repeat(len(images), 1)
    for i, sample in enumerate(samples):
        padded[i, : sample.numel()] = sample
    ordered = padded.sort(dim=1).values
    position = torch.arange(size, device=device).expand_as(ordered)
    starts_run = torch.ones_like(ordered, dtype=torch.bool)
    starts_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run_start = torch.where(starts_run, position, torch.zeros_like(position)).cummax(dim=1).values
    longest = (position - run_start + 1).max(dim=1).values
    counts = torch.tensor([s.numel() for s in samples], device=device)
    return (longest / counts).cpu()


def _nearest(source: int, target: int, device: torch.device) -> torch.Tensor:
    # Pillow's NEAREST takes the source pixel under each target pixel's centre.
    centres = (torch.arange(target, device=device, dtype=torch.float64) + 0.5) * source / target
    return centres.floor().long().clamp_(max=source - 1)
