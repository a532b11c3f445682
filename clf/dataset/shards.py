"""The shard format: its schema and splits, the class list, and listing, counting and reading the
shards of a split. Every reader of ``jobs.ingest`` output goes through here."""

from __future__ import annotations

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
