"""Label rows on storage, as ``jobs.label`` writes them and ``jobs.monitor`` reads them: the
schema, the files committed under an output, and the runs that committed them.

A run record, ``OUTPUT/_runs/RUN.json``, names the files a finished run committed: every
committed file that no earlier record claims. A run killed and then re-run is one run, so the
record of a night holds all of that night's rows.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clf import storage
from clf.errors import UsageError

LABEL_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("confidence", pa.float32()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_scores", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("error", pa.string()),
    ]
)
RUNS = "_runs"  # in a label output: one JSON record per finished run
# What storage.write_bytes leaves behind when killed between its write and its rename.
TEMP_FILE = re.compile(r"\.tmp-[0-9a-f]{8}$")


def committed_files(output: str) -> list[str]:
    """Only renamed-into-place files count: a temp file left by a kill is never output."""
    return [f for f in storage.list_files(output, recursive=False) if f.endswith(".parquet")]


def read_files(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """``columns`` of the rows in ``files``, each read with the current schema."""
    schema = pa.schema([LABEL_SCHEMA.field(c) for c in columns]) if columns else LABEL_SCHEMA
    tables = []
    for uri in files:
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, schema=LABEL_SCHEMA, columns=columns))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_rows(output: str, columns: list[str] | None = None) -> pa.Table:
    return read_files(committed_files(output), columns)


def part_name(uris: Iterable[str]) -> str:
    """Deterministic file name for the slice of inputs a file covers."""
    digest = hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def commit_rows(output: str, table: pa.Table) -> str:
    """``table`` as one file of ``output``, written whole and renamed into place (one PUT on
    S3), so that a kill never leaves part of it; returns the file's name."""
    sink = io.BytesIO()
    pq.write_table(table.cast(LABEL_SCHEMA), sink)
    name = part_name(table.column("uri").to_pylist())
    storage.write_bytes(storage.join(output, name), sink.getvalue())
    return name


def new_run_id() -> str:
    """Sorts by start time, to the microsecond; the random tail keeps two drivers apart."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(3)}"


def list_runs(output: str) -> list[dict[str, Any]]:
    """The run records of ``output``, oldest first."""
    records = storage.list_files(storage.join(output, RUNS), recursive=False)
    return [storage.read_json(uri) for uri in sorted(records) if uri.endswith(".json")]


def record_run(output: str, run_id: str, info: dict[str, Any]) -> dict[str, Any]:
    """Record the finished run ``run_id``: the committed files no earlier run claims."""
    claimed = {name for run in list_runs(output) for name in run["files"]}
    files = [uri.rsplit("/", 1)[-1] for uri in committed_files(output)]
    record = {"run": run_id, **info, "files": [name for name in files if name not in claimed]}
    storage.write_json(storage.join(output, RUNS, f"{run_id}.json"), record)
    return record


def run_files(output: str, run: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the record, its files' URIs) of run ``run`` in ``output``; by default the latest run that
    labelled anything. ``all``, or an output from before run records, means every file."""
    runs = list_runs(output)
    if run == "all" or (run is None and not runs):
        files = committed_files(output)
        return {"run": "all", "files": [f.rsplit("/", 1)[-1] for f in files]}, files
    if run is None:
        labelled = [r for r in runs if r["files"]]
        if not labelled:
            raise UsageError(f"--labels {output}: no run has labelled anything yet")
        record = labelled[-1]
    else:
        record = next((r for r in runs if r["run"] == run), None)
        if record is None:
            known = ", ".join(r["run"] for r in runs[-5:]) or "none"
            raise UsageError(f"--run {run}: no such run in {output} (latest: {known})")
    return record, [storage.join(output, name) for name in record["files"]]


def label_table(
    uris: list[str],
    ok: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    errors: list[str],
    classes: np.ndarray,
    model_id: str,
) -> pa.Table:
    """Label rows: ``scores`` and ``indices`` (n, k) are each row's top k, best first, and only
    the ``ok`` rows hold them; a row that failed has only its ``error``."""
    n, k = len(uris), scores.shape[1]
    failed = ~ok
    label_ids = indices[:, 0].astype(np.int32)
    # Columnar: at thousands of rows a second, per-row Python lists cost more than the GPU.
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    rows = {
        "uri": pa.array(uris, pa.string()),
        "label": pa.array(classes[label_ids], pa.string(), mask=failed),
        "label_id": pa.array(label_ids, pa.int32(), mask=failed),
        "confidence": pa.array(scores[:, 0], pa.float32(), mask=failed),
        "topk_labels": pa.ListArray.from_arrays(
            offsets, pa.array(classes[indices.ravel()], pa.string()), mask=pa.array(failed)
        ),
        "topk_scores": pa.ListArray.from_arrays(
            offsets, pa.array(scores.ravel(), pa.float32()), mask=pa.array(failed)
        ),
        "model": pa.array([model_id] * n, pa.string()),
        "error": pa.array([None if good else e for e, good in zip(errors, ok)], pa.string()),
    }
    return pa.table(rows, schema=LABEL_SCHEMA)
