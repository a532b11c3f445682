"""Decoding: every input becomes RGB or a short reason, never an exception of another kind."""

import io

import numpy as np
import pytest
from conftest import HYMENOPTERA, LARGE_PHOTOS
from PIL import Image

from clf.decode import DecodeError, decode_image


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
