"""One way to address files: a local path, ``file://...`` or ``s3://bucket/prefix``.

Everything goes through pyarrow's filesystems, the same ones Ray Data and Ray Train use, so an
S3-compatible endpoint is reached through the standard ``AWS_ENDPOINT_URL`` variable and the
standard credential chain, with no project-specific settings.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from functools import cache
from typing import Any

import pyarrow.fs as pafs

from clf.errors import StorageError

S3_RETRY_ATTEMPTS = 10


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Canonical form: absolute local paths, ``s3://bucket/key`` without a trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        if scheme not in ("s3", "s3a"):
            raise StorageError(f"unsupported URI scheme {scheme}:// in {uri} (use a path or s3://)")
        return "s3://" + rest.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _s3() -> pafs.S3FileSystem:
    return _s3_for(os.environ.get("AWS_ENDPOINT_URL"))


@cache
def _s3_for(endpoint: str | None) -> pafs.S3FileSystem:
    # Arrow's S3FileSystem reads the credential chain but not AWS_ENDPOINT_URL, so we pass the
    # standard variable on; patient retries ride out throttling (503 SlowDown) and resets.
    options = {}
    if endpoint:
        options = {
            "endpoint_override": endpoint,
            "scheme": "https" if endpoint.startswith("https") else "http",
            "force_virtual_addressing": False,
        }
    return pafs.S3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        connect_timeout=10,
        request_timeout=60,
        **options,
    )


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return _s3(), uri[len("s3://") :]
    return pafs.LocalFileSystem(), uri


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def relative(uri: str, root: str) -> str:
    uri, root = normalize(uri), normalize(root)
    return posixpath.relpath(uri, root) if uri.startswith("s3://") else os.path.relpath(uri, root)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"cannot reach {uri}: {_short(e)}") from e


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    info = _info(uri)
    if info.type == pafs.FileType.Directory:
        return True
    if uri.startswith("s3://") and info.type == pafs.FileType.NotFound:
        return bool(list_files(uri, limit=1))
    return False


def list_files(uri: str, *, recursive: bool = True, limit: int | None = None) -> list[str]:
    """Regular files under a folder or prefix, as sorted full URIs.

    Directories, pipes and sockets are never returned. A dangling symlink reports NotFound
    in pyarrow, so it is never returned either.
    """
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {_short(e)}") from e
    prefix = "s3://" if normalize(uri).startswith("s3://") else ""
    files = sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and _regular(i))
    return files[:limit] if limit is not None else files


def _regular(info: pafs.FileInfo) -> bool:
    # pyarrow calls FIFOs and sockets "File" on Linux; opening a FIFO would block forever.
    if isinstance(info.path, str) and info.path.startswith("/"):
        import stat

        try:
            return stat.S_ISREG(os.stat(info.path).st_mode)
        except OSError:
            return False
    return True


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"not found: {uri}") from e
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {_short(e)}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part.

    An S3 PUT is atomic by itself; on a local disk we write a temporary file and rename it.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {_short(e)}") from e


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path for a file that a library insists on opening itself (torch.load, onnx)."""
    uri = normalize(uri)
    if not uri.startswith("s3://"):
        return uri
    import hashlib
    import tempfile

    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "clf-cache")
    os.makedirs(cache_dir, exist_ok=True)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + posixpath.basename(uri)
    dest = os.path.join(cache_dir, name)
    if not os.path.exists(dest):
        write_bytes(dest, read_bytes(uri))
    return dest


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
