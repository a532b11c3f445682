"""jobs.serve: the artifact behind an HTTP endpoint on Ray Serve, until Ctrl-C or SIGTERM.

Routes: POST /predict (one image), POST /predict/batch (multipart files), GET /healthz,
/readyz, /metadata and /metrics. Requests that arrive together run as one model call.
"""

from __future__ import annotations

import argparse
import signal
import threading

from clf import cli, runtime
from clf.artifact.meta import FORMATS
from clf.config import ServeConfig
from clf.serve.checks import check_address_free, check_serve


def replicas(text: str) -> int | str:
    return "auto" if text == "auto" else cli.positive_int(text)


def port(text: str) -> int:
    value = cli.positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {value}")
    return value


def build_parser():
    d = ServeConfig
    p = cli.parser("serve", __doc__)
    p.add_argument(
        "--model", type=cli.location, required=True, help="model artifact folder or URI (ART)"
    )
    p.add_argument(
        "--format", choices=FORMATS, help="which of the artifact's files to run (default: its own)"
    )
    p.add_argument(
        "--host",
        default=d.host,
        help="address to listen on; loopback unless you name another on purpose (0.0.0.0: all)",
    )
    p.add_argument("--port", type=port, default=d.port, help="HTTP port")
    p.add_argument(
        "--replicas",
        type=replicas,
        default=d.replicas,
        help="model replicas (default: one per CPU, or one per GPU share with "
        "--gpus-per-replica), or auto: Serve adds and removes them with the load",
    )
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=d.gpus_per_replica,
        help="a share of one GPU (0.5: two replicas per GPU), or whole GPUs; 0: CPU",
    )
    p.add_argument(
        "--max-batch-size",
        type=cli.positive_int,
        default=d.max_batch_size,
        help="images per model call",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help="how long a model call waits for more requests to fill its batch",
    )
    p.add_argument(
        "--max-queued-requests",
        type=cli.positive_int,
        default=d.max_queued_requests,
        help="requests a replica holds at once; more are answered 503",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=d.max_body_mb,
        help="larger request bodies are answered 413",
    )
    p.add_argument(
        "--top-k", type=cli.positive_int, default=d.top_k, help="classes per answer (?k= overrides)"
    )
    p.add_argument(
        "--max-pixels",
        type=cli.positive_int,
        default=d.max_pixels,
        help="larger images are answered 413, from their header alone",
    )
    return p


def main() -> None:
    args = build_parser().parse_args()
    cfg = cli.config_from_args(ServeConfig, args)
    check_serve(cfg)
    check_address_free(cfg.host, cfg.port)
    progress = cli.progress(args.json)
    progress("starting Ray Serve")
    runtime.init_ray()
    from clf.serve.job import serve

    stop = threading.Event()  # SIGTERM (systemd, Kubernetes) stops as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    summary = serve(cfg, progress, stop)
    cli.emit(summary, [f"stopped serving {cfg.model}"], args.json)


if __name__ == "__main__":
    cli.run("serve", main)
