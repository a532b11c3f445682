"""The shard format: its schema and splits, the class list, and listing, counting and reading the
shards of a split. Every reader of ``jobs.ingest`` output goes through here."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from clf import storage
from clf.errors import UsageError

SPLITS = ("train", "val", "test")
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
    ]
)


def list_shards(uri: str) -> list[str]:
    """The Parquet shards under a split (or any folder or prefix), sorted."""
    return [f for f in storage.list_files(uri) if f.endswith(".parquet")]


def read_shard(shard: str, columns: list[str], keys: set[str] | None = None) -> pa.Table:
    """``columns`` of a shard's rows, or of the rows with ``keys`` only."""
    fs, path = storage.resolve(shard)
    filters = [("key", "in", sorted(keys))] if keys is not None else None
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def row_count(shard: str) -> int:
    """From the footer alone."""
    fs, path = storage.resolve(shard)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_classes(dst: str) -> list[str]:
    uri = storage.join(dst, "classes.json")
    if not storage.exists(uri):
        raise UsageError(f"{dst}: no classes.json (is it a jobs.ingest output?)")
    return list(storage.read_json(uri))


def split_ref(uri: str) -> tuple[str, str] | None:
    """(shard, key) of a label row's ``SHARD#KEY`` uri, or None for an image file."""
    shard, sep, key = uri.partition("#")
    return (shard, key) if sep and shard.endswith(".parquet") else None


def read_images(uris: list[str]) -> list[bytes | Exception]:
    """The encoded image behind each label-row uri (an image file, or ``SHARD#KEY``), in order;
    what could not be read gets its ``StorageError`` in its place."""
    found: list[bytes | Exception] = [b""] * len(uris)
    files = [i for i, uri in enumerate(uris) if split_ref(uri) is None]
    for i, read in zip(files, storage.read_many([uris[i] for i in files])):
        try:
            found[i] = read.result()
        except storage.StorageError as e:
            found[i] = e
    wanted: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, uri in enumerate(uris):
        if ref := split_ref(uri):
            wanted[ref[0]][ref[1]].append(i)
    for shard, keys in wanted.items():
        unreadable = None
        try:
            table = read_shard(shard, ["key", "image"], set(keys))
            rows = dict(zip(table["key"].to_pylist(), table["image"].to_pylist()))
        except (OSError, storage.StorageError) as e:
            rows, unreadable = {}, storage.StorageError(f"cannot read {shard}: {e}")
        for key, places in keys.items():
            missing = unreadable or storage.StorageError(f"{shard}: no row with key {key!r}")
            for i in places:
                found[i] = rows.get(key, missing)
    return found
