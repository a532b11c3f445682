"""Every job answers --help, and every bad flag is one line on stderr with exit code 2, before Ray."""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys

import pytest
from conftest import HYMENOPTERA, ROOT, run_in_process

from clf import cli, runtime
from clf.config import EvaluateConfig, IngestConfig, LabelConfig, MonitorConfig, ServeConfig

JOBS = ["ingest", "train", "export", "label", "evaluate", "predict", "serve", "monitor"]


def job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "name, config",
    [
        ("ingest", IngestConfig),
        ("label", LabelConfig),
        ("evaluate", EvaluateConfig),
        ("serve", ServeConfig),
        ("monitor", MonitorConfig),
    ],
)
def test_every_flag_defaults_to_its_config_fields_default(name, config):
    """A job run from the command line and one built from its config do the same thing."""
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    actions = importlib.import_module(f"jobs.{name}").build_parser()._actions
    optional = [a for a in actions if a.dest in fields and not a.required]
    assert len(optional) >= 5
    assert {a.dest: a.default for a in optional} == {a.dest: fields[a.dest] for a in optional}


def test_a_bad_flag_from_the_command_line_is_one_line_and_exit_2():
    """The cases below run in this interpreter; this one runs ``python -m`` as users do."""
    done = job("jobs.label", "--model", "/no/such/art", "--input", "/tmp", "--output", "/tmp/l")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "not a model artifact" in done.stderr


HEAVY = ("torch", "torchvision", "ray")
IMPORTS_AFTER_A_FAILED_RUN = """
import json, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    print(json.dumps([e.code, sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["jobs.train", "--data", "/no/such/data", "--model", "mobilenet_v2", "--output", "/tmp/r"],
        ["jobs.label", "--model", "/no/such/art", "--input", "/tmp", "--output", "/tmp/l"],
    ],
)
def test_a_mistyped_path_fails_before_torch_or_ray_is_imported(args):
    """Those imports take seconds on a small machine; a typo should not wait for them."""
    code = IMPORTS_AFTER_A_FAILED_RUN.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert json.loads(done.stdout) == [2, []], done.stderr


@pytest.mark.parametrize("name", JOBS)
def test_every_flag_says_what_it_does(name):
    parser = importlib.import_module(f"jobs.{name}").build_parser()
    assert [a.option_strings or a.dest for a in parser._actions if not a.help] == []


@pytest.mark.parametrize("name", JOBS)
def test_every_job_has_help(name):
    done = run_in_process(f"jobs.{name}", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["jobs.ingest", "--src", "/no/such/tree", "--dst", "/tmp/x"],
            "--src /no/such/tree: no such folder",
        ),
        (
            ["jobs.ingest", "--src", str(HYMENOPTERA), "--dst", "/tmp/x", "--val-fraction", "1.5"],
            "must be in [0, 1)",
        ),
        (
            ["jobs.ingest", "--src", str(HYMENOPTERA), "--dst", "/tmp/x", "--val-fraction", "abc"],
            "not a number",
        ),
        (
            [
                "jobs.ingest",
                "--src",
                str(HYMENOPTERA),
                "--dst",
                "/tmp/x",
                "--read-concurrency",
                "0",
            ],
            "--read-concurrency: must be at least 1",
        ),
        (
            ["jobs.label", "--model", "/m", "--input", "/i", "--output", "/o"]
            + ["--read-concurrency", "1000"],
            "--read-concurrency: must be at most 256",
        ),
        (
            [
                "jobs.train",
                "--data",
                "/no/such/data",
                "--model",
                "mobilenet_v2",
                "--output",
                "/tmp/r",
            ],
            "--data /no/such/data",
        ),
        (
            [
                "jobs.train",
                "--data",
                "/tmp",
                "--model",
                "small_cnn",
                "--output",
                "/tmp/r",
                "--set",
                "optim.lrr=1",
            ],
            "unknown config key optim.lrr",
        ),
        (
            [
                "jobs.train",
                "--data",
                "/tmp",
                "--model",
                "small_cnn",
                "--output",
                "/tmp/r",
                "--strategy",
                "half",
            ],
            "config key model.strategy",
        ),
        (
            [
                "jobs.export",
                "--model",
                "resnet9000",
                "--pretrained",
                "/x",
                "--classes",
                "imagenet",
                "--output",
                "/tmp/a",
            ],
            "unknown model",
        ),
        (["jobs.export", "--output", "/tmp/a"], "give either --run"),
        (
            ["jobs.export", "--run", "/tmp/r", "--format", "tflite", "--output", "/tmp/a"],
            "--format tflite",
        ),
        (
            ["jobs.label", "--model", "/no/such/art", "--input", "/tmp", "--output", "/tmp/l"],
            "not a model artifact",
        ),
        (
            [
                "jobs.label",
                "--model",
                "/tmp",
                "--input",
                "/tmp",
                "--output",
                "/tmp/l",
                "--top-k",
                "0",
            ],
            "must be at least 1",
        ),
        (
            ["jobs.label", "--model", "/no/such/art", "--input", "/tmp", "--output", "/tmp/l"]
            + ["--gpus-per-actor", "1.5"],
            "--gpus-per-actor 1.5: use a share of one GPU (0.5) or a whole number",
        ),
        (
            ["jobs.label", "--model", "/no/such/art", "--input", "/tmp", "--output", "/tmp/l"]
            + ["--decode", "gpu", "--device", "cpu"],
            "--decode gpu needs the predictor on a GPU",
        ),
        (
            ["jobs.label", "--model", "/tmp", "--input", "/tmp", "--output", "/tmp/l"]
            + ["--progress-every", "0"],
            "--progress-every: must be a positive number of seconds, got 0",
        ),
        (
            ["jobs.label", "--model", "/tmp", "--input", "/tmp", "--output", "/tmp/l"]
            + ["--rows-per-file", "0"],
            "must be at least 1",
        ),
        (["jobs.predict", "--model", "/no/such/art", "x.jpg"], "not a model artifact"),
        (
            ["jobs.evaluate", "--model", "/a", "--data", "/d", "--output", "/tmp/e"]
            + ["--gpus-per-actor", "nan"],
            "--gpus-per-actor nan: use a share of one GPU (0.5) or a whole number",
        ),
        (
            ["jobs.evaluate", "--model", "/a", "--data", "/d", "--output", "/tmp/e"]
            + ["--gpus-per-actor", "1.5"],
            "--gpus-per-actor 1.5: use a share of one GPU (0.5) or a whole number",
        ),
        (["jobs.train", "--config", "/no/such.yaml"], "--config /no/such.yaml: not found"),
        (
            ["jobs.ingest", "--src", str(ROOT / "README.md"), "--dst", "/tmp/d"],
            "README.md: a file, not a folder",
        ),
        (
            ["jobs.train", "--data", "/d", "--model", "hog_svm", "--output", "/tmp/r"]
            + ["--preview-augmentations"],
            "--preview-augmentations: hog_svm does not augment images",
        ),
        (["jobs.train", "--config", "/tmp"], "--config /tmp: cannot read"),
        (["jobs.ingest", "--src", "gs://b/x", "--dst", "/tmp/d"], "--src: gs:// is not supported"),
        (["jobs.serve", "--model", "/no/such/art"], "not a model artifact"),
        (["jobs.serve", "--model", "/a", "--port", "70000"], "must be at most 65535"),
        (["jobs.serve", "--model", "/a", "--replicas", "0"], "must be at least 1"),
        (["jobs.serve", "--model", "/a", "--replicas", "many"], "not an integer: 'many'"),
        (
            ["jobs.serve", "--model", "/a", "--gpus-per-replica", "1.5"],
            "--gpus-per-replica 1.5: use a share of one GPU (0.5) or a whole number",
        ),
        (["jobs.serve", "--model", "/a", "--batch-wait-ms", "-1"], "must be in [0, 10000]"),
        (["jobs.serve", "--model", "/a", "--max-body-mb", "0"], "must be positive, got 0"),
        (["jobs.serve", "--model", "/a", "--max-queued-requests", "0"], "must be at least 1"),
        (["jobs.serve", "--model", "/a", "--format", "pickle"], "invalid choice: 'pickle'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    done = run_in_process(*args)  # which also checks that Ray never started
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["jobs.ingest", "--src", "", "--dst", "/tmp/d"],
        ["jobs.ingest", "--src", "/tmp", "--dst", " "],
        ["jobs.train", "--data", "", "--model", "small_cnn", "--output", "/tmp/r"],
        ["jobs.export", "--run", "/tmp/r", "--output", ""],
        ["jobs.label", "--model", "/tmp/a", "--input", "", "--output", "/tmp/l"],
        ["jobs.evaluate", "--model", "/tmp/a", "--data", "", "--output", "/tmp/e"],
        ["jobs.predict", "--model", "/tmp/a", ""],
        ["jobs.serve", "--model", ""],
    ],
)
def test_an_empty_path_is_refused_rather_than_taken_as_the_current_folder(args):
    done = run_in_process(*args)
    assert done.returncode == 2, done.stderr
    assert "empty; give a path or an s3:// URI" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_resuming_a_run_with_another_model_is_refused_before_ray_starts(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir(), run.mkdir()
    counts = {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}
    (data / "manifest.json").write_text(json.dumps({"counts": counts}))
    (data / "classes.json").write_text(json.dumps(["a", "b"]))
    earlier = {"model": {"name": "resnet18"}, "data": {"path": str(data)}}
    (run / "config.json").write_text(json.dumps(earlier))

    args = ["--data", str(data), "--output", str(run)]
    done = run_in_process("jobs.train", *args, "--model", "small_cnn")
    assert done.returncode == 2, done.stderr
    assert f"--output {run} holds a run with model.name='resnet18'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_labelling_into_another_jobs_output_is_refused_before_ray_starts(tmp_path):
    from clf.artifact.export import export_artifact
    from clf.images.preprocess import Preprocess
    from clf.models import create_model

    model, out = str(tmp_path / "model"), tmp_path / "labels"
    spec = Preprocess(input_size=32, resize=36)
    export_artifact(
        create_model("small_cnn", 2), model, arch="small_cnn", classes=["a", "b"], preprocess=spec
    )
    out.mkdir()
    earlier = {"input": "/elsewhere", "model": "0123456789ab", "top_k": 5}
    (out / "_job.json").write_text(json.dumps(earlier))

    args = ["--model", model, "--input", str(tmp_path), "--output", str(out)]
    done = run_in_process("jobs.label", *args)
    assert done.returncode == 2, done.stderr
    assert "holds labels of another job" in done.stderr and "--skip-existing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def last_line_printed(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """What ``python -c CODE ARGS`` printed last, run where no Ray cluster is to be joined."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env or {**os.environ, "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def embedded_ray_resources(init_args: str, env: dict[str, str] | None = None) -> dict:
    code = (
        "import json, ray; from clf import runtime; "
        f"runtime.init_ray({init_args}); print(json.dumps(ray.cluster_resources())); ray.shutdown()"
    )
    return json.loads(
        last_line_printed(code, env={**os.environ, "RAY_ADDRESS": "local", **(env or {})})
    )


def test_ray_address_local_starts_the_jobs_own_embedded_ray():
    """The same Ray as with no cluster running: sized as the job asks."""
    assert embedded_ray_resources("num_cpus=1")["CPU"] == 1.0


def test_ray_starts_while_a_thread_imports_the_jobs_modules_and_a_failed_import_still_raises():
    code = (
        "import sys, ray; from clf import runtime\n"
        "try: runtime.init_ray_importing('colorsys', 'no_such_module', num_cpus=1)\n"
        "except ModuleNotFoundError as e: print(e.name, 'colorsys' in sys.modules, ray.is_initialized())\n"
        "ray.shutdown()"
    )
    assert last_line_printed(code) == "no_such_module True True"


def test_an_embedded_ray_is_known_as_the_jobs_own_and_serves_no_dashboard():
    code = (
        "import ray; from clf import runtime; runtime.init_ray(num_cpus=1)\n"
        "own, url = runtime.ray_is_embedded(), ray.init(ignore_reinit_error=True).dashboard_url\n"
        "ray.shutdown(); print(own, repr(url), runtime.ray_is_embedded())"
    )
    assert last_line_printed(code) == "True '' False"


def test_an_embedded_ray_for_a_streaming_job_has_a_small_object_store_unless_the_user_sized_it():
    """A long label run grows into the whole store (benchmarks/label_memory.py), so the jobs
    that stream ask for a store of their size; Ray's own default-size settings still win."""
    streaming = embedded_ray_resources("num_cpus=1, streaming=True")
    assert streaming["object_store_memory"] == runtime.streaming_object_store_bytes(1) == 2**29
    user_max = 100 * 2**20
    sized = embedded_ray_resources(
        "num_cpus=1, streaming=True", {"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(user_max)}
    )
    assert sized["object_store_memory"] == user_max


def test_a_streaming_jobs_store_grows_with_the_cpus_from_a_floor_to_rays_default(monkeypatch):
    import ray._private.utils as ray_utils

    monkeypatch.setattr(ray_utils, "estimate_available_memory", lambda: 64 * 2**30)
    assert runtime.streaming_object_store_bytes(2) == 512 * 2**20
    assert runtime.streaming_object_store_bytes(8) == 512 * 2**20
    assert runtime.streaming_object_store_bytes(16) == 1024 * 2**20
    # ...but never past Ray's own default: 64 CPUs' worth on a machine with 2 GiB available
    monkeypatch.setattr(ray_utils, "estimate_available_memory", lambda: 2 * 2**30)
    assert runtime.streaming_object_store_bytes(64) == int(2 * 2**30 * 0.3)


def test_an_embedded_ray_keeps_the_workers_of_tasks_that_ask_for_no_cpu(tmp_path):
    """The label job's writes ask for no CPU; between two files their workers must live on,
    not be replaced by fresh Python processes as Ray does above one idle worker per CPU."""
    code = (
        "import os, sys, time, ray; from clf import runtime; runtime.init_ray(num_cpus=1)\n"
        "@ray.remote(num_cpus=0)\n"
        "def pid_once_three_run(round, room=sys.argv[1]):\n"
        "    open(os.path.join(room, f'{round}-{os.getpid()}'), 'w').close()\n"
        "    while sum(n.startswith(f'{round}-') for n in os.listdir(room)) < 3:\n"
        "        time.sleep(0.05)\n"
        "    return os.getpid()\n"
        "first = set(ray.get([pid_once_three_run.remote(1) for _ in range(3)]))\n"
        "time.sleep(2.5)  # Ray stops surplus workers after 1 s idle\n"
        "again = set(ray.get([pid_once_three_run.remote(2) for _ in range(3)]))\n"
        "print(len(first), len(first & again)); ray.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_num_workers_soft_limit"}
    assert last_line_printed(code, str(tmp_path), env=env | {"RAY_ADDRESS": "local"}) == "3 3"


def test_an_embedded_ray_starts_no_worker_process_that_its_tasks_could_not_use():
    """Ray prestarts workers for no job, without the runtime_env that every job here sets, so
    none of its tasks could run in them; each was a process start taken from the job's CPUs.
    Ray names each worker's log after its job, ffffffff for none."""
    code = (
        "import os, ray; from clf import runtime; runtime.init_ray(num_cpus=2)\n"
        "@ray.remote\n"
        "def pid(): return os.getpid()\n"
        "ray.get([pid.remote() for _ in range(2)])\n"
        "logs = ray._private.worker._global_node.get_logs_dir_path()  # private: no public API\n"
        "jobs = {name.split('-')[2] for name in os.listdir(logs)\n"
        "        if name.startswith('worker-') and name.endswith('.out')}\n"
        "print(sorted(jobs)); ray.shutdown()"
    )
    assert last_line_printed(code) == "['01000000']"


EXIT_PROBE = """
import atexit, threading, time
from concurrent.futures import ThreadPoolExecutor
from clf import cli

ThreadPoolExecutor(2).submit(time.sleep, 0)  # left open, as a job's pool may be
atexit.register(lambda: print("atexit hook", flush=True))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()
print("main done", end="\\n")  # buffered: flushed on the way out
cli.exit_now(3)
"""


def test_a_job_ends_its_threads_and_atexit_hooks_and_flushes_before_skipping_teardown():
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["main done", "thread done", "atexit hook"]


def test_a_job_that_started_ray_has_it_shut_down_before_its_atexit_hooks():
    """Ray's own hook would first wait half a second for its workers' last log lines."""
    code = (
        "import atexit, ray; from clf import cli, runtime; runtime.init_ray(num_cpus=1)\n"
        "atexit.register(lambda: print('Ray up at exit:', ray.is_initialized(), flush=True))\n"
        "cli.exit_now(0)"
    )
    assert last_line_printed(code) == "Ray up at exit: False"


def test_min_int8_agreement_may_be_any_share_up_to_all():
    assert [cli.unit_interval(v) for v in ("0", "0.99", "1")] == [0.0, 0.99, 1.0]
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \[0, 1\], got 1.5"):
        cli.unit_interval("1.5")


def test_an_unknown_model_name_is_one_line_and_exit_2(tmp_path):
    """Checked after the paths, since only torchvision and timm know the names."""
    (tmp_path / "manifest.json").write_text(
        json.dumps({"counts": {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}}})
    )
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    args = ["--data", str(tmp_path), "--output", str(tmp_path / "run")]
    done = run_in_process("jobs.train", *args, "--model", "resnet9000")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "unknown model 'resnet9000'" in done.stderr


# A job's process that frees a 256 MiB buffer, as a model frees its activations after a batch:
# how much of it the process still holds, in MiB.
FREED_BUFFER_PROBE = """
from clf import cli

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

def main():
    before = resident_mib()
    block = b"x" * (256 << 20)  # every page written
    del block
    print(resident_mib() - before)

cli.run("probe", main)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
@pytest.mark.parametrize("user_env, kept", [({}, True), ({"MALLOC_ARENA_MAX": "2"}, False)])
def test_a_job_keeps_freed_buffers_for_reuse_unless_the_user_set_malloc_options(user_env, kept):
    """Handing them back to the OS and faulting them in again made MobileNetV2 run 2-3x slower
    on 2 cores; the workers get the same settings through their environment."""
    done = subprocess.run(
        [sys.executable, "-c", FREED_BUFFER_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | user_env,
    )
    assert done.returncode == 0, done.stderr
    held = int(done.stdout)
    assert held >= 200 if kept else held < 50, held
