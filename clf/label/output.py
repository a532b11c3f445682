"""A label output as a run finds it: temp files a kill left, the inputs already covered, and
progress while this run's rows arrive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pyarrow.parquet as pq

from clf import storage
from clf.dataset.label_rows import TEMP_FILE, committed_files, read_rows
from clf.errors import ClfError


def remove_temp_files(output: str) -> None:
    for uri in storage.list_files(output, recursive=False):
        if TEMP_FILE.search(uri):
            storage.delete(uri)


def covered_uris(output: str) -> set[str]:
    return set(read_rows(output, ["uri"]).column("uri").to_pylist())


class CommitProgress:
    """Progress lines while the pipeline runs: how many of ``total`` rows this run has committed.

    The sink commits in Ray workers (or, for a small input, this process's loop), so the
    driver learns of a file from storage: every ``every`` seconds it lists the output and reads
    the row count from each new file's footer.
    """

    def __init__(self, output: str, total: int, every: float, progress: Callable[[str], None]):
        self.output, self.total, self.every, self.progress = output, total, every, progress
        self.seen = set(committed_files(output))  # an earlier run's files are not this run's
        self.rows = 0
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="label-progress", daemon=True)

    def __enter__(self) -> CommitProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self._count_new_files()
            except (OSError, ClfError):  # best effort: the job's own reads and writes report
                continue
            elapsed = time.monotonic() - self.started
            rate = self.rows / elapsed
            left = f", about {(self.total - self.rows) / rate:.0f}s to go" if rate else ""
            self.progress(
                f"[label] {self.rows}/{self.total} images labelled and committed "
                f"({rate:.1f} img/s, {elapsed:.0f}s{left})"
            )

    def _count_new_files(self) -> None:
        for uri in committed_files(self.output):
            if uri not in self.seen:
                fs, path = storage.resolve(uri)
                self.rows += pq.read_metadata(path, filesystem=fs).num_rows
                self.seen.add(uri)
