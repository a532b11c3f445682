"""The Serve application that jobs.serve runs, and `serve run`/`serve deploy` build from
``cluster/serve.yaml``: the replica with its deployment options."""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.serve import Application

from clf import runtime
from clf.config import ServeConfig, from_dict
from clf.inference.stage import cluster_cpus
from clf.serve.checks import check_serve
from clf.serve.replica import ClassifierReplica

# Requests a replica takes beyond its queue: health probes and metrics scrapes still get in,
# and predictions past the queue get the replica's JSON 503 rather than wait at the proxy.
HEADROOM = 16
# Long enough for a full queue of batches to finish after Ctrl-C or a scale-down.
GRACEFUL_SHUTDOWN_S = 60


def application(cfg: ServeConfig) -> Application:
    """The deployment of ``cfg``; without ``cfg.replicas``, sized for the cluster Ray joined."""
    if cfg.replicas is None:
        cfg = dataclasses.replace(cfg, replicas=default_replicas(cfg.gpus_per_replica))
    most = cfg.max_queued_requests + HEADROOM
    return ClassifierReplica.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=most,
        # Requests wait at the proxy while it picks a replica, and while every replica is full;
        # beyond this many, the proxy answers Serve's own 503.
        max_queued_requests=most,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ray_actor_options={"num_cpus": 1, "num_gpus": cfg.gpus_per_replica},
    ).bind(cfg)


def default_replicas(gpus_per_replica: float) -> int:
    """One replica per GPU share; without GPUs, one per CPU, each running its model on one
    thread: a replica's Python handles each request in one process, and several of them
    serve more than one with more threads (benchmarks/RESULTS.md)."""
    if gpus_per_replica > 0:
        return max(1, runtime.gpu_actor_slots(gpus_per_replica))
    return max(1, cluster_cpus())


def build_app(args: dict[str, Any]) -> Application:
    """An application builder for `serve run clf.serve.app:build_app model=ART` and the
    ``import_path`` of cluster/serve.yaml, whose ``args`` are ServeConfig's keys."""
    cfg = from_dict(ServeConfig, dict(args))
    check_serve(cfg)
    return application(cfg)
