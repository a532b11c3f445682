"""One way to address files: a local path, ``file://...`` or ``s3://bucket/prefix``.

Listing, writing and metadata go through pyarrow's filesystems, the same ones Ray Data and Ray
Train use. Reading a whole object goes through botocore: one GET, where pyarrow's input streams
first ask for the size (a HEAD, a second round trip per object). Both reach an S3-compatible
endpoint through the standard ``AWS_ENDPOINT_URL`` variable and the standard credential chain,
with no project-specific settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from itertools import islice
from typing import Any

import pyarrow.fs as pafs

from clf.errors import StorageError, TransientStorageError

# Transient S3 faults (503 SlowDown, 500s, connection resets, truncated replies, timeouts) are
# retried inside pyarrow by the AWS SDK, and around each whole-object read by ``_get_object``
# with the same backoff; a permanent one (403, 404) is not, and surfaces at once as a
# StorageError naming the URI. We use the SDK's "default" strategy, exponential backoff
# from 50 ms: 12 attempts wait out about 100 s of throttling for each request. Not "standard":
# its retry quota is shared by every request of a process, and under sustained faults (a share
# that tests/faultproxy.py reaches) it runs dry and fails requests on their first error, which a
# long label or training job must not do. On top of this, Ray Data retries
# its own Parquet reads (DataContext.retried_io_errors: Ray's defaults already match SLOW_DOWN,
# NETWORK_CONNECTION, INTERNAL_FAILURE and 503, so we keep them).
S3_RETRY_ATTEMPTS = 12
S3_CONNECT_TIMEOUT_S = 10
S3_REQUEST_TIMEOUT_S = 60
# Object reads in flight per decode task or ingest: enough to hide an object store's round
# trips behind decoding (benchmarks/s3_throughput.py), few enough that the bytes waiting stay
# small. Each object waits in memory until its turn.
DEFAULT_READ_CONCURRENCY = 32
MAX_READ_CONCURRENCY = 256


REMOTE_SCHEMES = ("s3", "s3a")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Canonical form: absolute local paths, ``s3://bucket/key`` without a trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        if scheme not in REMOTE_SCHEMES:
            raise StorageError(f"unsupported URI scheme {scheme}:// in {uri} (use a path or s3://)")
        return "s3://" + rest.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with our retry settings, also after pickling.

    Arrow's S3FileSystem reads the credential chain but not AWS_ENDPOINT_URL, so we pass the
    standard variable on. And Arrow pickles it without its ``retry_strategy``: the copies that
    Ray Train (``storage_filesystem``) and Ray Data (``read_parquet(filesystem=...)``) ship to
    their workers would fall back to 3 attempts. This one is rebuilt through ``_s3_for``.
    """

    def __init__(self, endpoint: str | None):
        options = {}
        if endpoint:
            options = {
                "endpoint_override": endpoint,
                "scheme": "https" if endpoint.startswith("https") else "http",
                "force_virtual_addressing": False,
            }
        super().__init__(
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            request_timeout=S3_REQUEST_TIMEOUT_S,
            **options,
        )
        self.endpoint = endpoint

    def __reduce__(self):
        return _s3_for, (self.endpoint,)


def _s3() -> S3FileSystem:
    return _s3_for(os.environ.get("AWS_ENDPOINT_URL"))


@cache
def _s3_for(endpoint: str | None) -> S3FileSystem:
    return S3FileSystem(endpoint)


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


def is_file(uri: str) -> bool:
    """A regular file (or object): never a folder, pipe, socket or dangling link."""
    info = _info(uri)
    return info.type == pafs.FileType.File and _regular(info)


def list_files(uri: str, *, recursive: bool = True, limit: int | None = None) -> list[str]:
    """Regular files under a folder or prefix, as sorted full URIs.

    Only regular files, or links to them, are returned: never directories, pipes, sockets or
    dangling links. Links to directories are not followed, so a link loop cannot make the
    listing endless (the same rule as ``find`` and ``os.walk``).
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        files = sorted(_walk_local(path, recursive))
        return files[:limit] if limit is not None else files
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {_short(e)}") from e
    files = sorted("s3://" + i.path for i in infos if i.type == pafs.FileType.File)
    return files[:limit] if limit is not None else files


def total_bytes(uri: str) -> int:
    """What the files under a folder or prefix take in storage (0 when there are none)."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {_short(e)}") from e
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def _walk_local(root: str, recursive: bool) -> list[str]:
    # os.scandir knows each entry's type from the directory itself, so a million plain files
    # cost no stat calls; is_file() follows a link and is true only for a regular file.
    files, folders = [], [root]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            if folder == root:
                return []
            continue  # removed while we listed
        except OSError as e:
            raise StorageError(f"cannot list {folder}: {_short(e)}") from e
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        folders.append(entry.path)
                elif entry.is_file():
                    files.append(entry.path)
            except OSError:  # a link loop, or an entry removed while we listed
                continue
    return files


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
    """A file's or an object's bytes: on S3 one GET, retried alone on a transient fault."""
    uri = normalize(uri)
    if not uri.startswith("s3://"):
        try:
            with open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise StorageError(f"not found: {uri}") from e
        except OSError as e:
            raise StorageError(f"cannot read {uri}: {_short(e)}") from e
    bucket, _, key = uri[len("s3://") :].partition("/")
    return _get_object(uri, bucket, key)


def read_many(uris: Sequence[str], concurrency: int = DEFAULT_READ_CONCURRENCY) -> Iterator[Future]:
    """``read_bytes`` of each of ``uris`` as a future, in order, with up to ``concurrency``
    reads in flight ahead of the caller: an object store's round trips overlap one another and
    the caller's work on the bytes already read, and at most ``concurrency`` objects wait in
    memory. ``future.result()`` returns the bytes or raises what ``read_bytes`` would."""
    pool = ThreadPoolExecutor(max(1, min(concurrency, len(uris))), thread_name_prefix="clf-read")
    try:
        pending = iter(uris)
        window = deque(pool.submit(read_bytes, uri) for uri in islice(pending, concurrency))
        while window:
            yield window.popleft()
            window.extend(pool.submit(read_bytes, uri) for uri in islice(pending, 1))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _get_object(uri: str, bucket: str, key: str) -> bytes:
    # botocore retries a request but not a body cut short, and its standard retry mode shares
    # one quota among all of a process's requests, which sustained faults run dry: one loop
    # retries both, for this object alone, with the same backoff as the pyarrow client.
    import botocore.exceptions as boto

    client = _s3_client(os.environ.get("AWS_ENDPOINT_URL"))
    for attempt in range(1, S3_RETRY_ATTEMPTS + 1):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except boto.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NotFound", "404"):
                raise StorageError(f"not found: {uri}") from e
            if status < 500 and status not in (408, 429) and code not in _THROTTLED:
                raise StorageError(f"cannot read {uri}: {_client_error(code, status)}") from e
            error: Exception = e
        except (boto.BotoCoreError, OSError) as e:  # resets, timeouts, a body cut short
            error = e
        if attempt < S3_RETRY_ATTEMPTS:
            time.sleep(0.025 * 2**attempt)
    raise TransientStorageError(f"cannot read {uri}: {_short(error)}") from error


_THROTTLED = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout")
_CLIENTS: dict[str | None, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(endpoint: str | None):
    """One botocore S3 client per process and endpoint, made once even when many reads start
    together; clients are thread-safe, and their connection pool holds a connection for every
    read ``read_many`` may keep in flight."""
    with _CLIENTS_LOCK:
        if endpoint not in _CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"total_max_attempts": 1},  # retried by _get_object
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                read_timeout=S3_REQUEST_TIMEOUT_S,
                max_pool_connections=MAX_READ_CONCURRENCY,
                # Path-style, as pyarrow's client here: MinIO, Ceph and moto serve no bucket
                # subdomains.
                s3={"addressing_style": "path"} if endpoint else None,
            )
            session = boto3.session.Session()  # the default session is not thread-safe
            _CLIENTS[endpoint] = session.client("s3", endpoint_url=endpoint, config=config)
        return _CLIENTS[endpoint]


def _client_error(code: str, status: int) -> str:
    if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return (
            f"access denied ({code or 'HTTP 403'}): check the credentials and the bucket's policy"
        )
    if code == "NoSuchBucket":
        return "no such bucket"
    return f"{code or 'error'} (HTTP {status})"


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


def cache_dir() -> str:
    """This machine's copies of objects read from buckets: ``CLF_CACHE_DIR``, by default the
    temporary folder's ``clf-cache``."""
    import tempfile

    return os.environ.get("CLF_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "clf-cache")


# Copies of content-addressed objects (model files) kept per machine, the most recently used.
CACHED_BY_SHA256 = 4


def read_by_sha256(uri: str, sha256: str) -> bytes | None:
    """The bytes of ``uri`` if their sha256 is ``sha256``, else None. An ``s3://`` object is read
    from the bucket once per machine: later reads, by every actor a job starts on the node and
    by the next night's run, take the local copy, which is checked like the object itself."""
    import hashlib

    def matches(data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() == sha256

    uri = normalize(uri)
    if not uri.startswith("s3://") or not re.fullmatch("[0-9a-f]{64}", sha256):
        data = read_bytes(uri)
        return data if matches(data) else None
    copy = os.path.join(cache_dir(), f"sha256-{sha256}")
    try:
        with open(copy, "rb") as f:
            data = f.read()
        if matches(data):
            os.utime(copy)  # recently used
            return data
    except OSError:  # not there yet, or removed as least recently used while we looked
        pass
    data = read_bytes(uri)
    if not matches(data):
        return None
    try:
        write_bytes(copy, data)  # atomic: a reader sees the whole copy or none
        _forget_least_recent(cache_dir(), "sha256-", CACHED_BY_SHA256)
    except (OSError, StorageError):  # a full or read-only disk costs the next read, not this one
        pass
    return data


def _forget_least_recent(folder: str, prefix: str, keep: int) -> None:
    entries = [  # not the temporary files of copies being written
        e for e in os.scandir(folder) if e.name.startswith(prefix) and "." not in e.name
    ]
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            os.remove(entry.path)


def local_copy(uri: str) -> str:
    """A local path for a file that a library insists on opening itself (torch.load, onnx)."""
    uri = normalize(uri)
    if not uri.startswith("s3://"):
        return uri
    import hashlib

    os.makedirs(cache_dir(), exist_ok=True)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + posixpath.basename(uri)
    dest = os.path.join(cache_dir(), name)
    if not os.path.exists(dest):
        write_bytes(dest, read_bytes(uri))
    return dest


_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "status 403")


def _short(e: BaseException) -> str:
    """One line for a storage error; a 403 says so plainly, whatever pyarrow wrapped it in."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    if any(marker in text for marker in _DENIED):
        code = re.search(r"AWS Error (\w+)", text)
        return (
            f"access denied ({code.group(1) if code else 'HTTP 403'}): "
            "check the credentials and the bucket's policy"
        )
    if "NO_SUCH_BUCKET" in text:
        return "no such bucket"
    return text.splitlines()[0][:200]
