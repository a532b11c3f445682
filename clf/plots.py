"""Figures as PNG bytes (matplotlib's Agg canvas, no pyplot state), ready for ``storage.write_bytes``.

Every figure has a fixed pixel size, so reports look alike from run to run and tests can check
them; ``bbox_inches="tight"`` would change the size with the labels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

DPI = 100
# Beyond this many classes the tick labels overlap whatever the size, so the heatmap drops them.
MAX_LABELLED_CLASSES = 60
MAX_ANNOTATED_CLASSES = 12  # cells carry their share and count up to this many classes
MAX_SHARE_BARS = 30  # a drift figure shows the classes whose share moved most, up to this many


def confusion_pixels(num_classes: int) -> int:
    """Side of the square confusion heatmap: roomy for a few classes, capped for many."""
    return int(min(1600, max(640, 200 + 24 * num_classes)))


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def confusion_heatmap(counts: np.ndarray, classes: Sequence[str]) -> bytes:
    """Row-normalised confusion matrix: each row shows where one true class's images went."""
    n = len(classes)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    side = confusion_pixels(n) / DPI
    fig = Figure(figsize=(side, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= MAX_LABELLED_CLASSES:
        size = 10 if n <= 20 else 7
        ax.set_xticks(
            range(n), [_short(c) for c in classes], rotation=0 if n <= 6 else 90, fontsize=size
        )
        ax.set_yticks(range(n), [_short(c) for c in classes], fontsize=size)
        ax.set(xlabel="predicted", ylabel="true")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set(
            xlabel=f"predicted class (0 to {n - 1}, in the order of the classes list)",
            ylabel="true class",
        )
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                colour = "white" if shares[i, j] > 0.5 else "black"
                text = f"{shares[i, j]:.0%}\n({counts[i, j]})"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
    ax.set_title(f"confusion matrix, row-normalised ({n} classes, {int(counts.sum())} images)")
    return to_png(fig)


def reliability_diagram(bins: Sequence[dict], ece: float) -> bytes:
    """Accuracy against confidence per bin; bars under the diagonal are overconfident."""
    fig = Figure(figsize=(6.4, 6.4), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = bins[0]["upper"] - bins[0]["lower"]
    lowers = np.array([b["lower"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    filled = counts > 0
    top.bar(lowers, accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    top.hlines(
        confidence[filled],
        lowers[filled],
        lowers[filled] + width,
        colors="tab:red",
        linewidth=3,
        label="mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE {ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(lowers, counts, width=width, align="edge", color="grey")
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="images")
    return to_png(fig)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4) -> bytes:
    """HWC uint8 images with a caption above each, ``columns`` to a row."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(2.4 * columns, 2.7 * rows), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
    return to_png(fig)


def drift_figure(
    shares: dict[str, dict[str, float]], reference: np.ndarray, run: np.ndarray, title: str
) -> bytes:
    """Class shares of the reference and the run side by side (the classes that moved most, when
    there are many), and their confidence histograms overlaid."""
    fig = Figure(figsize=(12.8, 5.2), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    moved = sorted(shares, key=lambda c: -abs(shares[c]["run"] - shares[c]["reference"]))
    names = [c for c in shares if c in set(moved[:MAX_SHARE_BARS])]
    x = np.arange(len(names))
    left.bar(x - 0.2, [shares[c]["reference"] for c in names], 0.4, label="reference")
    left.bar(x + 0.2, [shares[c]["run"] for c in names], 0.4, label="run")
    left.set_xticks(x, [_short(c) for c in names], rotation=90 if len(names) > 8 else 0)
    shown = "" if len(names) == len(shares) else f" ({len(names)} of {len(shares)} that moved most)"
    left.set(ylabel="share of labelled rows", title=f"predicted classes{shown}")
    left.legend()
    bins = np.linspace(0, 1, 21)
    right.hist(reference, bins, density=True, alpha=0.5, label=f"reference ({len(reference)})")
    right.hist(run, bins, density=True, alpha=0.5, label=f"run ({len(run)})")
    right.set(xlabel="confidence (top-1 probability)", ylabel="density", title="confidence")
    right.legend(loc="upper left")
    fig.suptitle(title)
    return to_png(fig)


def filter_grid(weight: np.ndarray) -> bytes:
    """First-layer kernels (out, in, kh, kw): RGB when the layer sees RGB, else channel mean."""
    count = weight.shape[0]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(6.4, 6.4 * rows / columns + 0.4), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, kernel in zip(axes, weight):
        # Each kernel is stretched to its own full range: shapes matter here, not magnitudes.
        kernel = kernel - kernel.min()
        kernel = kernel / (kernel.max() or 1.0)
        if kernel.shape[0] == 3:
            ax.imshow(kernel.transpose(1, 2, 0), interpolation="nearest")
        else:
            ax.imshow(kernel.mean(axis=0), cmap="gray", interpolation="nearest")
    fig.suptitle(
        f"first-layer filters ({count} x {weight.shape[1]} x {weight.shape[2]}x{weight.shape[3]})"
    )
    return to_png(fig)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
