"""An artifact's ``meta.json``: what it holds and which file to load, read without torch, so
that jobs can check ``--model`` before anything heavy is imported."""

from __future__ import annotations

from typing import Any

from clf import storage
from clf.errors import ModelLoadError, UsageError

FORMATS = ("torchscript", "onnx", "int8")
FILES = {"torchscript": "model.ts", "onnx": "model.onnx", "int8": "model.int8.onnx"}


def read_meta(uri: str) -> dict[str, Any]:
    meta_uri = storage.join(uri, "meta.json")
    if not storage.exists(meta_uri):
        raise UsageError(f"--model {uri}: not a model artifact (no meta.json)")
    return storage.read_json(meta_uri)


def check_format_in(meta: dict[str, Any], uri: str, fmt: str | None) -> str:
    """The format to load: ``fmt`` if the artifact has it, else its default."""
    fmt = fmt or meta["format"]
    if fmt not in meta["files"]:
        raise UsageError(f"--format {fmt}: {uri} holds only {', '.join(meta['files'])}")
    return fmt


def file_sha256(meta: dict[str, Any], fmt: str) -> str:
    # Artifacts from before several formats existed carry one sha256, of their one file.
    return meta.get("file_sha256", {}).get(fmt) or meta["sha256"]


def model_id(meta: dict[str, Any], fmt: str) -> str:
    """What label rows and answers name the model by: its file's sha256, first 12 hex digits."""
    return file_sha256(meta, fmt)[:12]


def read_model_file(
    uri: str, fmt: str | None = None, meta: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str, bytes]:
    """(meta, format, the format's file) of the artifact at ``uri``, the file checked against
    its sha256 in meta.json; ``meta``: the artifact's meta.json when already read."""
    meta = meta or read_meta(uri)
    fmt = check_format_in(meta, uri, fmt)
    blob = storage.read_by_sha256(storage.join(uri, meta["files"][fmt]), file_sha256(meta, fmt))
    if blob is None:
        raise ModelLoadError(f"{uri}: {meta['files'][fmt]} does not match its sha256 in meta.json")
    return meta, fmt, blob


def parse_formats(text: str) -> tuple[str, ...]:
    """``torchscript,onnx`` -> ("torchscript", "onnx"), checked."""
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    check_formats(formats)
    return formats


def check_formats(formats: tuple[str, ...]) -> None:
    if not formats:
        raise UsageError(f"--format: give at least one of {', '.join(FORMATS)}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise UsageError(f"--format {','.join(formats)}: a format is listed twice")
