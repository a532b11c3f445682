"""The review queue: the label rows most worth a person's time (active learning's uncertainty
sampling), with a contact sheet of their images."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from clf import plots, storage
from clf.dataset.label_rows import read_files
from clf.dataset.shards import read_images
from clf.images.decode import thumbnail
from clf.monitor.rows import RunColumns, top_k_entropy, top_scores

SHEET_IMAGES = 60  # the contact sheet shows the queue's first rows, up to this many
SHEET_COLUMNS = 5


@dataclass
class Candidates:
    """Every labelled row of a run, where it sits and how uncertain it is."""

    file: np.ndarray  # index into the run's files
    row: np.ndarray  # row within that file
    label: np.ndarray  # predicted class, as a code
    score: np.ndarray  # higher: more worth a look


def uncertainty(strategy: str, topk: np.ndarray) -> np.ndarray:
    """least-confidence: 1 - p1; margin: 1 - (p1 - p2); entropy: of the top-k scores."""
    if strategy == "least-confidence":
        return 1.0 - topk[:, 0]
    if strategy == "margin":
        second = topk[:, 1] if topk.shape[1] > 1 else 1.0 - topk[:, 0]
        return 1.0 - (topk[:, 0] - second)
    return top_k_entropy(topk, topk.shape[1])


def candidates(run: RunColumns, strategy: str) -> Candidates:
    """Every labelled row of the run, scored, with the file and row it sits in."""
    labelled = np.flatnonzero(run.table.column("error").is_null().to_numpy(zero_copy_only=False))
    table = run.table.take(labelled)
    names = table.column("label")
    codes = pc.index_in(names, value_set=pc.unique(names)).to_numpy()
    file = np.searchsorted(run.starts, labelled, side="right") - 1
    scores = uncertainty(strategy, top_scores(table.column("topk_scores")))
    return Candidates(file, labelled - run.starts[file], codes, scores)


def pick(scores: np.ndarray, labels: np.ndarray, n: int, stratify: bool) -> np.ndarray:
    """Indices of the ``n`` highest scores, highest first. Stratified, classes take turns: each
    class's best, then each class's second best, so that no class fills the queue."""
    if not stratify:
        return np.argsort(-scores, kind="stable")[:n]
    by_class = np.lexsort((-scores, labels))  # by class, then by score within it
    # Each row's rank within its class: its place in by_class minus where its class starts.
    sorted_labels = labels[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    rank = np.arange(len(by_class)) - np.repeat(starts, np.diff(np.r_[starts, len(by_class)]))
    turns = np.empty_like(rank)
    turns[by_class] = rank
    return np.lexsort((-scores, turns))[:n]


def review_rows(run: RunColumns, strategy: str, n: int, stratify: bool) -> pa.Table:
    """The queue: whole label rows, plus ``score`` and ``strategy``, most worth a look first."""
    files = run.files
    found = candidates(run, strategy)
    chosen = pick(found.score, found.label, n, stratify)
    table, places = read_files([]), []
    for i in np.unique(found.file[chosen]):  # each file read once, for its chosen rows alone
        at = np.flatnonzero(found.file[chosen] == i)
        table = pa.concat_tables([table, read_files([files[i]]).take(found.row[chosen[at]])])
        places.append(at)
    if places:
        table = table.take(np.argsort(np.concatenate(places)))
    return table.append_column("score", pa.array(found.score[chosen], pa.float32())).append_column(
        "strategy", pa.array([strategy] * len(chosen), pa.string())
    )


def write_review(table: pa.Table, output: str) -> list[str]:
    """review.parquet, review.csv (lists joined by ``|``) and review.png; their URIs."""
    parquet, csv = io.BytesIO(), io.BytesIO()
    pq.write_table(table, parquet)
    pcsv.write_csv(_flat(table), csv)
    written = [storage.join(output, name) for name in ("review.parquet", "review.csv")]
    storage.write_bytes(written[0], parquet.getvalue())
    storage.write_bytes(written[1], csv.getvalue())
    if table.num_rows:
        written.append(storage.join(output, "review.png"))
        storage.write_bytes(written[2], contact_sheet(table.slice(0, SHEET_IMAGES)))
    return written


def contact_sheet(table: pa.Table) -> bytes:
    """Each row's image under its top-2 labels and scores."""
    images = read_images(table.column("uri").to_pylist())
    labels, scores = (
        table.column("topk_labels").to_pylist(),
        table.column("topk_scores").to_pylist(),
    )
    captions = [
        "\n".join(f"{name[:18]} {score:.2f}" for name, score in zip(top[:2], values[:2]))
        for top, values in zip(labels, scores)
    ]
    return plots.image_grid([thumbnail(image) for image in images], captions, SHEET_COLUMNS)


def _flat(table: pa.Table) -> pa.Table:
    """CSV has no lists: each list column becomes its values joined by ``|``."""
    for name in ("topk_labels", "topk_scores"):
        strings = pc.cast(table.column(name), pa.list_(pa.string()))
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.binary_join(strings, "|"))
    return table
