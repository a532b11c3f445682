"""Decoding: every input becomes RGB or a short reason, never an exception of another kind."""

import io

import numpy as np
import pytest
from conftest import HYMENOPTERA, LARGE_PHOTOS
from PIL import Image

from clf.images.decode import DecodeError, decode_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(LARGE_PHOTOS / "LadyBird.jpg").convert("RGB").resize((320, 240))


def test_real_jpeg_decodes_to_rgb(real_jpeg):
    image = decode_image(real_jpeg)
    assert image.mode == "RGB" and min(image.size) > 0


def test_large_jpeg_decodes_at_reduced_size_but_keeps_the_short_side():
    data = (LARGE_PHOTOS / "Dune.jpg").read_bytes()
    full = decode_image(data)
    small = decode_image(data, min_size=256)
    assert min(small.size) >= 256
    assert small.width * small.height < full.width * full.height / 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am a text file\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, None),  # a JPEG header and nothing else
    ],
)
def test_garbage_gets_a_reason(data, reason):
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    if reason:
        assert str(e.value) == reason


def test_truncated_jpeg_is_reported(real_jpeg):
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_image(real_jpeg[: len(real_jpeg) // 2])


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = encode(Image.new("L", (12000, 12000)), "PNG", optimize=True)
    with pytest.raises(DecodeError, match=r"image too large \(12000x12000\)"):
        decode_image(bomb, max_pixels=50_000_000)


def test_placeholder_gif_is_rejected_as_blank():
    data = (HYMENOPTERA / "train" / "ants" / "imageNotFound.gif").read_bytes()
    with pytest.raises(DecodeError, match="blank or placeholder"):
        decode_image(data)


def test_blank_check_can_be_disabled():
    data = (HYMENOPTERA / "train" / "ants" / "imageNotFound.gif").read_bytes()
    assert decode_image(data, max_one_colour=None).mode == "RGB"


def test_cmyk_becomes_rgb(photo):
    image = decode_image(encode(photo.convert("CMYK"), "JPEG"))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, float) - np.asarray(photo, float)).mean() < 20


def test_sixteen_bit_is_scaled_not_clipped(photo):
    grey16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    image = decode_image(encode(Image.fromarray(grey16), "PNG"))
    expected = np.asarray(photo.convert("L"), float)
    assert np.abs(np.asarray(image.convert("L"), float) - expected).max() <= 1


def test_transparency_is_composited_on_white(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.new("L", photo.size, 0))  # fully transparent
    image = decode_image(encode(rgba, "PNG"), max_one_colour=None)
    assert np.asarray(image).min() == 255


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image = decode_image(encode(photo, "JPEG", exif=exif.tobytes()))
    assert image.size == (photo.height, photo.width)


def test_animated_gif_gives_its_first_frame(photo):
    frames = [photo.convert("P"), photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM).convert("P")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image = decode_image(data)
    first = np.asarray(frames[0].convert("RGB"), float)
    assert np.abs(np.asarray(image, float) - first).mean() < 1


def test_png_named_jpg_is_sniffed_from_content(photo):
    assert decode_image(encode(photo, "PNG")).size == photo.size


# What each EXIF orientation means, from the EXIF spec rather than from Pillow: how to turn the
# stored pixels into the displayed ones, and back.
TO_DISPLAY = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),  # 90 degrees anticlockwise
}
TO_STORED = {**TO_DISPLAY, 6: TO_DISPLAY[8], 8: TO_DISPLAY[6]}


@pytest.mark.parametrize("orientation", sorted(TO_DISPLAY))
@pytest.mark.parametrize("min_size", [None, 120])
def test_every_exif_orientation_displays_upright(photo, orientation, min_size):
    upright = np.asarray(photo)
    stored = np.ascontiguousarray(TO_STORED[orientation](upright))
    assert np.array_equal(TO_DISPLAY[orientation](stored), upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, min_size=min_size)
    if min_size:  # decoded at reduced scale: compare at that scale
        upright = np.asarray(photo.resize(image.size))
    assert image.size == (upright.shape[1], upright.shape[0])
    assert np.abs(np.asarray(image, float) - upright).mean() < 8


def sixteen_bit_ramp() -> np.ndarray:
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    ramp[0, :3] = [128 * 257, 65535, 257]  # mid-grey, white and the darkest step above black
    return ramp


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_png_and_tiff_are_scaled_not_clipped(fmt):
    data = encode(Image.fromarray(sixteen_bit_ramp()), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    grey = np.asarray(decode_image(data))[..., 0]
    assert grey[0, :3].tolist() == [128, 255, 1]  # clipping would give 255 for all three
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 200


def test_big_endian_sixteen_bit_tiff_is_scaled_too():
    ramp = sixteen_bit_ramp()
    image = Image.frombytes("I;16B", ramp.shape[::-1], ramp.astype(">u2").tobytes())
    grey = np.asarray(decode_image(encode(image, "TIFF")))[..., 0]
    assert grey[0, :3].tolist() == [128, 255, 1]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds almost no data: a bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bomb_header_is_rejected_without_decoding():
    # 30000 x 30000 RGB would be 2.7 GB once decoded; the header alone must be enough.
    with pytest.raises(DecodeError, match=r"^image too large \(30000x30000\)$"):
        decode_image(png_header_only(30000, 30000))


def test_the_pixel_limit_is_configurable(photo):
    data = encode(photo, "PNG")
    with pytest.raises(DecodeError, match=r"image too large \(320x240\)"):
        decode_image(data, max_pixels=320 * 240 - 1)
    assert decode_image(data, max_pixels=320 * 240).size == (320, 240)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA"])
def test_every_mode_becomes_rgb_as_displayed(photo, mode):
    converted = photo.convert(mode, palette=Image.Palette.ADAPTIVE)  # opaque
    image = decode_image(encode(converted, "PNG"))
    assert image.mode == "RGB" and image.size == photo.size
    expected = converted.convert("RGB") if mode != "LA" else photo.convert("L").convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_palette_transparency_is_composited_on_white(photo):
    palette = photo.convert("P")
    index = np.asarray(palette)[0, 0]
    image = decode_image(encode(palette, "PNG", transparency=int(index)))
    transparent = np.asarray(palette) == index
    assert (np.asarray(image)[transparent] == 255).all()


@pytest.mark.parametrize(
    ("fmt", "kwargs"), [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("PNG", {})]
)
def test_common_formats_decode_losslessly(photo, fmt, kwargs):
    image = decode_image(encode(photo, fmt, **kwargs))
    assert np.array_equal(np.asarray(image), np.asarray(photo))


def test_corrupt_png_data_is_reported(photo):
    data = bytearray(encode(photo, "PNG"))
    data[len(data) // 2 : len(data) // 2 + 50] = b"\x13" * 50
    with pytest.raises(DecodeError, match="^corrupt PNG$"):
        decode_image(bytes(data))
