"""The CPU tasks of the label and evaluate pipelines: image bytes -> eval crops, or reasons.

A batch holds ``uri`` and either ``image`` (shard rows carry their bytes) or nothing more
(listed files, read here); every other column passes through to the model actor.

Ray pickles a task function by its module, and a worker imports that module before its first
task. This one imports neither torch nor torchvision (see ``clf.images.preprocess``), so a decode
worker is ready in a fraction of a second instead of after seconds of imports.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from clf import storage
from clf.images.decode import DecodeError
from clf.images.preprocess import Preprocess, eval_pixels

# Larger photos decode faster on the CPU at reduced scale (draft) than in full on the GPU, and
# a batch of them would take gigabytes of GPU memory.
MAX_DEVICE_PIXELS = 16_000_000
EXIF_ORIENTATION = 0x0112
Contents = Iterator[Callable[[], bytes]]  # each row's bytes, as a call that may raise


def decode_batch(
    batch: dict[str, np.ndarray],
    preprocess: dict,
    max_pixels: int,
    read_concurrency: int = storage.DEFAULT_READ_CONCURRENCY,
) -> dict[str, np.ndarray]:
    """CPU task: bytes -> fixed-size uint8 CHW ``pixels``, or an ``error`` reason. Listed files
    are read with ``read_concurrency`` reads kept in flight ahead of the decoding. Never raises,
    but for a storage fault that outlived its retries."""
    spec = Preprocess.from_meta(preprocess)
    pixels = np.zeros((len(batch["uri"]), 3, spec.crop, spec.crop), dtype=np.uint8)
    errors = []
    for i, content in enumerate(_contents(batch, read_concurrency)):
        try:
            pixels[i] = eval_pixels(content(), spec, max_pixels)
            errors.append("")
        except storage.TransientStorageError:
            raise  # Ray retries the task; a row would make a passing fault the input's answer
        except Exception as e:  # a bad row must never end the job
            errors.append(_reason(e))
    return {**_passed_on(batch), "pixels": pixels, "error": np.array(errors, dtype=object)}


def read_batch(
    batch: dict[str, np.ndarray],
    preprocess: dict,
    max_pixels: int,
    read_concurrency: int = storage.DEFAULT_READ_CONCURRENCY,
) -> dict[str, np.ndarray]:
    """CPU task when the model actor decodes on its GPU: a JPEG that suits nvJPEG travels as
    its bytes (``kind`` jpeg); any other input is decoded here as in ``decode_batch`` and
    travels as the crop's raw pixels (``kind`` pixels). Never raises, but for a storage fault
    that outlived its retries."""
    spec = Preprocess.from_meta(preprocess)
    payload, kinds, errors = [], [], []
    for content in _contents(batch, read_concurrency):
        try:
            data = content()
            if suits_device(data, max_pixels):
                payload.append(data)
                kinds.append("jpeg")
            else:
                payload.append(eval_pixels(data, spec, max_pixels).tobytes())
                kinds.append("pixels")
            errors.append("")
        except storage.TransientStorageError:
            raise
        except Exception as e:
            payload.append(b"")
            kinds.append("")
            errors.append(_reason(e))
    return {
        **_passed_on(batch),
        "data": np.array(payload, dtype=object),
        "kind": np.array(kinds, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def suits_device(data: bytes, max_pixels: int) -> bool:
    """True for a JPEG that nvJPEG decodes exactly as the CPU path would (orientation, colour,
    completeness); False sends it to ``eval_pixels`` on the CPU."""
    if data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False  # not a JPEG, or truncated: the CPU path names the reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            return (
                image.format == "JPEG"
                and image.mode in ("RGB", "L")
                and not image.info.get("progressive")
                and 0 < width * height <= min(max_pixels, MAX_DEVICE_PIXELS)
                and image.getexif().get(EXIF_ORIENTATION, 1) == 1
            )
    except Exception:
        return False


def _passed_on(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: column for key, column in batch.items() if key != "image"}


def _contents(batch: dict[str, np.ndarray], concurrency: int) -> Contents:
    """Each row's bytes, as a call that returns them or raises why it cannot: a shard row
    carries its image, and listed files are read with ``concurrency`` reads in flight."""
    if "image" in batch:
        return ((lambda data=data: data) for data in batch["image"])
    return (read.result for read in storage.read_many(list(batch["uri"]), concurrency))


def _reason(error: Exception) -> str:
    if isinstance(error, DecodeError):
        return str(error)
    if isinstance(error, storage.StorageError):
        return f"unreadable: {error}"
    return f"decode failed: {type(error).__name__}"
