"""The classical baseline: HOG features and a linear SVM (scikit-image, scikit-learn).

It answers "how much does the network buy us?" on the same shards and the same report. The
fitted model is saved as plain arrays (``hog_svm.npz``) beside a ``meta.json``, and loads with
``allow_pickle=False``: like the TorchScript artifact, loading it never runs pickled code.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ImageOps

from clf import storage
from clf.config import BASELINE_MODEL
from clf.dataset.shards import list_shards, read_shard
from clf.errors import ModelLoadError, UsageError
from clf.evaluate import metrics
from clf.images.decode import DecodeError, decode_image

NAME = BASELINE_MODEL
MODEL_FILE = "hog_svm.npz"
C_GRID = (1e-5, 1e-4, 1e-3)  # picked by cross-validation on the training shards
CV_FOLDS = 3


@dataclass
class Featurized:
    """HOG rows of a split's decodable images, plus what every input row was."""

    x: np.ndarray  # (decodable images, features)
    labels: np.ndarray  # label ids of the decodable images
    keys: list[str] = field(default_factory=list)  # every row, decodable or not
    shards: list[str] = field(default_factory=list)  # the shard URI of every row
    errors: list[str] = field(default_factory=list)  # every row: "" or why it failed

    @property
    def ok(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def featurize_shards(uri: str, size: int) -> Featurized:
    """Read the Parquet shards under ``uri`` one at a time on this process (no cluster needed;
    only features stay in memory, never the encoded images)."""
    files = list_shards(uri)
    if not files:
        raise UsageError(f"{uri}: no Parquet image shards (is it a jobs.ingest split?)")
    rows, labels = [], []
    out = Featurized(np.zeros((0, 0)), np.zeros(0, dtype=np.int64))
    for shard in files:
        table = read_shard(shard, ["key", "image", "label"])
        for key, data, label in zip(*(table[c].to_pylist() for c in ("key", "image", "label"))):
            try:
                rows.append(hog_features(data, size))
                labels.append(label)
                out.errors.append("")
            except DecodeError as e:
                out.errors.append(str(e))
            out.keys.append(key)
            out.shards.append(shard)
    width = len(rows[0]) if rows else 0
    out.x = np.asarray(rows, dtype=np.float32).reshape(len(rows), width)
    out.labels = np.asarray(labels, dtype=np.int64)
    return out


def hog_features(image_bytes: bytes, size: int) -> np.ndarray:
    """HOG of the grey, center-cropped ``size`` x ``size`` image: 8 x 8 cells, 9 orientations."""
    from skimage.feature import hog

    image = decode_image(image_bytes, min_size=size, max_one_colour=None).convert("L")
    pixels = np.asarray(ImageOps.fit(image, (size, size)), dtype=np.float32) / 255.0
    cell = max(1, size // 8)
    return hog(pixels, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))


@dataclass
class HogSvm:
    classes: list[str]
    size: int
    mean: np.ndarray  # feature standardisation
    scale: np.ndarray
    coef: np.ndarray  # (classes, features); a binary SVM is stored as two opposite rows
    intercept: np.ndarray
    temperature: float  # softmax(decision / temperature) gives calibrated probabilities
    c: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.decision(x) / self.temperature)

    def save(self, output: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept)
        blob = buffer.getvalue()
        storage.write_bytes(storage.join(output, MODEL_FILE), blob)
        meta = {
            "format": NAME,
            "files": {NAME: MODEL_FILE},
            "arch": NAME,
            "num_classes": len(self.classes),
            "classes": self.classes,
            "hog": {"size": self.size, "orientations": 9, "cells": 8, "cells_per_block": 2},
            "temperature": self.temperature,
            "svm_c": self.c,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        storage.write_json(storage.join(output, "meta.json"), meta)  # last: marks completion
        return meta

    @classmethod
    def load(cls, uri: str) -> HogSvm:
        meta = storage.read_json(storage.join(uri, "meta.json"))
        if meta.get("format") != NAME:
            raise UsageError(f"--model {uri}: not a {NAME} baseline")
        blob = storage.read_bytes(storage.join(uri, meta["files"][NAME]))
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ModelLoadError(f"{uri}: model file does not match the sha256 in meta.json")
        arrays = np.load(io.BytesIO(blob), allow_pickle=False)
        return cls(
            classes=list(meta["classes"]),
            size=int(meta["hog"]["size"]),
            mean=arrays["mean"],
            scale=arrays["scale"],
            coef=arrays["coef"],
            intercept=arrays["intercept"],
            temperature=float(meta["temperature"]),
            c=float(meta["svm_c"]),
        )


def is_baseline(uri: str) -> bool:
    meta_uri = storage.join(uri, "meta.json")
    return storage.exists(meta_uri) and storage.read_json(meta_uri).get("format") == NAME


def fit(
    x: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    size: int,
    progress: Callable[[str], None] = lambda message: None,
) -> HogSvm:
    """Standardise, pick C by cross-validated accuracy, then fit the softmax temperature on the
    same out-of-fold decision values, so the probabilities (for AUC and ECE) are honest."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import LinearSVC

    labels = np.asarray(labels)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    folds = StratifiedKFold(max(2, min(CV_FOLDS, smallest)), shuffle=True, random_state=0)
    best = None
    for c in C_GRID:
        svm = LinearSVC(C=c, dual=True, max_iter=5000, random_state=0)
        scores = _two_columns(
            cross_val_predict(svm, z, labels, cv=folds, method="decision_function")
        )
        accuracy = float((scores.argmax(axis=1) == _encoded(labels)).mean())
        progress(f"[hog_svm] C={c:g}: cross-validated accuracy {accuracy:.3f}")
        if best is None or accuracy > best[1]:
            best = (c, accuracy, scores)
    c, _, scores = best
    svm = LinearSVC(C=c, dual=True, max_iter=5000, random_state=0).fit(z, labels)
    coef, intercept = svm.coef_, svm.intercept_
    if coef.shape[0] == 1:  # binary: one margin d becomes logits (-d/2, d/2)
        coef, intercept = np.vstack([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
    full_coef = np.zeros((len(classes), x.shape[1]))
    full_intercept = np.full(len(classes), -1e3)  # classes absent from training: never chosen
    full_coef[svm.classes_], full_intercept[svm.classes_] = coef, intercept
    return HogSvm(
        classes=list(classes),
        size=size,
        mean=mean,
        scale=scale,
        coef=full_coef,
        intercept=full_intercept,
        temperature=_fit_temperature(scores, _encoded(labels)),
        c=c,
    )


def train_baseline(
    data: str,
    output: str,
    *,
    size: int = 64,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Fit on ``data``/train, score ``data``/val when there is one, save to ``output``.

    ``data`` is a jobs.ingest output (DST). Returns the saved ``meta.json``, whose ``metrics``
    hold the val report's metrics.
    """
    from clf.dataset.shards import read_classes

    classes = read_classes(data)
    model = fit_on_shards(storage.join(data, "train"), classes, size, progress)
    scores: dict[str, Any] = {}
    val = storage.join(data, "val")
    if storage.is_dir(val):
        rows = featurize_shards(val, size)
        scores = metrics.compute(rows.labels, model.predict_proba(rows.x), classes).metrics
        progress(f"[hog_svm] val top-1 {scores['top1']:.3f}, macro F1 {scores['f1_macro']:.3f}")
    return model.save(output, {"source_data": storage.normalize(data), "metrics": scores})


def fit_on_shards(
    train: str,
    classes: list[str],
    size: int = 64,
    progress: Callable[[str], None] = lambda message: None,
) -> HogSvm:
    started = time.monotonic()
    rows = featurize_shards(train, size)
    progress(
        f"[hog_svm] {len(rows.labels)} training images -> {rows.x.shape[1]} HOG features each "
        f"({time.monotonic() - started:.1f}s; {int((~rows.ok).sum())} undecodable)"
    )
    if len(set(rows.labels.tolist())) < 2:
        raise UsageError(f"--train {train}: needs images of at least two classes")
    return fit(rows.x, rows.labels, classes, size, progress)


def _two_columns(scores: np.ndarray) -> np.ndarray:
    return np.stack([-scores / 2, scores / 2], axis=1) if scores.ndim == 1 else scores


def _encoded(labels: np.ndarray) -> np.ndarray:
    """Labels as column indices of sklearn's decision matrix (its sorted classes)."""
    return np.searchsorted(np.unique(labels), labels)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        probs = _softmax(scores / np.exp(log_t))
        return -float(np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-6, 4), method="bounded").x))
