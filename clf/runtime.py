"""Joining or starting Ray, and choosing the device.

``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` or a running ``ray start --head``,
and starts an embedded one otherwise. Object-storage settings in the driver's environment
travel to every worker through ``runtime_env``, so workers see the same endpoint.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import platform
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clf.errors import UsageError

# Object-storage settings, allocator tuning, and where model files from buckets are kept.
FORWARDED_ENV_PREFIXES = ("AWS_", "MALLOC_", "CLF_CACHE_DIR")

# glibc hands large freed blocks (activations, decoded images) back to the OS after every
# batch, and on small machines the page faults cost more than the arithmetic (measured in
# benchmarks/RESULTS.md). One arena, no mmap for big blocks and a high trim threshold keep that
# memory in the process. Set any MALLOC_* variable to take over.
WORKER_ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


# Ray keeps one idle worker process per CPU and stops the others after a second idle. Tasks that
# ask for no CPU, such as the label job's writes, run beside those, so each of them started a
# fresh Python process, whose start-up took CPU from decoding (benchmarks/RESULTS.md). An
# embedded Ray keeps this many more; `ray start` reads RAY_num_workers_soft_limit
# (cluster/local-head.sh sets it).
SPARE_WORKERS = 4

# An embedded Ray without what would only cost (benchmarks/RESULTS.md). The raylet prestarts a
# worker process per CPU for the first driver, but without its runtime_env, which every job here
# sets, so no task or actor could use them; Ray Train watches its nodes for cloud preemption
# notices from an extra actor, and a machine on its own has no other node to move to. Each was
# a process start taken from the job's CPUs. Ray Train's controller learns that its workers
# finished only when it polls them; polling a machine's few workers often costs next to nothing,
# and the end of a run no longer waits for several polls.
EMBEDDED_RAY_ENV = {
    "RAY_prestart_worker_first_driver": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}

# Ray's plasma allocator walks through the whole object store over a long run, and every page it
# touches stays in shared memory: at Ray's default size (30% of RAM) a long label run's memory
# kept growing, while a small store levelled off, spilled nothing and ran as fast
# (benchmarks/label_memory.py, RESULTS.md). Jobs that stream (label, evaluate) hold a few blocks
# in flight, so an embedded Ray for them gets this much, and more per CPU on a bigger node, whose
# many decode tasks hold more blocks at once; Ray Data lets a job use half the store.
STREAMING_OBJECT_STORE_MIN_BYTES = 512 * 2**20
STREAMING_OBJECT_STORE_BYTES_PER_CPU = 64 * 2**20
# Ray's own settings for the default size; a user who set one has sized the store.
OBJECT_STORE_ENV = (
    "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION",
    "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES",
)

_embedded_gcs: str | None = None  # the address of the Ray that init_ray started here, if any

# mallopt(3) parameters: the same settings for a process that is already running.
_MALLOPT_PARAMS = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1}


def tune_allocator() -> bool:
    """Give this process the workers' allocator settings, on glibc, unless the user set
    ``MALLOC_*`` (which glibc read at start-up). A job's own process runs models too: export
    parity checks, prediction, the export that ends training (RESULTS.md measures the gain)."""
    if any(k.startswith("MALLOC_") for k in os.environ) or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return all(
        libc.mallopt(param, int(WORKER_ALLOCATOR_ENV[name])) == 1
        for name, param in _MALLOPT_PARAMS.items()
    )


# Ray Train 2.60 sets an option that Ray Data 2.60 deprecates, in its own processes before any
# of ours runs; users cannot act on the warning.
IGNORED_WARNINGS = "ignore:`ExecutionOptions.exclude_resources` is deprecated"


def forwarded_env() -> dict[str, str]:
    """Environment for every Ray worker: object-storage settings, the allocator tuning, the
    machine cache's folder, and a warnings filter unless the user set PYTHONWARNINGS (perhaps in
    the job's runtime_env, whose keys Ray refuses to see repeated here)."""
    own = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    allocator = {} if any(k.startswith("MALLOC_") for k in own) else WORKER_ALLOCATOR_ENV
    warnings = {} if "PYTHONWARNINGS" in os.environ else {"PYTHONWARNINGS": IGNORED_WARNINGS}
    return {**allocator, **own, **warnings}


def init_ray(num_cpus: int | None = None, quiet: bool = True, streaming: bool = False) -> None:
    """Join the running Ray cluster, else start an embedded one for this machine, without the
    dashboard: no job serves it, and it cost a second of start-up and a dozen processes.

    ``streaming``: the job streams, so an embedded Ray gets ``streaming_object_store_bytes`` of
    object store. A cluster's store is the cluster's to size.
    """
    global _embedded_gcs
    import ray

    if ray.is_initialized():
        return
    common = {
        "runtime_env": {"env_vars": forwarded_env()},
        "logging_level": logging.WARNING if quiet else logging.INFO,
        # Workers too: Ray Train and Ray Data log every report and plan at INFO.
        "logging_config": ray.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
    }
    try:
        address = _cluster_address()
        if address is None:
            raise ConnectionError("no Ray cluster to join")
        ray.init(address=address, **common)
    except ConnectionError:
        # None running: an embedded Ray for this machine only, which no other node joins. Ray
        # advertises the machine's address even when told 127.0.0.1, and its ports bind every
        # interface; token auth guards them.
        # Private: no public API counts CPUs as Ray will (cgroup quotas included).
        cpus = num_cpus or int(ray._private.utils.get_num_cpus())
        os.environ.setdefault("RAY_num_workers_soft_limit", str(cpus + SPARE_WORKERS))
        for name, value in EMBEDDED_RAY_ENV.items():
            os.environ.setdefault(name, value)
        sized_by_user = any(name in os.environ for name in OBJECT_STORE_ENV)
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=streaming_object_store_bytes(cpus)
            if streaming and not sized_by_user
            else None,
            include_dashboard=False,
            **common,
        )
        _embedded_gcs = ray.get_runtime_context().gcs_address
    if quiet:
        quiet_ray_logs()


def init_ray_importing(*modules: str, **init_args: Any) -> None:
    """``init_ray``, with ``modules`` imported in a thread meanwhile: Ray's start mostly waits on
    the processes it spawns, and a core would sit idle (benchmarks/RESULTS.md)."""
    with ThreadPoolExecutor(1, thread_name_prefix="imports") as pool:
        imported = [pool.submit(importlib.import_module, name) for name in modules]
        init_ray(**init_args)
    for module in imported:
        module.result()  # an import that failed raises here, as it would have unthreaded


def ray_is_embedded() -> bool:
    """Whether this process started the Ray it is connected to, which ends when it does."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_gcs


def shut_down_ray_in_background() -> threading.Thread:
    """Ray's shutdown, which mostly waits for its processes to end, in a thread that the caller's
    remaining work overlaps; the process's exit waits for it."""
    import ray

    thread = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    thread.start()
    return thread


def streaming_object_store_bytes(cpus: int) -> int:
    """The store for a streaming job on ``cpus`` CPUs, never more than Ray's own default for
    this machine (a container may show more CPUs than its memory could serve)."""
    # Private: no public API gives Ray's default object store size for this machine.
    from ray._private.utils import estimate_available_memory, resolve_object_store_memory

    wanted = max(STREAMING_OBJECT_STORE_MIN_BYTES, cpus * STREAMING_OBJECT_STORE_BYTES_PER_CPU)
    return min(wanted, resolve_object_store_memory(estimate_available_memory()))


# Lines Ray logs in every run that tell a user of these jobs nothing, or mislead them.
RAY_NOISE = {
    # The predictor pool holds its CPUs on purpose; Ray Data cannot tell, and says it may hang.
    "ray.data.dataset": "does not have any available CPUs",
    # The jobs turn the bars off themselves, and print progress lines of their own.
    "ray.data._internal.progress": "Progress bars disabled",
}


class DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_ray_logs() -> None:
    """Ray Data and Ray Train at WARNING, without progress bars or the lines in ``RAY_NOISE``:
    on the driver, and in each training worker, whose Ray Data logs at INFO otherwise."""
    from ray.data import DataContext

    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, text in RAY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(DropMessage(text))
    context = DataContext.get_current()
    context.enable_progress_bars = False
    # Its "uses 650 MiB of memory per worker; consider setting memory=..." names an argument of
    # our code, not of the job's; labelling memory is bounded in benchmarks/label_memory.py.
    context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1


def joins_a_cluster() -> bool:
    """Whether ``init_ray`` would join a Ray cluster (or one is joined) rather than start one;
    answered without importing Ray, which a job that needs no Ray would pay 0.4 s for."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return True
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return address != "local"
    return os.path.exists(ray_start_address_file())


def ray_start_address_file() -> str:
    """Where `ray start` leaves its address: ``ray._common.utils.get_ray_address_file(None)``,
    written out here because importing that module imports all of Ray."""
    if "RAY_TMPDIR" in os.environ:
        temp = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        temp = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        temp = "/tmp"
    else:
        temp = tempfile.gettempdir()
    return os.path.join(temp, "ray", "ray_current_cluster")


def _cluster_address() -> str | None:
    """``RAY_ADDRESS``, else the cluster of the last ``ray start`` on this machine, else None.

    Not Ray's ``address="auto"``: that also joins any Ray it finds running here, such as
    another process's embedded one, which ends when that process does.
    """
    # Private: no public API finds the `ray start` of this machine without joining others.
    from ray._private.services import find_bootstrap_address

    address = os.environ.get("RAY_ADDRESS")
    if address == "local":  # Ray's word for "start a new one": the embedded one below
        return None
    return address or find_bootstrap_address(None)


def gpu_nodes() -> list[tuple[float, int]]:
    """(GPUs per node, nodes) of the GPU nodes that are up; where none is, those that the
    cluster's autoscaler may start (a GPU group scaled to zero), at most one of an unbounded
    group. Without this, a job on a cluster that starts GPU nodes on demand would run on CPU."""
    import ray

    # Private: no public API lists the node groups an autoscaler may start.
    from ray._private.state import state

    up = [node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")]
    if any(up):
        return [(gpus, 1) for gpus in up if gpus]
    # The node groups the autoscaler publishes; Ray Train V2 sizes its worker groups by them.
    config = state.get_cluster_config()
    groups = config.node_group_configs if config is not None else []
    return [
        (g.resources["GPU"], 1 if g.max_count < 0 else g.max_count)
        for g in groups
        if g.resources.get("GPU", 0) > 0 and g.max_count != 0
    ]


def cluster_gpus() -> float:
    return float(sum(gpus * count for gpus, count in gpu_nodes()))


def gpu_actor_slots(gpus_per_actor: float) -> int:
    """How many actors of ``gpus_per_actor`` GPUs each fit the GPU nodes: a share of a GPU
    never spans two nodes, so each node counts on its own (0.5 on two 1-GPU nodes: 4)."""
    return sum(int(gpus / gpus_per_actor + 1e-6) * count for gpus, count in gpu_nodes())


def use_gpu(device: str) -> bool:
    """``auto``: GPUs when the cluster has or can start them; ``cuda`` insists; ``cpu`` never."""
    if device == "cpu":
        return False
    gpus = cluster_gpus()
    if device == "cuda" and gpus == 0:
        raise UsageError("--device cuda: the Ray cluster has no GPUs")
    return gpus > 0


def gpu_has_cuda(gpus_per_actor: float) -> bool:
    """Whether a task given a predictor's share of a GPU finds a CUDA driver there. A node can
    declare GPUs it lacks (a test cluster, a mislabelled node); its actor then infers on CPU,
    and JPEGs must keep decoding in CPU tasks. Loads libcuda only: importing torch takes
    seconds."""
    import ray

    @ray.remote(num_gpus=min(gpus_per_actor, 1.0), num_cpus=0)
    def probe() -> bool:
        import ctypes

        try:
            driver = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return False
        count = ctypes.c_int(0)  # a driver library without a device (some containers) is no GPU
        return (
            driver.cuInit(0) == 0
            and driver.cuDeviceGetCount(ctypes.byref(count)) == 0
            and count.value > 0
        )

    return ray.get(probe.remote())


def torch_device(prefer_gpu: bool = True):
    """The device for this process: CUDA when asked for and present, else CPU (clean fallback)."""
    import torch

    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


def cpu_threads(threads: int) -> int:
    """``threads``, but at least one and never more than the node has."""
    return max(1, min(threads, os.cpu_count() or 1))


def use_cpu_threads(threads: int) -> None:
    """Run this process's torch models on ``cpu_threads(threads)`` threads; an artifact's ONNX
    sessions made after this follow torch's count."""
    import torch

    torch.set_num_threads(cpu_threads(threads))
