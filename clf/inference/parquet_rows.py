"""Parquet image shards as a Ray Dataset for the label and evaluate pipelines: each row with its
``uri`` (``SHARD_URI#KEY``) and ``path``, in blocks of one decode batch each. Without the
repartition, a decode task takes a whole read block (a shard or more) and its output waits for
every image in it, so the model waits too."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from clf import storage

# Reading waits on storage and Parquet decoding, not on a whole core.
READ_CPUS = 0.25


def read_shard_rows(
    shards: list[str],
    rows_per_block: int,
    columns: tuple[str, ...] = ("key", "image"),
    partial: Mapping[str, frozenset[str]] | None = None,
):
    """The rows of ``shards`` (``columns`` plus ``path`` and ``uri``); ``partial``: for shards
    only partly to do, by path inside their filesystem, the keys to keep."""
    import ray

    fs, _ = storage.resolve(shards[0])
    prefix = "s3://" if storage.normalize(shards[0]).startswith("s3://") else ""
    ds = ray.data.read_parquet(
        [storage.resolve(s)[1] for s in shards],
        filesystem=fs,
        include_paths=True,
        num_cpus=READ_CPUS,
    ).select_columns([*columns, "path"])
    ds = ds.map_batches(
        with_uris, fn_kwargs={"prefix": prefix, "partial": dict(partial or {})}, batch_size=None
    )
    return ds.repartition(target_num_rows_per_block=rows_per_block)


def with_uris(
    batch: dict[str, np.ndarray], prefix: str, partial: Mapping[str, frozenset[str]]
) -> dict[str, np.ndarray]:
    """Adds ``uri``, keeping of partly done shards only the rows still to do."""
    paths, keys = batch["path"], batch["key"]
    uris = np.array([f"{prefix}{p}#{k}" for p, k in zip(paths, keys)], dtype=object)
    keep = np.array([p not in partial or k in partial[p] for p, k in zip(paths, keys)], bool)
    return {**{name: column[keep] for name, column in batch.items()}, "uri": uris[keep]}
