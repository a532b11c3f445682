"""What every job shares: one-line errors with exit code 2, and the human or JSON summary.

The library raises; only this module (called from ``jobs/``) turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from clf import runtime, storage
from clf.errors import ClfError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        # Named as the errors that cli.run prints: "jobs.NAME: error: ...".
        self.exit(2, f"{self.prog.removeprefix('python -m ')}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, unless it has none or its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == []:
            return text
        return text if "default" in text else f"{text} (default: %(default)s)".strip()


def parser(prog: str, description: str) -> ArgumentParser:
    p = ArgumentParser(
        prog=f"python -m jobs.{prog}", description=description, formatter_class=HelpFormatter
    )
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the summary")
    return p


def add_actor_pool_flags(p: argparse.ArgumentParser, role: str, config: type) -> None:
    """The flags that size the model's actor pool, shared by jobs.label and jobs.evaluate;
    defaults from ``config``, their config class."""
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=config.batch_size,
        help="images per predictor batch (onnxruntime on a CPU runs them a few at a time)",
    )
    p.add_argument(
        "--actors",
        type=positive_int,
        help=f"{role} actors (default: one per GPU, or per --gpus-per-actor share of one; "
        "with no GPUs, one per 4 CPUs)",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=config.gpus_per_actor,
        help="a share of one GPU (0.5: two actors per GPU) or a whole number of GPUs",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=config.device,
        help=f"where {role}s run; auto: on GPUs if the cluster has or can start GPU nodes",
    )
    p.add_argument(
        "--small-input",
        type=int,
        default=config.small_input,
        help="with no Ray cluster to join, run at most this many images in this process, "
        "without starting Ray (0: never)",
    )


def add_read_concurrency_flag(p: argparse.ArgumentParser, config: type, per: str) -> None:
    p.add_argument(
        "--read-concurrency",
        type=read_concurrency,
        default=config.read_concurrency,
        help=f"image reads in flight {per}: an object store answers each in tens of "
        "milliseconds, so reads overlap one another and the decoding",
    )


def read_concurrency(text: str) -> int:
    value = positive_int(text)
    if value > storage.MAX_READ_CONCURRENCY:
        raise argparse.ArgumentTypeError(
            f"must be at most {storage.MAX_READ_CONCURRENCY}, got {value}"
        )
    return value


def location(text: str) -> str:
    """A path or URI flag. An empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a path or an s3:// URI")
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme not in (None, "file", *storage.REMOTE_SCHEMES):
        raise argparse.ArgumentTypeError(
            f"{scheme}:// is not supported; give a path or an s3:// URI"
        )
    return text


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def unit_interval(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def run(prog: str, main: Callable[[], int | None]) -> NoReturn:
    """Run a job's ``main``, which may return its exit code; a ``ClfError`` becomes one line on
    stderr (exit 2 for usage)."""
    runtime.tune_allocator()
    try:
        code = main() or 0
    except UsageError as e:
        print(f"jobs.{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ClfError as e:
        print(f"jobs.{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"jobs.{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    if sys.orig_argv[1:3] == ["-m", f"jobs.{prog}"]:
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> NoReturn:
    """End this process as Python would, minus the interpreter's own teardown.

    Everything that finishes work still runs, in Python's order: other threads are joined
    (thread pools first told to stop), Ray is shut down, then the atexit hooks (logging's flush,
    temporary folders). What is skipped, freeing every module and object one by one, finishes
    nothing, and after torch and Ray took seconds (benchmarks/RESULTS.md). Only for a process
    that was started as the job, never for one that runs a job inside something else.
    """
    threading._shutdown()  # type: ignore[attr-defined]  # private: what Py_Finalize calls first
    # Ray's own atexit hook first sleeps half a second for its workers' last log lines; the job
    # has done and reported its work by now, so Ray stops without that wait.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """A config dataclass from the parsed flags whose names match its fields."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def emit(summary: dict[str, Any], lines: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str), flush=True)
    else:
        print("\n".join(lines), flush=True)


def progress(as_json: bool) -> Callable[[str], None]:
    """Progress goes to stderr under --json, so stdout holds exactly one JSON line."""
    stream = sys.stderr if as_json else sys.stdout
    return lambda message: print(message, file=stream, flush=True)
