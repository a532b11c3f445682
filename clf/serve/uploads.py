"""The image bytes of an HTTP request: a raw body or multipart files, within a size limit.

Every refusal is a ``RequestError`` with the status code a client can act on, raised before
anything is decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

RAW_TYPES = ("application/octet-stream",)
MULTIPART = "multipart/form-data"
FILE_FIELD = "file"
MAX_FILES = 256  # per /predict/batch request


class RequestError(Exception):
    """A request the server refuses: ``status`` and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """One multipart file: its field, its file name, and its bytes or why it was refused."""

    field: str
    filename: str | None
    data: bytes | None
    error: str | None = None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_image_type(content_type: str | None) -> bool:
    """image/* or raw bytes; a part sent without a type (some clients) is given the benefit."""
    kind = media_type(content_type)
    return kind in ("", *RAW_TYPES) or kind.startswith("image/")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes: from the
    Content-Length header when there is one, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared)} bytes is over {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def one_image(request: Request, limit: int) -> bytes:
    """``POST /predict``: the raw body of an image type, or the multipart field ``file``."""
    kind = media_type(request.headers.get("content-type"))
    if kind == MULTIPART:
        uploads = [u for u in await multipart_files(request, limit) if u.field == FILE_FIELD]
        if not uploads:
            raise RequestError(400, f"no multipart field '{FILE_FIELD}' holding a file")
        if uploads[0].error:
            raise RequestError(415, uploads[0].error)
        return uploads[0].data
    if not kind:
        raise RequestError(
            415,
            "no Content-Type: send image/*, application/octet-stream or "
            f"a multipart field '{FILE_FIELD}'",
        )
    if not is_image_type(kind):
        raise RequestError(415, f"Content-Type {kind} is not an image")
    return await read_body(request, limit)


async def many_images(request: Request, limit: int) -> list[Upload]:
    """``POST /predict/batch``: every file of a multipart body, in order."""
    kind = media_type(request.headers.get("content-type"))
    if kind != MULTIPART:
        raise RequestError(415, f"send the images as {MULTIPART} files, not {kind or 'no type'}")
    uploads = await multipart_files(request, limit)
    if not uploads:
        raise RequestError(400, "the multipart body holds no files")
    return uploads


async def multipart_files(request: Request, limit: int) -> list[Upload]:
    """The file parts of a multipart body of at most ``limit`` bytes; a part whose type is not
    an image keeps its place with an error."""
    body = await read_body(request, limit)
    # Parsed from the bytes already read, so the size limit holds for every part together.
    parser = MultiPartParser(request.headers, _once(body), max_files=MAX_FILES)
    try:
        form = await parser.parse()
    except Exception as e:  # python-multipart's and starlette's errors for malformed bodies
        raise RequestError(400, f"malformed multipart body ({e})") from None
    uploads = []
    try:
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue
            if is_image_type(value.content_type):
                uploads.append(Upload(field, value.filename, await value.read()))
            else:
                reason = f"{media_type(value.content_type)} is not an image type"
                uploads.append(Upload(field, value.filename, None, reason))
    finally:
        await form.close()
    return uploads


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
