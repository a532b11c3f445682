"""What ``GET /metrics`` shows, in Prometheus text: requests by route and status, latency,
batch sizes and images that did not decode. Each replica counts its own requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Telemetry:
    """One replica's counters, in a registry of its own (not the process's global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clf_serve_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "clf_serve_request_seconds",
            "Time from the request reaching the replica to its answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "clf_serve_batch_size",
            "Images per model call",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.decode_errors = Counter(
            "clf_serve_decode_errors",
            "Images refused by the decoder, by status code (400 unusable, 413 too many pixels)",
            ["status"],
            registry=self.registry,
        )

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
