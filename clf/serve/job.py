"""jobs.serve: run the application on Ray Serve until told to stop, then let the requests in
flight finish."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from clf import runtime
from clf.config import ServeConfig
from clf.errors import ClfError, UsageError

APP_NAME = "clf"
READY_TIMEOUT_S = 600  # a big model from a bucket onto a cold node
POLL_S = 0.5


def serve(
    cfg: ServeConfig, progress: Callable[[str], None], stop: threading.Event | None = None
) -> dict[str, Any]:
    """Deploy, wait until a replica is ready, then block until ``stop`` is set or Ctrl-C.
    Deleting the application lets each replica finish the requests it holds."""
    stop = stop or threading.Event()
    from ray import serve as ray_serve

    from clf.serve.app import application

    if cfg.gpus_per_replica > 0 and runtime.gpu_actor_slots(cfg.gpus_per_replica) == 0:
        raise UsageError(
            f"--gpus-per-replica {cfg.gpus_per_replica}: no node of the Ray cluster has that "
            "share of a GPU; 0 serves on CPUs"
        )

    # Importing Serve sets its driver logger to INFO, which logs each step the job reports.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    started = time.monotonic()
    # Serve logs every request and replica event at INFO; the job prints its own lines.
    logs = {"log_level": "WARNING", "enable_access_log": False}
    ray_serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logs)
    ray_serve.run(
        application(cfg), name=APP_NAME, route_prefix="/", blocking=False, logging_config=logs
    )
    url = f"http://{local_host(cfg.host)}:{cfg.port}"
    progress(f"replicas started; loading {cfg.model} and warming it up")
    try:
        if wait_until_ready(url, stop):
            progress(
                f"ready in {time.monotonic() - started:.1f} s: POST {url}/predict with an image "
                "(Ctrl-C stops, after the requests in flight)"
            )
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:  # on a shared cluster, a failed start leaves nothing deployed either
        progress("stopping: finishing the requests in flight")
        ray_serve.delete(APP_NAME)
    return {"url": url, "model": cfg.model, "stopped": True}


def local_host(host: str) -> str:
    """Where this machine reaches the server: loopback for a wildcard address."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)


def wait_until_ready(
    url: str, stop: threading.Event | None = None, timeout_s: float = READY_TIMEOUT_S
) -> bool:
    """Poll ``/readyz`` until a replica has loaded and warmed up its model (True), or ``stop``
    is set (False); a model that fails to load ends the wait with the replica's reason."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return True
        except urllib.error.HTTPError as e:  # 503: loading, or failed to load
            reason = _error_of(e)
            if reason and "did not load" in reason:
                raise ClfError(reason) from None
        except (urllib.error.URLError, OSError):  # the proxy is not listening yet
            pass
        time.sleep(POLL_S)
    raise ClfError(f"no replica was ready after {timeout_s:.0f} s")


def _error_of(e: urllib.error.HTTPError) -> str | None:
    try:
        return json.loads(e.read()).get("error")
    except (ValueError, AttributeError):
        return None
