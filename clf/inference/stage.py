"""CPU decode tasks, then an actor pool that loads the model once: jobs.label and jobs.evaluate
run this stage, so the model never waits on image decoding in either. Sizing follows the
cluster: one actor per GPU (or per share of one), else one per four CPUs."""

from __future__ import annotations

import math
import warnings
from typing import Any

from clf import runtime
from clf.config import PoolConfig
from clf.errors import UsageError
from clf.images.preprocess import Preprocess
from clf.inference.actor import ModelActor

# The size of a decode task of listed files (``files_per_task``). Its output is one block in
# the object store, which a streaming job keeps small: blocks of thousands of photos starved
# a GPU node's predictors.
MAX_FILES_PER_TASK = 256
MAX_TASK_OUTPUT_BYTES = 16 << 20
TASKS_PER_CPU = 4
CPUS_PER_CPU_ACTOR = 4
DECODE_TASK_RETRIES = 3  # a decode task whose worker died, or whose reads kept failing


def runs_in_process(cfg: PoolConfig, images: int) -> bool:
    """A few images, no GPU asked for, and no cluster to use: nothing worth starting Ray for,
    so the job runs the stage's decode task and model actor itself."""
    return images <= cfg.small_input and cfg.device != "cuda" and not runtime.joins_a_cluster()


def pool_size(cfg: PoolConfig, gpu: bool) -> int:
    if cfg.actors:
        return cfg.actors
    if gpu:  # one actor per GPU, or per share of one; ActorPoolStrategy(size=n) starts all n
        slots = runtime.gpu_actor_slots(cfg.gpus_per_actor)
        if slots == 0:
            raise UsageError(f"--gpus-per-actor {cfg.gpus_per_actor}: no node has that many GPUs")
        return slots
    return max(1, cluster_cpus() // CPUS_PER_CPU_ACTOR)


def model_threads(actors: int, gpu: bool) -> int:
    """CPU threads for each actor's model: one beside a GPU; on CPU, the actor's share of the
    cluster's cores. The actor holds one CPU and decode tasks the rest, so its extra threads
    share cores with decoding and use what decoding leaves idle (RESULTS.md)."""
    return 1 if gpu else max(1, cluster_cpus() // actors)


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def files_per_task(count: int, cpus: int, crop: int, least: int) -> int:
    """Listed files per decode task, which reads and decodes them as one batch into one block.
    A task's reads ramp up anew, paying an object store's round trip once a task: so tasks are
    as large as ``MAX_FILES_PER_TASK`` and ``MAX_TASK_OUTPUT_BYTES`` of pixels allow, but never
    fewer than ``TASKS_PER_CPU`` per CPU, so that a small input still streams to the model and
    commits as it goes, and never under ``least``."""
    largest = min(MAX_FILES_PER_TASK, MAX_TASK_OUTPUT_BYTES // (3 * crop * crop))
    return max(least, min(largest, math.ceil(count / (TASKS_PER_CPU * cpus))))


def decode_then_infer(
    ds,
    cfg: PoolConfig,
    meta: dict[str, Any],
    actor_cls: type[ModelActor],
    actor_kwargs: dict[str, Any],
    *,
    gpu: bool,
    actors: int,
    decode_fn,
    decode_batch_size: int | None,
    decode_kwargs: dict[str, Any] | None = None,
):
    """``ds`` through ``decode_fn`` tasks (a ``clf.inference.pixels`` function) and a pool of
    ``actors`` ``actor_cls``. ``decode_batch_size`` None gives each decode task one whole
    block as its batch."""
    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():
        # Ray 2.60 deprecates every per-task way to set max_retries and names no replacement;
        # the pinned version cannot reach the removal, and the warning told users nothing.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn. is deprecated")
        decoded = ds.map_batches(
            decode_fn,
            # The preprocessing keys only: meta's class list need not travel with every task.
            fn_kwargs={
                "preprocess": Preprocess.from_meta(meta).to_meta(),
                "max_pixels": cfg.max_pixels,
                **(decode_kwargs or {}),
            },
            batch_size=decode_batch_size,
            num_cpus=1,
            # Retry a decode task whose worker died a few times, not forever (Ray Data's
            # default). Per-task remote args also keep Ray from fusing decode into the actors.
            ray_remote_args_fn=_decode_task_args,
        )
    return decoded.map_batches(
        actor_cls,
        fn_constructor_kwargs={
            "model_uri": cfg.model,
            "prefer_gpu": gpu,
            "max_pixels": cfg.max_pixels,
            "threads": model_threads(actors, gpu),
            **actor_kwargs,
        },
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=actors),
        num_gpus=cfg.gpus_per_actor if gpu else 0,
        # Held, not just needed to schedule: the actor feeds its device, and decode tasks must
        # not crowd in beside it.
        num_cpus=1,
    )


def _decode_task_args() -> dict:
    return {"max_retries": DECODE_TASK_RETRIES}
