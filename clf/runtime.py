"""Joining or starting Ray, and choosing the device.

``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` or a running ``ray start --head``,
and starts an embedded one otherwise. Object-storage settings in the driver's environment
travel to every worker through ``runtime_env``, so workers see the same endpoint.
"""

from __future__ import annotations

import logging
import os

from clf.errors import UsageError

FORWARDED_ENV_PREFIXES = ("AWS_", "MALLOC_")

# glibc hands large freed blocks (activations, decoded images) back to the OS after every
# batch, and on small machines the page faults cost more than the arithmetic: MobileNetV2
# training and labelling run much faster with these (benchmarks/RESULTS.md). One arena, no mmap for big
# blocks and a high trim threshold keep that memory in the process. Set any MALLOC_* variable
# to take over.
WORKER_ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def forwarded_env() -> dict[str, str]:
    """Environment for every Ray worker: object-storage settings and the allocator tuning."""
    own = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    allocator = {} if any(k.startswith("MALLOC_") for k in own) else WORKER_ALLOCATOR_ENV
    return {**allocator, **own}


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    import ray

    if ray.is_initialized():
        return
    common = {
        "runtime_env": {"env_vars": forwarded_env()},
        "logging_level": logging.WARNING if quiet else logging.INFO,
        # Workers too: Ray Train and Ray Data log every report and plan at INFO.
        "logging_config": ray.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
    }
    try:  # RAY_ADDRESS, or a `ray start --head` on this machine
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), **common)
    except ConnectionError:
        # None running: an embedded Ray. It serves this machine only, so it listens on loopback.
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **common)
    if quiet:
        from ray.data import DataContext

        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
        DataContext.get_current().enable_progress_bars = False


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def use_gpu(device: str) -> bool:
    """``auto``: GPUs when the cluster has them; ``cuda`` insists; ``cpu`` never."""
    if device == "cpu":
        return False
    gpus = cluster_gpus()
    if device == "cuda" and gpus == 0:
        raise UsageError("--device cuda: the Ray cluster has no GPUs")
    return gpus > 0


def torch_device(prefer_gpu: bool = True):
    """The device for this process: CUDA when asked for and present, else CPU (clean fallback)."""
    import torch

    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")
