"""``jobs.train --preview-augmentations``: a grid of augmented train images to check by eye."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.utils import make_grid

from clf import storage
from clf.config import TrainConfig
from clf.images.decode import DecodeError, decode_image
from clf.images.preprocess import Preprocess
from clf.images.transforms import batch_mixer, decode_size, eval_transform, train_transform
from clf.training.loader import iter_rows


def preview_augmentations(
    cfg: TrainConfig, spec: Preprocess, output: str, images: int = 8, views: int = 7
) -> str:
    """Write a PNG: one row per train image, its eval view first, then ``views`` augmented views.

    With MixUp or CutMix on, a last row shows a mixed batch, since those mix whole batches.
    """
    torch.manual_seed(cfg.seed)
    plain, augment = eval_transform(spec), train_transform(spec, cfg.augment)
    tiles: list[torch.Tensor] = []
    decoded = []
    for data, _ in iter_rows(cfg.data.path, "train", images):
        try:
            decoded.append(
                decode_image(data, min_size=decode_size(spec, True), max_one_colour=None)
            )
        except DecodeError:
            continue
    for image in decoded:
        tiles.append(plain(image))
        tiles.extend(augment(image) for _ in range(views))
    mixer = batch_mixer(cfg.augment, num_classes=max(2, len(decoded)))
    if mixer is not None and len(decoded) > 1:
        batch = torch.stack([augment(image) for image in decoded[: views + 1]]).float()
        mixed, _ = mixer(batch, torch.arange(len(batch)))
        tiles.extend(mixed.round().clamp(0, 255).to(torch.uint8))
    grid = make_grid(torch.stack(tiles), nrow=views + 1, padding=2, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    storage.write_bytes(output, buffer.getvalue())
    return output
