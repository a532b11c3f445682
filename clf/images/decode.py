"""Turn encoded bytes into an RGB image, or a short reason why not.

Archives hold corrupt JPEGs, PNGs named .jpg, 16-bit TIFFs, CMYK scans, animations and
decompression bombs. Every one of them either decodes to RGB or raises ``DecodeError`` with
a reason short enough to sit in a Parquet column; nothing else escapes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clf.config import DEFAULT_MAX_PIXELS

# Real photos never have this share of pixels in one exact colour (the most uniform of the
# test photos stays well below it); blank scans and "image not found" placeholders do.
DEFAULT_MAX_ONE_COLOUR = 0.9
THUMBNAIL = 192  # pixels a side on a contact sheet

# We enforce our own pixel limit (before decoding), so Pillow's warning-or-error is noise.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    """The input is not a usable image; ``str(e)`` is the reason for the error column."""


class ImageTooLargeError(DecodeError):
    """More pixels than the limit, found from the header alone: a decompression bomb, or a
    scan too big to serve."""


def decode_image(
    data: bytes,
    *,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_one_colour: float | None = DEFAULT_MAX_ONE_COLOUR,
) -> Image.Image:
    """Decode to an RGB ``PIL.Image`` with EXIF orientation applied.

    ``min_size`` lets a JPEG decode at reduced scale in the DCT domain (``Image.draft``), as
    long as the shorter side stays at least ``min_size``: a 12-megapixel photo resized to
    224 px never needs its full resolution.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not an image") from None
    except Exception as e:  # Pillow raises many types for garbage headers
        raise DecodeError(f"unreadable image header ({type(e).__name__})") from None

    fmt = image.format or "image"
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image too large ({width}x{height})")
    if width == 0 or height == 0:
        raise DecodeError(f"empty image ({width}x{height})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "JPEG" and min_size and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
                image.draft(image.mode, _draft_request(image.size, min_size))
            image.seek(0)  # first frame of an animation
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
    except DecodeError:
        raise
    except Exception as e:
        message = str(e).lower()
        if "truncated" in message:
            raise DecodeError(f"truncated {fmt}") from None
        raise DecodeError(f"corrupt {fmt}") from None
    if max_one_colour is not None:
        share = _largest_colour_share(image)
        if share >= max_one_colour:
            raise DecodeError(f"blank or placeholder image ({share:.0%} one colour)")
    return image


def thumbnail(data: bytes | Exception, size: int = THUMBNAIL) -> np.ndarray:
    """A square HWC uint8 crop for a contact sheet; grey where the image does not decode."""
    grey = np.full((size, size, 3), 127, dtype=np.uint8)
    if isinstance(data, Exception):  # it could not be read
        return grey
    try:
        image = decode_image(data, min_size=size, max_one_colour=None)
    except DecodeError:
        return grey
    return np.asarray(ImageOps.fit(image, (size, size)))


def _largest_colour_share(image: Image.Image) -> float:
    # Nearest-neighbour sampling keeps exact colours; a box filter would blend them.
    small = image.resize((min(image.width, 128), min(image.height, 128)), Image.Resampling.NEAREST)
    colours = small.getcolors(maxcolors=4096)
    if colours is None:  # more than 4096 colours: a photo
        return 0.0
    return max(count for count, _ in colours) / (small.width * small.height)


def _draft_request(size: tuple[int, int], min_size: int) -> tuple[int, int]:
    # draft() picks the largest 1/2, 1/4 or 1/8 scale whose result is still >= the request in
    # both dimensions, so asking for the aspect-preserving size keeps the short side >= min_size.
    width, height = size
    scale = min_size / min(width, height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or dropping transparency wrongly."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255; scale by the format's range instead.
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0) * 255.0
    else:
        array = array / 257.0 if array.max() > 255 or image.mode.startswith("I;16") else array
    grey = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
