"""What ``GET /metrics`` shows, in Prometheus text: requests by route and status, latency,
batch sizes and images that did not decode. Each replica counts its own, under a ``replica``
label, and the replica that answers the scrape shows its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Telemetry:
    """One replica's counters, in a registry of its own (not the process's global one)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "clf_serve_requests",
            "HTTP requests answered, by route and status code",
            ["replica", "route", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "clf_serve_request_seconds",
            "Time from the request reaching the replica to its answer",
            ["replica", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "clf_serve_batch_size",
            "Images per model call",
            ["replica"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels(replica=replica)
        self._decode_errors = Counter(
            "clf_serve_decode_errors",
            "Images refused by the decoder, by status code (400 unusable, 413 too many pixels)",
            ["replica", "status"],
            registry=self.registry,
        )

    def answered(self, route: str, status: int, seconds: float) -> None:
        self._requests.labels(replica=self.replica, route=route, status=str(status)).inc()
        self._latency.labels(replica=self.replica, route=route).observe(seconds)

    def decode_error(self, status: int) -> None:
        self._decode_errors.labels(replica=self.replica, status=str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
