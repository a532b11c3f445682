"""Evaluate a model artifact (or the HOG+SVM baseline) on a split of image shards.

Pipeline (Ray Data), as in jobs.label: read the shards -> decode + resize in CPU tasks ->
score in an actor pool (``clf.scoring``) that loads the artifact once per actor -> collect
probabilities on the driver (a test split is at most ~100k rows) -> metrics and report files
(clf.evaluation).
"""

from __future__ import annotations

import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clf import baseline, diagnostics, evaluation, runtime, storage
from clf.artifact.meta import read_meta
from clf.artifact.torch_model import load_torch
from clf.config import EvaluateConfig
from clf.dataset.shards import list_shards, read_classes, row_count
from clf.decode_tasks import decode_rows
from clf.errors import UsageError
from clf.labeling import decode_then_infer, pool_size
from clf.scoring import Scorer


@dataclass
class Target:
    """What ``check`` found: the model's meta and classes, and how the data's labels map to them."""

    meta: dict[str, Any]
    classes: list[str]  # the model's
    label_map: np.ndarray  # data label id -> model class id
    matched_by: str  # "name" or "position"
    shards: list[str] = field(default_factory=list)
    images: int = 0

    @property
    def is_baseline(self) -> bool:
        return self.meta.get("format") == baseline.NAME


@dataclass
class Scores:
    """Per decodable image: its model-space label and probabilities; and what failed."""

    labels: np.ndarray  # (N,) model class ids
    probs: np.ndarray  # (N, C)
    refs: list[tuple[str, str]]  # (shard URI, key) of each scored image
    errors: dict[str, int]  # decode failure reason -> count


@dataclass
class EvaluateSummary:
    output: str
    model: str
    images: int
    decode_errors: dict[str, int]
    metrics: dict[str, Any]
    most_confused: list[dict[str, Any]]
    matched_by: str
    files: list[str]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------
# Checks before Ray starts


def check(cfg: EvaluateConfig) -> Target:
    """Every flag and path, before any cluster or model work; raises ``UsageError``."""
    cfg.validate()
    if storage.exists(storage.join(cfg.data, "classes.json")):
        raise UsageError(f"--data {cfg.data}: give one split of it, such as {cfg.data}/test")
    shards = list_shards(cfg.data)
    if not shards:
        raise UsageError(f"--data {cfg.data}: no Parquet image shards (give DST/test)")
    data_classes = read_classes(_parent(cfg.data))
    if cfg.fits_baseline:
        if not cfg.train:
            raise UsageError(f"--model {baseline.NAME} needs --train DST/train to fit on")
        if not list_shards(cfg.train):
            raise UsageError(f"--train {cfg.train}: no Parquet image shards")
        train_classes = read_classes(_parent(cfg.train))
        meta = {"format": baseline.NAME, "arch": baseline.NAME, "classes": train_classes}
    else:
        meta = read_meta(cfg.model)
    label_map, matched_by = align_classes(data_classes, list(meta["classes"]))
    images = sum(row_count(s) for s in shards)
    return Target(meta, list(meta["classes"]), label_map, matched_by, shards, images)


def align_classes(data: list[str], model: list[str]) -> tuple[np.ndarray, str]:
    """Map the data's label ids to the model's class ids: by name when every data class is a
    model class, else by position when the counts agree (ImageNet wnid folders against
    torchvision's class names)."""
    index = {name: i for i, name in enumerate(model)}
    if all(name in index for name in data) and len(index) == len(model):
        return np.array([index[name] for name in data], dtype=np.int64), "name"
    if len(data) == len(model):
        return np.arange(len(data), dtype=np.int64), "position"
    missing = next(name for name in data if name not in index)
    raise UsageError(
        f"--data has {len(data)} classes and the model {len(model)}, and class {missing!r} "
        "is not one of the model's"
    )


def _parent(uri: str) -> str:
    uri = storage.normalize(uri)
    return (
        "s3://" + posixpath.dirname(uri[5:]) if uri.startswith("s3://") else posixpath.dirname(uri)
    )


# ------------------------------------------------------------------------------------------
# The job


def evaluate(cfg: EvaluateConfig, progress: Callable[[str], None] = print) -> EvaluateSummary:
    started = time.monotonic()
    target = check(cfg)
    progress(
        f"[evaluate] {target.images} images in {len(target.shards)} shards, "
        f"{len(target.classes)} model classes (labels matched by {target.matched_by})"
    )
    if target.matched_by == "position":
        progress("[evaluate] note: class names differ from the model's; matching by position")
    if target.is_baseline:
        scores = _score_baseline(cfg, target, progress)
    else:
        scores = _score_artifact(cfg, target, progress)
    if scores.errors:
        progress(f"[evaluate] {sum(scores.errors.values())} undecodable images left out")
    report = evaluation.compute(
        scores.labels,
        scores.probs,
        target.classes,
        top_k=cfg.top_k,
        pairs=cfg.confused_pairs,
    )
    pictures = _write_diagnostics(cfg, target, scores, progress) if cfg.diagnostics else []
    seconds = time.monotonic() - started
    extra = {
        "model": {
            "uri": cfg.model if cfg.fits_baseline else storage.normalize(cfg.model),
            "arch": target.meta.get("arch"),
            "sha256": target.meta.get("sha256"),
            "trained_on": storage.normalize(cfg.train) if cfg.train else None,
        },
        "data": storage.normalize(cfg.data),
        "labels_matched_by": target.matched_by,
        "inputs": target.images,
        "decode_errors": scores.errors,
        "seconds": round(seconds, 2),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    content = evaluation.write(report, cfg.output, extra, also=pictures)
    return EvaluateSummary(
        output=storage.normalize(cfg.output),
        model=extra["model"]["uri"],
        images=len(scores.labels),
        decode_errors=scores.errors,
        metrics=report.metrics,
        most_confused=report.most_confused,
        matched_by=target.matched_by,
        files=content["files"],
        seconds=seconds,
    )


def _score_baseline(cfg: EvaluateConfig, target: Target, progress: Callable[[str], None]) -> Scores:
    if cfg.fits_baseline:
        model = baseline.fit_on_shards(cfg.train, target.classes, cfg.baseline_size, progress)
    else:
        model = baseline.HogSvm.load(cfg.model)
    rows = baseline.featurize_shards(cfg.data, model.size)
    progress(f"[evaluate] {len(rows.labels)} images scored by {baseline.NAME}")
    refs = [ref for ref, ok in zip(zip(rows.shards, rows.keys), rows.ok) if ok]
    return Scores(
        labels=target.label_map[rows.labels],
        probs=model.predict_proba(rows.x) if len(rows.x) else np.zeros((0, len(target.classes))),
        refs=refs,
        errors=dict(Counter(e for e in rows.errors if e).most_common()),
    )


# ------------------------------------------------------------------------------------------
# Ray Data pipeline


def _score_artifact(cfg: EvaluateConfig, target: Target, progress: Callable[[str], None]) -> Scores:
    import ray

    gpu = runtime.use_gpu(cfg.device)
    actors = pool_size(cfg, gpu)
    fs, _ = storage.resolve(target.shards[0])
    prefix = "s3://" if target.shards[0].startswith("s3://") else ""
    ds = ray.data.read_parquet(
        [storage.resolve(s)[1] for s in target.shards],
        filesystem=fs,
        include_paths=True,
        num_cpus=0.25,
    ).select_columns(["key", "image", "label", "path"])
    # Without this, one decode task takes a whole read block and holds its output until 128 MiB
    # of pixels are ready, so inference waited for ~900 images to decode before starting.
    ds = ds.repartition(target_num_rows_per_block=cfg.decode_batch_size)
    ds = decode_then_infer(
        ds,
        decode_rows,
        target.meta,
        Scorer,
        {"model_uri": cfg.model, "prefer_gpu": gpu},
        cfg,
        gpu,
        actors,
        decode_batch_size=cfg.decode_batch_size,
    )
    progress(
        f"[evaluate] {target.images} images -> {actors} scorer actor(s) on {'GPU' if gpu else 'CPU'}"
    )
    labels, probs, refs, errors = [], [], [], Counter()
    done, next_report, started = 0, max(1, target.images // 10), time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        errors.update(e for e in batch["error"] if e)
        labels.append(batch["label"][ok].astype(np.int64))
        probs.append(batch["probs"][ok])
        refs += [(prefix + p, k) for p, k, good in zip(batch["path"], batch["key"], ok) if good]
        done += len(ok)
        if done >= next_report:
            rate = done / (time.monotonic() - started)
            progress(f"[evaluate] {done}/{target.images} images scored ({rate:.1f} img/s)")
            next_report += max(1, target.images // 10)
    num_classes = len(target.classes)
    return Scores(
        labels=target.label_map[np.concatenate(labels)] if labels else np.zeros(0, np.int64),
        probs=np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32),
        refs=refs,
        errors=dict(errors.most_common()),
    )


# ------------------------------------------------------------------------------------------
# Diagnostics


def _write_diagnostics(
    cfg: EvaluateConfig, target: Target, scores: Scores, progress: Callable[[str], None]
) -> list[str]:
    written = []
    if not target.is_baseline:
        png = diagnostics.filters_png(load_torch(cfg.model).module)
        if png:
            storage.write_bytes(storage.join(cfg.output, "filters.png"), png)
            written.append("filters.png")
    picked = diagnostics.confident_mistakes(scores.labels, scores.probs, cfg.mistakes)
    if len(picked):
        predicted = scores.probs[picked].argmax(axis=1)
        captions = [
            diagnostics.caption(
                target.classes[scores.labels[i]], target.classes[p], scores.probs[i, p]
            )
            for i, p in zip(picked, predicted)
        ]
        images = diagnostics.read_shard_images([scores.refs[i] for i in picked])
        png = diagnostics.mistakes_png(images, captions)
        storage.write_bytes(storage.join(cfg.output, "confident_mistakes.png"), png)
        written.append("confident_mistakes.png")
    progress(f"[evaluate] diagnostics: {', '.join(written) or 'nothing to draw'}")
    return written
