"""``metrics.jsonl`` (one line per epoch) and ``curves.png``."""

from __future__ import annotations

import json
from typing import Any

from ray.train import UserCallback

from clf import storage


def read(run: str) -> list[dict[str, Any]]:
    uri = storage.join(run, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [
        json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()
    ]


def append(run: str, row: dict[str, Any]) -> None:
    """Add ``row`` unless the file already holds it: same epoch, same resume point."""
    # Object stores cannot append, and the file is a few kB, so it is rewritten whole.
    rows = read(run)
    if any(r["epoch"] == row["epoch"] and r["start_epoch"] == row["start_epoch"] for r in rows):
        return
    storage.write_bytes(
        storage.join(run, "metrics.jsonl"),
        "".join(json.dumps(r) + "\n" for r in rows + [row]).encode(),
    )


class CommittedEpochLog(UserCallback):
    """Writes an epoch's line on the Ray Train controller once its checkpoint is committed.

    Written from a worker, a line could describe an epoch whose checkpoint a kill then lost,
    and a re-run would repeat that epoch while the file said it was done.
    """

    def __init__(self, run: str):
        self.run = run

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is not None:
            append(self.run, metrics[0])


def plot_curves(run: str) -> str | None:
    rows = read(run)
    if not rows:
        return None
    from matplotlib.figure import Figure

    from clf.plots import to_png

    latest = {r["epoch"]: r for r in rows}  # a resumed epoch supersedes its earlier attempt
    epochs = sorted(latest)
    fig = Figure(figsize=(10, 4), layout="tight")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(epochs, [latest[e][key] for e in epochs], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        acc_ax.plot(epochs, [latest[e][key] for e in epochs], marker="o", label=label)
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    uri = storage.join(run, "curves.png")
    storage.write_bytes(uri, to_png(fig))
    return uri


class TensorBoard:
    """Per-epoch scalars as TensorBoard event files under ``RUN/tensorboard``.

    The writer needs a local folder, so for an ``s3://`` run the events are written to a temporary
    folder, copied up after every epoch, and removed with it on ``close`` (or when the writer is
    collected, if training fails first).
    """

    SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")

    def __init__(self, run: str):
        import tempfile

        from tensorboardX import SummaryWriter

        self.remote = storage.join(run, "tensorboard") if run.startswith("s3://") else None
        self._staging = tempfile.TemporaryDirectory(prefix="clf-tb-") if self.remote else None
        self.logdir = self._staging.name if self._staging else storage.join(run, "tensorboard")
        self.writer = SummaryWriter(self.logdir)

    def log(self, row: dict[str, Any]) -> None:
        for key in self.SCALARS:
            self.writer.add_scalar(key, row[key], global_step=row["epoch"] + 1)
        self.writer.flush()
        if self.remote:
            import os

            for name in os.listdir(self.logdir):
                with open(os.path.join(self.logdir, name), "rb") as f:
                    storage.write_bytes(storage.join(self.remote, name), f.read())

    def close(self) -> None:
        self.writer.close()
        if self._staging:
            self._staging.cleanup()
