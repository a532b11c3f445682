"""Label an archive: one Parquet row per input image, exactly once, errors included.

Pipeline (Ray Data): list inputs on the driver -> read + decode + resize in CPU tasks ->
predict in an actor pool that loads the artifact once per actor -> commit Parquet files
(``label_sink``). Each output file is committed whole, named by a hash of the inputs it covers,
so a job killed at any moment and re-run labels only what no committed file covers.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clf import runtime, storage
from clf.artifact.classifier import load_classifier, top_k
from clf.checks import LABEL_JOB_FILE, check_label, label_job
from clf.config import DEFAULT_MAX_PIXELS, EvaluateConfig, LabelConfig
from clf.dataset.shards import read_shard
from clf.decode_tasks import decode_batch, read_batch
from clf.errors import ClfError, UsageError
from clf.images.preprocess import Preprocess
from clf.label_sink import LABEL_SCHEMA, TEMP_FILE, AtomicParquetSink

# Write tasks in flight at once: each commits one file, and they wait on storage, not a CPU.
# They ask for no CPU, so they run in the spare workers an embedded Ray keeps.
WRITE_TASKS = runtime.SPARE_WORKERS
# The size of a decode task of listed files (``files_per_task``). Its output is one block in
# the object store, which a streaming job keeps small: blocks of thousands of photos starved
# a GPU node's predictors.
MAX_FILES_PER_TASK = 256
MAX_TASK_OUTPUT_BYTES = 16 << 20
TASKS_PER_CPU = 4


@dataclass
class Inputs:
    kind: str  # "files" or "shards"
    uris: list[str]  # every input, as it will appear in the uri column


@dataclass
class LabelSummary:
    output: str
    inputs: int
    already_labelled: int
    labelled: int
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    listing_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.labelled / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------
# Inputs and what is already done


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


def committed_files(output: str) -> list[str]:
    """Only renamed-into-place files count: a temp file left by a kill is never output."""
    return [f for f in storage.list_files(output, recursive=False) if f.endswith(".parquet")]


def _remove_temp_files(output: str) -> None:
    for uri in storage.list_files(output, recursive=False):
        if TEMP_FILE.search(uri):
            storage.delete(uri)


def covered_uris(output: str) -> set[str]:
    return set(read_rows(output, ["uri"]).column("uri").to_pylist())


def read_rows(output: str, columns: list[str] | None = None) -> pa.Table:
    schema = pa.schema([LABEL_SCHEMA.field(c) for c in columns]) if columns else LABEL_SCHEMA
    tables = []
    for uri in committed_files(output):
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, schema=LABEL_SCHEMA, columns=columns))
    return pa.concat_tables(tables) if tables else schema.empty_table()


class CommitProgress:
    """Progress lines while the pipeline runs: how many of ``total`` rows this run has committed.

    The sink commits in Ray workers, so the driver learns of a file from storage: every
    ``every`` seconds it lists the output and reads the row count from each new file's footer.
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


def _record_job(cfg: LabelConfig, meta: dict[str, Any]) -> None:
    """What ``checks.check_label`` compares the next run against."""
    storage.write_json(storage.join(cfg.output, LABEL_JOB_FILE), label_job(cfg, meta))


# ------------------------------------------------------------------------------------------
# Pipeline stages


class Predictor:
    """Actor: loads the artifact once, then turns pixel batches (``decode_batch``) or
    bytes-and-pixels batches (``read_batch``, decoded here on the GPU) into label rows."""

    def __init__(
        self,
        model_uri: str,
        top_k: int,
        prefer_gpu: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int = 1,
    ):
        self.model = load_classifier(model_uri, prefer_gpu, threads)
        self.classes = np.array(self.model.classes, dtype=object)
        self.model_id = self.model.model_id
        self.top_k = min(top_k, len(self.classes))
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if "pixels" in batch:
            errors = list(batch["error"])
            ok = np.array([e == "" for e in errors], dtype=bool)
            probs = self.model.predict_proba(batch["pixels"][ok]) if ok.any() else None
        else:
            probs, errors = self._decode_and_predict(batch)
            ok = np.array([e == "" for e in errors], dtype=bool)
        n = len(ok)
        label_ids = np.zeros(n, dtype=np.int32)
        scores = np.zeros((n, self.top_k), dtype=np.float32)
        indices = np.zeros((n, self.top_k), dtype=np.int64)
        if ok.any():
            scores[ok], indices[ok] = top_k(probs, self.top_k)
            label_ids[ok] = indices[ok, 0]
        # Columnar: at thousands of rows a second, per-row Python lists cost more than the GPU.
        failed = ~ok
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * self.top_k)
        rows = {
            "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(self.classes[label_ids], pa.string(), mask=failed),
            "label_id": pa.array(label_ids, pa.int32(), mask=failed),
            "confidence": pa.array(scores[:, 0], pa.float32(), mask=failed),
            "topk_labels": pa.ListArray.from_arrays(
                offsets, pa.array(self.classes[indices.ravel()], pa.string()), mask=pa.array(failed)
            ),
            "topk_scores": pa.ListArray.from_arrays(
                offsets, pa.array(scores.ravel(), pa.float32()), mask=pa.array(failed)
            ),
            "model": pa.array([self.model_id] * n, pa.string()),
            "error": pa.array([None if good else e for e, good in zip(errors, ok)], pa.string()),
        }
        return pa.table(rows, schema=LABEL_SCHEMA)

    def _decode_and_predict(self, batch: dict[str, np.ndarray]):
        """``read_batch`` rows -> (probabilities of the rows that decoded, every row's error),
        the JPEGs decoded on the model's device (a torch ``Artifact``'s)."""
        import torch

        from clf.images.nvjpeg import decode_on_device

        model, kinds = self.model, batch["kind"]
        crop = model.preprocess.crop
        errors = list(batch["error"])
        pixels = torch.zeros((len(kinds), 3, crop, crop), dtype=torch.uint8, device=model.device)
        done = [i for i, kind in enumerate(kinds) if kind == "pixels"]
        if done:
            shape = (3, crop, crop)
            host = [np.frombuffer(batch["data"][i], dtype=np.uint8).reshape(shape) for i in done]
            pixels[done] = model.to_device(np.stack(host))
        jpegs = [i for i, kind in enumerate(kinds) if kind == "jpeg"]
        if jpegs:
            data = [batch["data"][i] for i in jpegs]
            decoded, reasons = decode_on_device(
                data, model.preprocess, model.device, self.max_pixels
            )
            pixels[jpegs] = decoded
            for i, reason in zip(jpegs, reasons):
                errors[i] = reason
        ok = torch.tensor([e == "" for e in errors], dtype=torch.bool, device=model.device)
        if not ok.any():
            return None, errors
        return model.probabilities(pixels[ok]).cpu().numpy(), errors


# ------------------------------------------------------------------------------------------
# The job


def pool_size(cfg: LabelConfig | EvaluateConfig, gpu: bool) -> int:
    if cfg.actors:
        return cfg.actors
    if gpu:  # one actor per GPU, or per share of one; ActorPoolStrategy(size=n) starts all n
        slots = runtime.gpu_actor_slots(cfg.gpus_per_actor)
        if slots == 0:
            raise UsageError(f"--gpus-per-actor {cfg.gpus_per_actor}: no node has that many GPUs")
        return slots
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 2)) // 4)


def model_threads(actors: int, gpu: bool) -> int:
    """CPU threads for each actor's model: one beside a GPU; on CPU, the actor's share of the
    cluster's cores. The actor holds one CPU and decode tasks the rest, so its extra threads
    share cores with decoding and use what decoding leaves idle (RESULTS.md: +14% on 2 cores)."""
    if gpu:
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)


def files_per_task(count: int, cpus: int, crop: int, least: int) -> int:
    """Listed files per decode task, which reads and decodes them as one batch into one block.
    A task's reads ramp up anew, paying an object store's round trip once a task: so tasks are
    as large as ``MAX_FILES_PER_TASK`` and ``MAX_TASK_OUTPUT_BYTES`` of pixels allow, but never
    fewer than ``TASKS_PER_CPU`` per CPU, so that a small input still streams to the model and
    commits as it goes, and never under ``least``."""
    largest = min(MAX_FILES_PER_TASK, MAX_TASK_OUTPUT_BYTES // (3 * crop * crop))
    return max(least, min(largest, math.ceil(count / (TASKS_PER_CPU * cpus))))


def decode_then_infer(
    ds,
    decode_fn,
    meta,
    actor_cls,
    actor_kwargs,
    cfg: LabelConfig | EvaluateConfig,
    gpu,
    actors,
    *,
    decode_batch_size: int | None,
    decode_kwargs: dict[str, Any] | None = None,
):
    """CPU decode tasks, then an actor pool that loads the model once: jobs.label and
    jobs.evaluate share this stage, so the model never waits on JPEG decoding in either.
    ``decode_batch_size`` None gives each decode task one whole block as its batch."""
    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():
        # Ray 2.60 deprecates every per-task way to set max_retries and names no replacement;
        # the pinned version cannot reach the removal (2.64), and the warning told users nothing.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn. is deprecated")
        decoded = ds.map_batches(
            decode_fn,
            # The preprocessing keys only: meta's class list need not travel with every task.
            fn_kwargs={
                "preprocess": Preprocess.from_meta(meta).to_meta(),
                "max_pixels": cfg.max_pixels,
                **(decode_kwargs or {}),
            },
            batch_size=decode_batch_size,
            num_cpus=1,
            # Retry a decode task whose worker died a few times, not forever (Ray Data's
            # default). Per-task remote args also keep Ray from fusing decode into the actors.
            ray_remote_args_fn=_decode_task_args,
        )
    return decoded.map_batches(
        actor_cls,
        fn_constructor_kwargs={**actor_kwargs, "threads": model_threads(actors, gpu)},
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=actors),
        num_gpus=cfg.gpus_per_actor if gpu else 0,
        # Held, not just needed to schedule: the actor feeds its device, and decode tasks must
        # not crowd in beside it.
        num_cpus=1,
    )


def label(cfg: LabelConfig, progress: Callable[[str], None] = print) -> LabelSummary:
    import ray

    started = time.monotonic()
    meta = check_label(cfg)
    _record_job(cfg, meta)
    _remove_temp_files(cfg.output)
    inputs = list_inputs(cfg.input)
    covered = covered_uris(cfg.output)
    todo = [u for u in inputs.uris if u not in covered]
    listing_seconds = time.monotonic() - started
    progress(
        f"[label] {len(inputs.uris)} inputs ({inputs.kind}) listed in {listing_seconds:.1f}s; "
        f"{len(inputs.uris) - len(todo)} already labelled, {len(todo)} to go"
    )
    summary = LabelSummary(
        storage.normalize(cfg.output),
        len(inputs.uris),
        len(inputs.uris) - len(todo),
        0,
        listing_seconds=listing_seconds,
    )
    if todo:
        gpu = runtime.use_gpu(cfg.device)
        if cfg.decode == "gpu" and not gpu:
            raise UsageError("--decode gpu: the Ray cluster has no GPUs")
        decode_here = cfg.decode == "gpu" or (
            gpu and cfg.decode == "auto" and runtime.gpu_has_cuda(cfg.gpus_per_actor)
        )
        actors = pool_size(cfg, gpu)
        if inputs.kind == "files":
            cpus = int(ray.cluster_resources().get("CPU", 1))
            crop = Preprocess.from_meta(meta).crop
            per_task = files_per_task(len(todo), cpus, crop, cfg.decode_batch_size)
            ds = ray.data.from_items(
                [{"uri": u} for u in todo], override_num_blocks=math.ceil(len(todo) / per_task)
            )
        else:
            ds = _shard_rows(inputs, set(todo))
        ds = decode_then_infer(
            ds,
            read_batch if decode_here else decode_batch,
            meta,
            Predictor,
            {
                "model_uri": cfg.model,
                "top_k": cfg.top_k,
                "prefer_gpu": gpu,
                "max_pixels": cfg.max_pixels,
            },
            cfg,
            gpu,
            actors,
            decode_batch_size=None if inputs.kind == "files" else cfg.decode_batch_size,
            decode_kwargs={"read_concurrency": cfg.read_concurrency},
        )
        where = "GPU, JPEG decode there" if decode_here else "GPU" if gpu else "CPU"
        progress(f"[label] {len(todo)} images -> {actors} predictor actor(s) on {where}")
        run_started = time.monotonic()
        with CommitProgress(cfg.output, len(todo), cfg.progress_every, progress):
            # Writes are I/O and ask for no CPU: on a node where decode tasks fill every free
            # CPU, a write needing one waited for decoding to end, and nothing was committed
            # until then (6,000 images on 2 cores: first file at 62 s of 64; now at 12 s).
            ds.write_datasink(
                AtomicParquetSink(cfg.output, cfg.rows_per_file),
                ray_remote_args={"num_cpus": 0},
                concurrency=WRITE_TASKS,
            )
        summary.seconds = time.monotonic() - run_started
    rows = read_rows(cfg.output, ["uri", "error"]).to_pydict()
    todo_set = set(todo)
    summary.labelled = len(todo_set.intersection(rows["uri"]))
    summary.errors = dict(  # this run's errors only, not those of earlier runs
        Counter(e for u, e in zip(rows["uri"], rows["error"]) if e and u in todo_set).most_common()
    )
    missing = len(set(inputs.uris).difference(rows["uri"]))
    if missing:
        raise ClfError(f"{missing} inputs have no label row after the run; re-run to finish")
    return summary


def _decode_task_args() -> dict:
    return {"max_retries": 3}


def shard_plan(inputs: Inputs, todo: set[str]) -> tuple[list[str], dict[str, frozenset[str]]]:
    """The shards to read, and the wanted keys of those only partly to do.

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


def select_shard_rows(
    batch: dict[str, np.ndarray], prefix: str, partial: dict[str, frozenset[str]]
) -> dict[str, np.ndarray]:
    """``path`` + ``key`` -> ``uri``, keeping the rows of partly covered shards still to do."""
    uris = np.array([f"{prefix}{p}#{k}" for p, k in zip(batch["path"], batch["key"])], dtype=object)
    keep = np.array(
        [p not in partial or k in partial[p] for p, k in zip(batch["path"], batch["key"])],
        dtype=bool,
    )
    if keep.all():
        return {"uri": uris, "image": batch["image"]}
    return {"uri": uris[keep], "image": batch["image"][keep]}


_PARTIAL_CACHE: dict[str, dict[str, frozenset[str]]] = {}


def _partial_keys(ref) -> dict[str, frozenset[str]]:
    """Fetched once per worker process and job (keyed by the ref's id, so it pins nothing)."""
    import ray

    if ref.hex() not in _PARTIAL_CACHE:
        _PARTIAL_CACHE.clear()
        _PARTIAL_CACHE[ref.hex()] = ray.get(ref)
    return _PARTIAL_CACHE[ref.hex()]


def _shard_rows(inputs: Inputs, todo: set[str]):
    import ray

    shards, partial = shard_plan(inputs, todo)
    fs, _ = storage.resolve(shards[0])
    paths = [storage.resolve(s)[1] for s in shards]
    prefix = "s3://" if storage.normalize(shards[0]).startswith("s3://") else ""
    partial_paths = frozenset(partial)  # small: travels with the function
    partial_ref = ray.put(partial) if partial else None

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if partial_ref is None or not partial_paths.intersection(batch["path"]):
            return select_shard_rows(batch, prefix, {})
        return select_shard_rows(batch, prefix, _partial_keys(partial_ref))

    # batch_size=None: a block as read, so small shards are not merged into one big output file.
    return (
        ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
        .select_columns(["key", "image", "path"])
        .map_batches(to_rows, batch_size=None)
    )
