"""Label an archive: one Parquet row per input image, exactly once, errors included.

Pipeline (Ray Data): list inputs on the driver -> read and decode in CPU tasks
(``clf.inference``) -> predict in an actor pool that loads the artifact once per actor ->
commit Parquet files (``sink``). A few inputs (``--small-input``) with no cluster to join skip
Ray: the same decode, predictor and commit run in this process, sooner than Ray would start.

Each output file is committed whole, named by a hash of the inputs it covers, so a job killed
at any moment and re-run labels only what no committed file covers.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clf import runtime, storage
from clf.config import LabelConfig
from clf.dataset.label_rows import commit_rows, new_run_id, read_rows, record_run
from clf.dataset.shards import read_images
from clf.errors import ClfError, UsageError
from clf.images.preprocess import Preprocess
from clf.inference.parquet_rows import read_shard_rows
from clf.inference.pixels import decode_batch, read_batch
from clf.inference.stage import (
    DECODE_TASK_RETRIES,
    cluster_cpus,
    decode_then_infer,
    files_per_task,
    pool_size,
    runs_in_process,
)
from clf.label.checks import JOB_FILE, label_job
from clf.label.inputs import Inputs, list_inputs, shard_plan
from clf.label.output import CommitProgress, covered_uris, remove_temp_files
from clf.label.predictor import Predictor

# Write tasks in flight at once, at most: each commits one file, and they wait on storage, not
# a CPU. They ask for no CPU, so they run in the spare workers an embedded Ray keeps.
WRITE_TASKS = runtime.SPARE_WORKERS


@dataclass
class LabelSummary:
    output: str
    inputs: int
    already_labelled: int
    labelled: int
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    listing_seconds: float = 0.0
    run: str = ""  # this run's record in OUTPUT/_runs, which jobs.monitor reads

    @property
    def images_per_s(self) -> float:
        return self.labelled / self.seconds if self.seconds else 0.0


def label(
    cfg: LabelConfig, meta: dict[str, Any], progress: Callable[[str], None] = print
) -> LabelSummary:
    """Label what ``cfg.output`` does not cover yet; ``meta``: the artifact's meta.json, as
    ``checks.check_label`` returned it."""
    started = time.monotonic()
    run_id, started_at = new_run_id(), _now()
    storage.write_json(storage.join(cfg.output, JOB_FILE), label_job(cfg, meta))
    remove_temp_files(cfg.output)
    inputs = list_inputs(cfg.input)
    covered = covered_uris(cfg.output)
    todo = [u for u in inputs.uris if u not in covered]
    summary = LabelSummary(
        storage.normalize(cfg.output),
        inputs=len(inputs.uris),
        already_labelled=len(inputs.uris) - len(todo),
        labelled=0,
        listing_seconds=time.monotonic() - started,
    )
    progress(
        f"[label] {summary.inputs} inputs ({inputs.kind}) listed in "
        f"{summary.listing_seconds:.1f}s; {summary.already_labelled} already labelled, "
        f"{len(todo)} to go"
    )
    if todo:
        run_started = time.monotonic()
        if cfg.decode != "gpu" and runs_in_process(cfg, len(todo)):
            label_here(cfg, meta, inputs, todo, progress)
        else:
            runtime.init_ray(streaming=True)
            label_rows(cfg, meta, inputs, todo, progress)
        summary.seconds = time.monotonic() - run_started
    summary = count_rows(cfg.output, inputs, todo, summary)
    summary.run = run_id
    record_run(
        cfg.output,
        run_id,
        {
            "started_at": started_at,
            "finished_at": _now(),
            "input": storage.normalize(cfg.input),
            "model": meta["sha256"][:12],
            "model_uri": storage.normalize(cfg.model),
            "inputs": summary.inputs,
            "labelled": summary.labelled,
        },
    )
    return summary


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def label_rows(
    cfg: LabelConfig,
    meta: dict[str, Any],
    inputs: Inputs,
    todo: list[str],
    progress: Callable[[str], None],
) -> None:
    """The Ray Data pipeline over ``todo``, until every row is committed."""
    import ray

    from clf.label.sink import AtomicParquetSink

    gpu = runtime.use_gpu(cfg.device)
    if cfg.decode == "gpu" and not gpu:
        raise UsageError("--decode gpu: the Ray cluster has no GPUs")
    decode_here = cfg.decode == "gpu" or (
        gpu and cfg.decode == "auto" and runtime.gpu_has_cuda(cfg.gpus_per_actor)
    )
    if inputs.kind == "files":
        crop = Preprocess.from_meta(meta).crop
        per_task = files_per_task(len(todo), cluster_cpus(), crop, cfg.decode_batch_size)
        blocks = math.ceil(len(todo) / per_task)
        ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=blocks)
    else:
        shards, partial = shard_plan(inputs, set(todo))
        ds = read_shard_rows(shards, cfg.decode_batch_size, partial=partial)
    actors = pool_size(cfg, gpu)
    ds = decode_then_infer(
        ds,
        cfg,
        meta,
        Predictor,
        {"top_k": cfg.top_k},
        gpu=gpu,
        actors=actors,
        decode_fn=read_batch if decode_here else decode_batch,
        # A task of listed files reads its whole block, so that its reads pipeline across it.
        decode_batch_size=None if inputs.kind == "files" else cfg.decode_batch_size,
        decode_kwargs={"read_concurrency": cfg.read_concurrency},
    )
    where = "GPU, JPEG decode there" if decode_here else "GPU" if gpu else "CPU"
    progress(f"[label] {len(todo)} images -> {actors} predictor actor(s) on {where}")
    with CommitProgress(cfg.output, len(todo), cfg.progress_every, progress):
        # Writes are I/O and ask for no CPU: where decode tasks fill every free CPU, a write
        # needing one would wait for decoding to end, and nothing would be committed until then.
        ds.write_datasink(
            AtomicParquetSink(cfg.output, cfg.rows_per_file),
            ray_remote_args={"num_cpus": 0},
            # No more writers than files of rows_per_file rows, which Ray Data would warn of.
            concurrency=max(1, min(WRITE_TASKS, len(todo) // cfg.rows_per_file)),
        )


def label_here(
    cfg: LabelConfig,
    meta: dict[str, Any],
    inputs: Inputs,
    todo: list[str],
    progress: Callable[[str], None],
) -> None:
    """A few inputs in this process, without Ray to start: the pipeline's decode task, its
    predictor and its commit, called directly, one file of rows at a time."""
    progress(f"[label] {len(todo)} images, in this process (at most --small-input)")
    predictor = Predictor(cfg.model, cfg.top_k, False, cfg.max_pixels, os.cpu_count() or 1)
    preprocess = Preprocess.from_meta(meta).to_meta()
    with CommitProgress(cfg.output, len(todo), cfg.progress_every, progress):
        for start in range(0, len(todo), cfg.rows_per_file):
            batch = {"uri": np.array(todo[start : start + cfg.rows_per_file], dtype=object)}
            if inputs.kind == "shards":  # shard rows carry their bytes, as Ray's reader gives
                batch["image"] = np.array(read_images(list(batch["uri"])), dtype=object)
            commit_rows(cfg.output, predictor(_decode_with_retries(batch, preprocess, cfg)))


def _decode_with_retries(batch: dict, preprocess: dict, cfg: LabelConfig) -> dict:
    """A storage fault that outlived its own retries fails the batch, and the batch is tried
    again, as Ray retries a decode task (``inference.stage.DECODE_TASK_RETRIES``)."""
    for _ in range(DECODE_TASK_RETRIES):
        try:
            return decode_batch(batch, preprocess, cfg.max_pixels, cfg.read_concurrency)
        except storage.TransientStorageError:
            continue
    return decode_batch(batch, preprocess, cfg.max_pixels, cfg.read_concurrency)  # or raise


def count_rows(output: str, inputs: Inputs, todo: list[str], summary: LabelSummary) -> LabelSummary:
    """This run's rows and errors, from what is committed; every input must have its row."""
    rows = read_rows(output, ["uri", "error"]).to_pydict()
    todo_set = set(todo)
    summary.labelled = len(todo_set.intersection(rows["uri"]))
    summary.errors = dict(  # this run's errors only, not those of earlier runs
        Counter(e for u, e in zip(rows["uri"], rows["error"]) if e and u in todo_set).most_common()
    )
    missing = len(set(inputs.uris).difference(rows["uri"]))
    if missing:
        raise ClfError(f"{missing} inputs have no label row after the run; re-run to finish")
    return summary
