"""What a label run reads: every input image (listed files, or the rows of Parquet shards), and
of the shards, which to read whole and which to filter by key."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from clf import storage
from clf.dataset.shards import read_shard
from clf.errors import UsageError


@dataclass
class Inputs:
    kind: str  # "files" or "shards"
    uris: list[str]  # every input, as it will appear in the uri column


def list_inputs(uri: str) -> Inputs:
    if not storage.exists(uri) and not storage.is_dir(uri):
        raise UsageError(f"--input {uri}: no such file, folder or prefix")
    if storage.is_dir(uri):
        files = storage.list_files(uri)
    elif storage.is_file(uri):
        files = [uri]
    else:  # a pipe or a socket would block the first read forever
        raise UsageError(f"--input {uri}: not a regular file, folder or prefix")
    files = [f for f in files if not f.endswith(("manifest.json", "classes.json"))]
    if files and all(f.endswith(".parquet") for f in files):
        uris = []
        for shard in files:
            keys = read_shard(shard, ["key"]).column("key").to_pylist()
            uris += [f"{shard}#{key}" for key in keys]
        return Inputs("shards", uris)
    return Inputs("files", files)


def shard_plan(inputs: Inputs, todo: set[str]) -> tuple[list[str], dict[str, frozenset[str]]]:
    """The shards to read, and the wanted keys of those only partly to do, by path inside
    their filesystem.

    A shard wholly to do (every shard on a first run) is read as it is; one that an earlier
    run partly covered is filtered by key, and a shard already done is not read at all.
    """
    keys: dict[str, list[str]] = defaultdict(list)
    for uri in inputs.uris:
        shard, key = uri.split("#", 1)
        keys[shard].append(key)
    read, partial = [], {}
    for shard, shard_keys in keys.items():
        wanted = frozenset(k for k in shard_keys if f"{shard}#{k}" in todo)
        if wanted:
            read.append(shard)
        if wanted and len(wanted) < len(shard_keys):
            partial[storage.resolve(shard)[1]] = wanted
    return read, partial
