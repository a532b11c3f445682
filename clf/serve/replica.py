"""One Serve replica: one loaded artifact, whose model calls batch the requests that arrive
together (``@serve.batch``), behind the routes of ``clf.serve.routes``.

The replica answers ``/healthz`` at once and loads the model in a thread, so that an
orchestrator can tell a live replica that is still loading (``/readyz`` 503) from a dead one.
Images decode with the label job's code (``images.preprocess.eval_pixels``), so that
an image gets the same answer here as from jobs.label and jobs.predict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from ray import serve

from clf.artifact.classifier import Classifier, load_classifier, top_k
from clf.artifact.meta import check_format_in, file_sha256, model_id, read_meta
from clf.config import ServeConfig
from clf.images.decode import DecodeError, ImageTooLargeError
from clf.images.preprocess import Preprocess, eval_pixels
from clf.serve.routes import http_app
from clf.serve.telemetry import Telemetry
from clf.serve.uploads import RequestError


@serve.deployment
@serve.ingress()
class ClassifierReplica:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.gpu = cfg.gpus_per_replica > 0
        self.meta = read_meta(cfg.model)
        self.format = check_format_in(self.meta, cfg.model, cfg.format)
        self.spec = Preprocess.from_meta(self.meta)
        self.classes: list[str] = list(self.meta["classes"])
        self.model_id = model_id(self.meta, self.format)
        self.telemetry = Telemetry(serve.get_replica_context().replica_id.unique_id)
        self.model: Classifier | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.pending = 0  # predict requests admitted and not yet answered
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        threading.Thread(target=self.load_and_warm_up, name="load-model", daemon=True).start()

    def __serve_build_asgi_app__(self):
        return http_app(self)

    def load_and_warm_up(self) -> None:
        """Load the artifact and run one full batch, so the first request pays for neither."""
        try:
            model = load_classifier(
                self.cfg.model,
                prefer_gpu=self.gpu,
                threads=model_threads(self.cfg),
                format=self.format,
            )
            crop = self.spec.crop
            model.predict_proba(np.zeros((self.cfg.max_batch_size, 3, crop, crop), np.uint8))
            self.model = model
        except Exception as e:  # reported by /readyz and every request; the job exits on it
            self.load_error = f"the model did not load: {e}"
        finally:
            self.loaded.set()

    def not_ready_reason(self) -> str:
        return self.load_error or "loading the model and warming it up"

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "format": self.format,
            "arch": self.meta.get("arch"),
            "classes": self.classes,
            "input_size": self.spec.input_size,
            "preprocess": self.spec.to_meta(),
            "sha256": file_sha256(self.meta, self.format),
            "metrics": self.meta.get("metrics", {}),
            "max_batch_size": self.cfg.max_batch_size,
        }

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A place in the replica's queue for one request, or 503 when the queue is full."""
        if self.pending >= self.cfg.max_queued_requests:
            raise RequestError(503, "the server's queue is full; retry shortly")
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def top_k_of(self, text: str | None) -> int:
        """``?k=``, checked; the configured top-k without it."""
        if text is None:
            return min(self.cfg.top_k, len(self.classes))
        if not text.isdigit() or not 1 <= int(text) <= len(self.classes):
            raise RequestError(400, f"k must be a whole number in [1, {len(self.classes)}]")
        return int(text)

    async def classify(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """Top ``k`` of one image's bytes; ``RequestError`` if it does not decode."""
        if not self.loaded.is_set():
            await asyncio.to_thread(self.loaded.wait)
        if self.model is None:
            raise RequestError(503, self.load_error)
        try:
            if self.gpu:  # the node's cores are free for decoding while the GPU infers
                pixels = await asyncio.to_thread(eval_pixels, data, self.spec, self.cfg.max_pixels)
            else:  # on a CPU replica, handing each image to a thread costs more than it frees
                pixels = eval_pixels(data, self.spec, self.cfg.max_pixels)
        except DecodeError as e:
            status = 413 if isinstance(e, ImageTooLargeError) else 400
            self.telemetry.decode_error(status)
            raise RequestError(status, str(e)) from None
        probs = await self.predict_batch(pixels)
        scores, indices = top_k(probs[np.newaxis], k)
        return [
            {"label": self.classes[i], "index": int(i), "score": float(s)}
            for s, i in zip(scores[0], indices[0])
        ]

    @serve.batch  # its sizes are set per deployment, in __init__
    async def predict_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        self.telemetry.batch_size.observe(len(pixels))
        # In a thread, so the replica goes on receiving and decoding the next batch meanwhile.
        probs = await asyncio.to_thread(self.model.predict_proba, np.stack(pixels))
        return list(probs)


def model_threads(cfg: ServeConfig) -> int:
    """A replica's model threads: one beside a GPU, or when Serve may start many replicas
    (auto); else its share of the node's cores."""
    if cfg.gpus_per_replica > 0 or not isinstance(cfg.replicas, int):
        return 1
    return max(1, (os.cpu_count() or 1) // cfg.replicas)
