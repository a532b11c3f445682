"""The sink that commits label rows (``dataset.label_rows``) exactly once.

Each output file is written whole and renamed into place (one PUT on S3), named by a hash of
the inputs it covers. Kept apart from the predictor and free of torch, because Ray Data runs
the sink in worker processes of its own, and torch's import there cost seconds of CPU at the
end of every labelling job.
"""

from __future__ import annotations

import pyarrow as pa
from ray.data import Datasink

from clf.config import LabelConfig
from clf.dataset.label_rows import LABEL_SCHEMA, commit_rows


class AtomicParquetSink(Datasink):
    """Ray's write_parquet writes in place, so a kill leaves a truncated file; we commit each
    write call's rows whole (temp file + rename locally, a single PUT on S3)."""

    def __init__(self, output: str, rows_per_file: int = LabelConfig.rows_per_file):
        self.output = output
        self.rows_per_file = rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        # Ray Data bundles blocks up to this before each write task: fewer, larger files for
        # readers, and fewer write tasks, each of which costs scheduling (RESULTS.md).
        return self.rows_per_file

    def write(self, blocks, ctx) -> list[tuple[str, int]]:
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables).cast(LABEL_SCHEMA)
        return [(commit_rows(self.output, table), table.num_rows)]
