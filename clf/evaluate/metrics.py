"""Classification metrics from true labels and predicted probabilities.

Pure: no Ray, no model. ``compute`` takes label ids (N), probabilities (N x C) and the C class
names, and returns the ``Report`` that ``report.write`` puts into files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from clf.errors import ClfError

ECE_BINS = 15


@dataclass
class Report:
    classes: list[str]
    metrics: dict[str, Any]  # the scalar metrics, as in report.json
    per_class: list[dict[str, Any]]  # one row per class, as in per_class.csv
    confusion: np.ndarray  # counts: rows are true classes, columns predicted ones
    most_confused: list[dict[str, Any]]
    reliability: list[dict[str, Any]]  # the ECE bins


def compute(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    top_k: int = 5,
    pairs: int = 20,
    bins: int = ECE_BINS,
) -> Report:
    """Every metric of the report. ``labels`` index ``classes``; rows of ``probs`` sum to 1."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    if n == 0:
        raise ClfError("no decodable images to evaluate")
    if c != len(classes) or labels.shape != (n,):
        raise ValueError(
            f"shapes disagree: labels {labels.shape}, probs {probs.shape}, {c} classes"
        )
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    confidence = probs[np.arange(n), predicted]
    auc = _per_class_auc(labels, probs)
    ece, reliability = calibration(confidence, correct, bins)
    counts = confusion_matrix(labels, predicted, labels=np.arange(c))
    metrics = {
        "images": int(n),
        "num_classes": int(c),
        "top1": float(correct.mean()),
        "top_k": int(top_k),
        # k >= C would be a perfect, meaningless score: null instead.
        "top_k_accuracy": _top_k_score(labels, probs, top_k) if top_k < c else None,
        **_averaged(labels, predicted),
        **_auc_summary(auc, classes),
        "ece": ece,
        "ece_bins": bins,
        "mean_confidence": float(confidence.mean()),
    }
    per_class = _per_class(labels, probs, predicted, classes, auc, min(top_k, c))
    return Report(
        list(classes),
        metrics,
        per_class,
        counts,
        most_confused(counts, classes, pairs),
        reliability,
    )


def _averaged(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Macro and weighted precision, recall and F1. They average over the classes that occur in
    the labels or predictions (sklearn's default), so evaluating a 1000-class model on a
    10-class set does not count 990 zeros."""
    out = {}
    for avg in ("macro", "weighted"):
        scores = precision_recall_fscore_support(labels, predicted, average=avg, zero_division=0)
        for name, value in zip(("precision", "recall", "f1"), scores[:3]):
            out[f"{name}_{avg}"] = float(value)
    return out


def _auc_summary(auc: np.ndarray, classes: list[str]) -> dict[str, Any]:
    defined = ~np.isnan(auc)
    return {
        "auc_ovr_macro": float(auc[defined].mean()) if defined.any() else None,
        "auc_classes": int(defined.sum()),
        # One-vs-rest AUC needs positives and negatives: classes absent from the labels have none.
        "auc_undefined": [classes[i] for i in np.flatnonzero(~defined)],
    }


def _per_class(
    labels: np.ndarray,
    probs: np.ndarray,
    predicted: np.ndarray,
    classes: list[str],
    auc: np.ndarray,
    k: int,
) -> list[dict[str, Any]]:
    ids = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=ids, zero_division=0
    )
    correct = predicted == labels
    in_top_k = _in_top_k(labels, probs, k)
    return [
        {
            "class_id": int(i),
            "class": classes[i],
            "support": int(support[i]),
            "predicted": int((predicted == i).sum()),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            # Share of the class's images classified correctly (equal to recall here).
            "accuracy": float(correct[labels == i].mean()) if support[i] else None,
            f"top{k}_accuracy": float(in_top_k[labels == i].mean()) if support[i] else None,
            "auc": None if np.isnan(auc[i]) else float(auc[i]),
        }
        for i in ids
    ]


def _top_k_score(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    c = probs.shape[1]
    # sklearn reads a 2-column score matrix with binary labels as ambiguous: give it P(class 1).
    scores = probs[:, 1] if c == 2 else probs
    return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(c)))


def _in_top_k(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def _per_class_auc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per class, NaN where a class has no positives or no negatives.

    Their mean over the defined classes is sklearn's ``multi_class="ovr", average="macro"``,
    which itself refuses to run when any class is absent from the labels.
    """
    auc = np.full(probs.shape[1], np.nan)
    for i in range(probs.shape[1]):
        positive = labels == i
        if positive.any() and not positive.all():
            auc[i] = roc_auc_score(positive, probs[:, i])
    return auc


def calibration(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves.

    Written out because scikit-learn has no multi-class ECE (calibration_curve is binary only).
    Bins are right-closed, (lower, upper], as in Guo et al. 2017.
    """
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    n = len(confidence)
    ece, rows = 0.0, []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / n * abs(accuracy - mean_confidence)
        rows.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return float(ece), rows


def most_confused(counts: np.ndarray, classes: list[str], n: int) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal cells: which true class goes to which wrong one, how often."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    flat = np.flatnonzero(off)
    # Largest count first; ties in class order, so the list is stable from run to run.
    order = flat[np.lexsort((flat, -off.ravel()[flat]))][:n]
    support = counts.sum(axis=1)
    pairs = []
    for cell in order:
        t, p = divmod(int(cell), counts.shape[1])
        pairs.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "count": int(off[t, p]),
                "share_of_true": float(off[t, p] / support[t]),
            }
        )
    return pairs
