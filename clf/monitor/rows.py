"""The columns of label rows that monitoring needs, read with pyarrow into numpy, never into
Python lists: a night's run may hold millions of rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import entropy

from clf.dataset.label_rows import read_files

COLUMNS = ["label", "topk_scores", "error"]


@dataclass
class LabelStats:
    rows: int  # every row, error rows included
    classes: dict[str, int]  # predicted class -> rows, of the rows that have a label
    topk: np.ndarray  # (labelled rows, k) float32: each row's top-k scores, best first
    errors: dict[str, int]  # error reason (details in brackets dropped) -> rows

    @property
    def labelled(self) -> int:
        return len(self.topk)

    @property
    def confidence(self) -> np.ndarray:
        return self.topk[:, 0]

    def entropy(self, k: int) -> np.ndarray:
        return top_k_entropy(self.topk, k)


@dataclass
class RunColumns:
    """``COLUMNS`` of every row of ``files``, one table in file order, and where each file's
    rows start in it: read once for the drift statistics and the review queue both."""

    files: list[str]
    table: pa.Table
    starts: np.ndarray


def read_columns(files: list[str]) -> RunColumns:
    tables = [read_files([uri], COLUMNS) for uri in files]
    starts = np.cumsum([0] + [t.num_rows for t in tables[:-1]]) if tables else np.zeros(0, int)
    table = pa.concat_tables(tables) if tables else read_files([], COLUMNS)
    return RunColumns(files, table, starts)


def label_stats(run: RunColumns) -> LabelStats:
    table = run.table
    failed = table.column("error").is_valid()
    labelled = table.filter(pc.invert(failed))
    return LabelStats(
        rows=table.num_rows,
        classes=value_counts(labelled.column("label")),
        topk=top_scores(labelled.column("topk_scores")),
        errors=_reasons(value_counts(table.filter(failed).column("error"))),
    )


def top_k_entropy(topk: np.ndarray, k: int) -> np.ndarray:
    """Entropy (nats) of each row's top ``k`` scores and the rest of the mass as one more
    outcome: the full distribution is not in the rows, and this bound moves with it."""
    top = topk[:, :k].astype(np.float64)
    rest = np.clip(1.0 - top.sum(axis=1, keepdims=True), 0.0, None)
    return entropy(np.hstack([top, rest]), axis=1)


def top_scores(column: pa.ChunkedArray) -> np.ndarray:
    """(rows, k) of a list column, k the shortest list's length."""
    if len(column) == 0:
        return np.zeros((0, 1), dtype=np.float32)
    k = pc.min(pc.list_value_length(column)).as_py()
    flat = pc.list_flatten(pc.list_slice(column, 0, k)).to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(-1, k)


def value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column.drop_null())
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _reasons(counts: dict[str, int]) -> dict[str, int]:
    """``image too large (30000x30000)`` and ``image too large (9000x9000)`` are one reason."""
    folded: dict[str, int] = {}
    for error, n in counts.items():
        reason = error.split(" (", 1)[0]
        folded[reason] = folded.get(reason, 0) + n
    return folded
