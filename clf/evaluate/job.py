"""Evaluate a model artifact (or the HOG+SVM baseline) on a split of image shards.

Pipeline (Ray Data), as in jobs.label (``clf.inference``): read the shards -> decode in CPU
tasks -> score in an actor pool (``scorer``) that loads the artifact once per actor -> collect
probabilities on the driver (a test split is at most ~100k rows) -> metrics and report files
(``metrics``, ``report``). A few images (``--small-input``) with no cluster to join go through
the same decode task and scorer in this process, with no Ray to start.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from clf import runtime, storage
from clf.config import EvaluateConfig
from clf.dataset.shards import read_shard
from clf.evaluate import metrics, report
from clf.evaluate.checks import Target
from clf.evaluate.scorer import Scorer
from clf.images.preprocess import Preprocess
from clf.inference.parquet_rows import read_shard_rows
from clf.inference.pixels import decode_batch
from clf.inference.stage import decode_then_infer, pool_size, runs_in_process


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
# The job


def evaluate(
    cfg: EvaluateConfig, target: Target, progress: Callable[[str], None] = print
) -> EvaluateSummary:
    """``target``: what ``checks.check`` found for ``cfg``."""
    started = time.monotonic()
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
    scored = metrics.compute(
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
    content = report.write(scored, cfg.output, extra, also=pictures)
    return EvaluateSummary(
        output=storage.normalize(cfg.output),
        model=extra["model"]["uri"],
        images=len(scores.labels),
        decode_errors=scores.errors,
        metrics=scored.metrics,
        most_confused=scored.most_confused,
        matched_by=target.matched_by,
        files=content["files"],
        seconds=seconds,
    )


def _score_baseline(cfg: EvaluateConfig, target: Target, progress: Callable[[str], None]) -> Scores:
    from clf.evaluate import baseline

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
    if runs_in_process(cfg, target.images):
        progress(f"[evaluate] {target.images} images, in this process (at most --small-input)")
        return _collect(_scored_here(cfg, target), target, progress)
    runtime.init_ray(streaming=True)
    gpu = runtime.use_gpu(cfg.device)
    actors = pool_size(cfg, gpu)
    ds = read_shard_rows(target.shards, cfg.decode_batch_size, columns=("key", "image", "label"))
    ds = decode_then_infer(
        ds,
        cfg,
        target.meta,
        Scorer,
        {},
        gpu=gpu,
        actors=actors,
        decode_fn=decode_batch,
        decode_batch_size=cfg.decode_batch_size,
    )
    progress(
        f"[evaluate] {target.images} images -> {actors} scorer actor(s) on {'GPU' if gpu else 'CPU'}"
    )
    return _collect(ds.iter_batches(batch_size=None, batch_format="numpy"), target, progress)


def _scored_here(cfg: EvaluateConfig, target: Target) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's batches, made in this process: the same decode task and scorer."""
    scorer = Scorer(cfg.model, False, cfg.max_pixels, os.cpu_count() or 1)
    preprocess = Preprocess.from_meta(target.meta).to_meta()
    for shard in target.shards:
        rows = read_shard(shard, ["key", "image", "label"])
        for start in range(0, rows.num_rows, cfg.decode_batch_size):
            part = rows.slice(start, cfg.decode_batch_size)
            keys = part.column("key").to_pylist()
            batch = {
                "key": np.array(keys, dtype=object),
                "image": np.array(part.column("image").to_pylist(), dtype=object),
                "label": part.column("label").to_numpy(),
                "uri": np.array([f"{shard}#{key}" for key in keys], dtype=object),
            }
            yield scorer(decode_batch(batch, preprocess, cfg.max_pixels))


def _collect(
    batches: Iterable[dict[str, np.ndarray]], target: Target, progress: Callable[[str], None]
) -> Scores:
    """The scored batches' labels, probabilities and failures, with progress lines."""
    labels, probs, refs, errors = [], [], [], Counter()
    done, next_report, started = 0, max(1, target.images // 10), time.monotonic()
    for batch in batches:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        errors.update(e for e in batch["error"] if e)
        labels.append(batch["label"][ok].astype(np.int64))
        probs.append(batch["probs"][ok])
        refs += [
            (u[: -len(k) - 1], k) for u, k, good in zip(batch["uri"], batch["key"], ok) if good
        ]
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
    from clf.artifact.torch_model import load_torch  # torch, for the pictures only
    from clf.evaluate import diagnostics

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
