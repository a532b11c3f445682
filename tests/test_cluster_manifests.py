"""cluster/: what a platform team applies parses, pins what pyproject.toml pins, runs the Ray
version installed here, declares its GPUs, and submits jobs that the jobs' own parsers accept.

No Ray is started: the submit scripts run against stand-in `ray` and Python executables.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
SCRIPTS = sorted(CLUSTER.glob("*.sh"))
RAY_VERSION = importlib.metadata.version("ray")
KUBERNETES_VERSION = "1.30"  # the oldest API server the manifests are written for
JOB_MODULE = re.compile(r"python -m jobs\.([a-z_]+)")  # not placeholders like jobs.NAME


Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_all(text: str) -> list:
    return [doc for doc in yaml.load_all(text, Loader=Loader) if doc is not None]


@functools.cache
def load_docs(path: Path) -> list:
    return parse_all(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def k8s_objects() -> Iterator[tuple[str, dict]]:
    """Every Kubernetes object under cluster/k8s, and the RayJob kept inside a ConfigMap."""
    for path in sorted((CLUSTER / "k8s").glob("*.yaml")):
        for doc in load_docs(path):
            yield rel(path), doc
            if doc["kind"] == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        for inner in parse_all(text):
                            yield f"{rel(path)}:{key}", inner


def ray_job_specs() -> Iterator[tuple[str, dict]]:
    for where, obj in k8s_objects():
        if obj["kind"] == "RayJob":
            yield where, obj["spec"]
        elif obj["kind"] == "RayCronJob":
            yield where, obj["spec"]["jobTemplate"]


def ray_cluster_specs() -> Iterator[tuple[str, dict]]:
    for where, obj in k8s_objects():
        if obj["kind"] == "RayCluster":
            yield where, obj["spec"]
        elif obj["kind"] == "RayService":
            yield where, obj["spec"]["rayClusterConfig"]
    for where, spec in ray_job_specs():
        yield where, spec["rayClusterSpec"]


def ray_groups() -> Iterator[tuple[str, dict, dict]]:
    """(where, group, pod spec) for the head and every worker group of every Ray cluster."""
    for where, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        yield f"{where} head", head, head["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield f"{where} {group['groupName']}", group, group["template"]["spec"]


def all_values(node, key: str) -> Iterator:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from all_values(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from all_values(item, key)


def pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def runtime_env() -> dict:
    return load_docs(CLUSTER / "runtime_env.yaml")[0]


def accepted_by_job_parser(command: list[str]) -> None:
    """`python -m jobs.NAME FLAGS...` names a job module whose build_parser() accepts FLAGS."""
    assert command[:2] == ["python", "-m"] and command[2].startswith("jobs."), command
    name, args = command[2], command[3:]
    assert (ROOT / "jobs" / f"{name.split('.', 1)[1]}.py").is_file(), f"no module {name}"
    assert not {"-h", "--help"} & set(args), "an entrypoint that only prints help"
    parser = importlib.import_module(name).build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{name} rejects {shlex.join(args)} (exit {e.code})")


# ------------------------------------------------------------------------------------------
# Parsing and versions


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_file_parses_into_mappings(path):
    docs = load_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_every_shell_script_passes_bash_n(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_image_and_ray_version_is_the_installed_ray():
    images = [img for path in YAML_FILES for doc in load_docs(path) for img in all_images(doc)]
    images += [
        img
        for _, obj in k8s_objects()
        if obj["kind"] == "ConfigMap"
        for text in obj["data"].values()
        for inner in parse_all(text)
        for img in all_images(inner)
    ]
    ray_images = [img for img in images if img.startswith("rayproject/")]
    assert len(ray_images) >= 15
    for image in ray_images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+(-gpu)?", image), image
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, where
    assert f"ray[default,train,data,serve]=={RAY_VERSION}" in pyproject_dependencies()


def all_images(doc: dict) -> Iterator[str]:
    for key in ("image", "head_image", "worker_image"):
        yield from (v for v in all_values(doc, key) if isinstance(v, str))


# ------------------------------------------------------------------------------------------
# runtime_env


def test_runtime_env_pip_pins_are_pyprojects_dependencies_verbatim():
    assert runtime_env()["pip"] == pyproject_dependencies()
    embedded = [parse_all(spec["runtimeEnvYAML"])[0] for _, spec in ray_job_specs()]
    assert len(embedded) == 3
    for env in embedded:
        assert env["pip"] == pyproject_dependencies()
        assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")


def test_every_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    envs = [runtime_env()] + [parse_all(s["runtimeEnvYAML"])[0] for _, s in ray_job_specs()]
    for env in envs:
        assert set(env) <= RuntimeEnv.known_fields
        RuntimeEnv(**env)  # Ray's own validation of each field


def test_the_upload_keeps_the_code_and_leaves_local_bulk_behind():
    from ray._private.thirdparty.pathspec import PathSpec

    excluded = PathSpec.from_lines("gitwildmatch", runtime_env()["excludes"]).match_file
    kept = ["clf/runtime.py", "clf/training/loader.py", "jobs/train.py", "jobs/label.py"]
    kept += ["pyproject.toml", "cluster/runtime_env.yaml", "examples/recipe.yaml", ".gitignore"]
    dropped = [".venv", ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", ".git"]
    dropped += ["demo-out", "runs/hym/metrics.jsonl", "data/hym/train/000.parquet"]
    dropped += ["labels/x/part.parquet", ".gpu-samples/n01440764_tench.JPEG", "models/a/m.pt"]
    dropped += ["clf/__pycache__/cli.cpython-311.pyc", "clf.egg-info", "runs/hym/curves.png"]
    assert [p for p in kept if excluded(p)] == []
    assert [p for p in dropped if not excluded(p)] == []


def test_runtime_env_merges_with_what_the_driver_forwards(monkeypatch):
    """ray.init() in a submitted job adds the driver's AWS_* variables to the job's runtime_env;
    Ray refuses to start the driver when both set the same variable."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from clf.runtime import forwarded_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    job_env = runtime_env()
    driver_env = {"env_vars": forwarded_env()}
    assert _merge_runtime_env(job_env, driver_env) is not None
    assert _merge_runtime_env({"env_vars": {"AWS_ENDPOINT_URL": "x"}}, driver_env) is None


# ------------------------------------------------------------------------------------------
# Entrypoints


def yaml_entrypoints() -> Iterator[tuple[str, list[str]]]:
    """Each job command of each entrypoint; one entrypoint may chain several with ``&&``."""
    for where, spec in ray_job_specs():
        words = shlex.split(spec["entrypoint"])
        while "&&" in words:
            yield where, words[: words.index("&&")]
            words = words[words.index("&&") + 1 :]
        yield where, words


def test_every_yaml_entrypoint_is_accepted_by_its_jobs_parser():
    entrypoints = list(yaml_entrypoints())
    assert {command[2] for _, command in entrypoints} == {
        "jobs.train",
        "jobs.label",
        "jobs.monitor",
    }
    for _, command in entrypoints:
        accepted_by_job_parser(command)


def test_every_job_named_anywhere_in_cluster_exists():
    named = {
        (rel(path), name)
        for path in CLUSTER.rglob("*")
        if path.is_file()
        for name in JOB_MODULE.findall(path.read_text())
    }
    assert named
    assert [(where, n) for where, n in named if not (ROOT / "jobs" / f"{n}.py").is_file()] == []


def test_nightly_labelling_adds_only_what_is_new_and_training_keeps_one_output():
    label_outputs = set()
    for where, command in yaml_entrypoints():
        if command[2] == "jobs.label":
            assert "--skip-existing" in command, where
            label_outputs.add(command[command.index("--output") + 1])
        assert command[command.index("--output") + 1].startswith("s3://"), where
    assert len(label_outputs) == 1  # the RayCronJob and the CronJob's RayJob label one place


def test_each_nightly_run_monitors_the_rows_it_just_labelled():
    nights = defaultdict(list)
    for where, command in yaml_entrypoints():
        if command[2] in ("jobs.label", "jobs.monitor"):
            nights[where].append(command)
    assert len(nights) == 2  # the RayCronJob and the CronJob's RayJob
    for where, (label, monitor) in nights.items():
        assert (label[2], monitor[2]) == ("jobs.label", "jobs.monitor"), where
        assert monitor[monitor.index("--labels") + 1] == label[label.index("--output") + 1]
        assert "--review" in monitor, where


# ------------------------------------------------------------------------------------------
# Kubernetes: GPUs, /dev/shm, S3 settings, token auth, bounded retries


def test_gpu_groups_declare_and_tolerate_their_gpus_and_others_request_none():
    gpu_groups = 0
    for where, group, pod in ray_groups():
        (container,) = pod["containers"]
        gpus = {
            kind: int(container["resources"].get(kind, {}).get("nvidia.com/gpu", 0))
            for kind in ("requests", "limits")
        }
        if group.get("groupName") == "gpu":
            gpu_groups += 1
            assert gpus["limits"] > 0 and gpus["requests"] == gpus["limits"], where
            assert container["image"].endswith("-gpu"), where
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ], where
        else:
            assert gpus == {"requests": 0, "limits": 0}, where
            assert not container["image"].endswith("-gpu"), where
    assert gpu_groups == 5


def test_every_ray_pod_has_a_memory_backed_dev_shm_and_the_s3_secret():
    for where, _, pod in ray_groups():
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", where
        assert volume["emptyDir"]["sizeLimit"].endswith("Gi"), where
        assert {"secretRef": {"name": "clf-s3"}} in container["envFrom"], where


def test_every_ray_cluster_uses_token_auth_and_keeps_tasks_off_the_head():
    specs = list(ray_cluster_specs())
    assert len(specs) == 5
    for where, spec in specs:
        assert spec["authOptions"] == {"mode": "token"}, where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where


def test_every_ray_job_is_retried_on_a_fresh_cluster_and_bounded_in_time():
    for where, spec in ray_job_specs():
        assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1, where
        assert spec["activeDeadlineSeconds"] > 0 and spec["shutdownAfterJobFinishes"], where
        if "label" in where:  # all attempts of one night end before the next night starts
            assert spec["activeDeadlineSeconds"] * (spec["backoffLimit"] + 1) < 24 * 3600


def test_both_nightly_schedules_are_the_same_night():
    schedules = {
        obj["kind"]: obj["spec"]["schedule"]
        for _, obj in k8s_objects()
        if obj["kind"] in ("RayCronJob", "CronJob")
    }
    assert schedules == {"RayCronJob": "0 2 * * *", "CronJob": "0 2 * * *"}


# Fields of KubeRay's ray.io/v1 API (rayjob_types.go, raycluster_types.go, the RayCronJob CRD).
# kubectl's strict field validation rejects anything else at apply time.
KUBERAY_FIELDS = {
    "RayCronJob": {"schedule", "jobTemplate"},
    "RayService": {
        "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
        "excludeHeadPodFromServeSvc", "deploymentUnhealthySecondThreshold",
        "serviceUnhealthySecondThreshold", "rayClusterDeletionDelaySeconds",
    },
    "RayJob": {
        "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
        "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
        "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
        "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
        "shutdownAfterJobFinishes", "suspend",
    },
    "RayCluster": {
        "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
        "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
        "workerGroupSpecs", "upgradeStrategy",
    },
    "head": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    "worker": {
        "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
        "rayStartParams", "template", "scaleStrategy", "numOfHosts",
    },
}  # fmt: skip


def test_kuberay_objects_use_only_fields_of_the_kuberay_api():
    for where, obj in k8s_objects():
        if obj["kind"] in KUBERAY_FIELDS:
            assert set(obj["spec"]) <= KUBERAY_FIELDS[obj["kind"]], where
    for where, spec in ray_job_specs():
        assert set(spec) <= KUBERAY_FIELDS["RayJob"], where
    for where, spec in ray_cluster_specs():
        assert set(spec) <= KUBERAY_FIELDS["RayCluster"], where
        assert set(spec["headGroupSpec"]) <= KUBERAY_FIELDS["head"], where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= KUBERAY_FIELDS["worker"], where
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where


def test_kubernetes_objects_validate_against_the_kubernetes_api_schema():
    """Core objects as they are, and every Ray pod template as a core PodTemplate; the Ray
    custom resources themselves are checked by the test above."""
    kv = pytest.importorskip("kubernetes_validate")

    def validate(where: str, obj: dict) -> None:
        try:
            kv.validate(obj, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")

    core = [(where, obj) for where, obj in k8s_objects() if "ray.io/" not in obj["apiVersion"]]
    assert {obj["kind"] for _, obj in core} == {
        "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"
    }  # fmt: skip
    for where, obj in core:
        validate(f"{where} {obj['kind']}", obj)
    for where, group, _ in ray_groups():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"}}
        validate(where, template | {"template": group["template"]})


def test_scheduler_may_create_rayjobs_and_nothing_else():
    (role,) = [obj for _, obj in k8s_objects() if obj["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}
    ]


# ------------------------------------------------------------------------------------------
# Serve


def serve_configs() -> Iterator[tuple[str, dict]]:
    """cluster/serve.yaml, and the serveConfigV2 of every RayService."""
    yield "cluster/serve.yaml", load_docs(CLUSTER / "serve.yaml")[0]
    for where, obj in k8s_objects():
        if obj["kind"] == "RayService":
            yield f"{where} serveConfigV2", parse_all(obj["spec"]["serveConfigV2"])[0]


def test_serve_configs_match_serves_own_schema_and_pin_pyprojects_dependencies():
    from ray.serve.schema import ServeDeploySchema

    configs = list(serve_configs())
    assert len(configs) == 2
    for where, config in configs:
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            assert app["runtime_env"]["pip"] == pyproject_dependencies(), where
            assert app["import_path"] == "clf.serve.app:build_app", where


def test_the_rayservice_deploys_exactly_cluster_serve_yaml():
    (_, from_file), (_, in_rayservice) = serve_configs()
    assert in_rayservice == from_file


def test_the_serve_configs_args_build_the_application_jobs_serve_runs(tmp_path):
    """Serve calls the builder with ``args`` on the cluster: here with a local artifact."""
    from clf.serve.app import HEADROOM, build_app

    (tmp_path / "meta.json").write_text(
        json.dumps({"format": "onnx", "files": {"onnx": "model.onnx"}, "classes": ["a", "b"]})
    )
    for where, config in serve_configs():
        (app,) = config["applications"]
        built = build_app({**app["args"], "model": str(tmp_path)})
        options = built._bound_deployment._deployment_config
        args = app["args"]
        assert options.max_ongoing_requests == args["max_queued_requests"] + HEADROOM, where
        assert options.max_ongoing_requests >= args["max_batch_size"], where
        assert options.autoscaling_config is not None, where  # replicas: auto
        assert built._bound_deployment.ray_actor_options["num_gpus"] == args["gpus_per_replica"]


def test_an_unknown_serve_arg_is_refused_by_the_builder(tmp_path):
    from clf.errors import UsageError
    from clf.serve.app import build_app

    with pytest.raises(UsageError, match="unknown config key max_batch"):
        build_app({"model": str(tmp_path), "max_batch": 8})


# ------------------------------------------------------------------------------------------
# ray up


def test_aws_cluster_config_matches_rays_own_schema_and_declares_gpus():
    jsonschema = pytest.importorskip("jsonschema")
    (config,) = load_docs(CLUSTER / "aws.yaml")
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert types["gpu_worker"]["resources"]["GPU"] > 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert [name for name, t in types.items() if t["resources"].get("GPU")] == ["gpu_worker"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    mounts = config["file_mounts"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    # setup_commands install the same pins a job's runtime_env names
    assert mounts["/home/ray/clf/runtime_env.yaml"] == "cluster/runtime_env.yaml"
    assert "/home/ray/clf/runtime_env.yaml" in " ".join(config["setup_commands"])


# ------------------------------------------------------------------------------------------
# Submit scripts, against stand-in `ray` and Python executables

FAKE_RAY = """#!/usr/bin/env bash
{ printf '%s\\n' "RAY_AUTH_MODE=${RAY_AUTH_MODE-}" "ADDRESS=$RAY_API_SERVER_ADDRESS"; \
  printf '%s\\n' "$@"; } > "$FAKE_DIR/ray-args"
exit "${FAKE_RAY_RC:-0}"
"""

# Answers the submit scripts' two questions from files: job statuses, one per status check,
# and the ids of unfinished jobs on the same --output.
FAKE_PYTHON = """#!/usr/bin/env bash
[[ "$1" == -c ]] && exit 0
program="$(cat)"
case "$program" in
    *list_jobs*) cat "$FAKE_DIR/unfinished" 2>/dev/null; exit 0 ;;
    *get_job_status*)
        status="$(head -n 1 "$FAKE_DIR/statuses")"
        sed -i.bak 1d "$FAKE_DIR/statuses"
        [[ -n "$status" ]] || exit 1
        echo "$status" ;;
esac
"""

TRAIN_ARGS = ["--data", "s3://b/data/hym", "--model", "mobilenet_v2", "--output", "s3://b/runs/hym"]
TRAIN_ARGS += ["--workers", "8", "--epochs", "10", "--batch-size", "64", "--strategy", "two-phase"]
LABEL_ARGS = ["--model", "s3://b/runs/hym/model", "--input", "s3://b/archive"]
LABEL_ARGS += ["--output", "s3://b/labels/archive", "--skip-existing", "--batch-size", "256"]


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"ray": FAKE_RAY, "python": FAKE_PYTHON}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CLF_"))}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "HOME": str(tmp_path), "PYTHON": "python"}
    env |= {"FAKE_DIR": str(tmp_path), "CLF_POLL_SECONDS": "0"}
    return tmp_path, env


def submit(script: str, args: list[str], env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER / script), *args],
        env=env | extra,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("script", "args"), [("submit-train.sh", TRAIN_ARGS), ("submit-label.sh", LABEL_ARGS)]
)
def test_submit_scripts_submit_the_repo_with_a_new_id_and_flags_the_job_accepts(
    fake_cluster, script, args
):
    _, env = fake_cluster
    commands = [shlex.split(submit(script, args, env, CLF_DRY_RUN="1").stdout) for _ in range(2)]
    for command in commands:
        split = command.index("--")
        options, entrypoint = command[:split], command[split + 1 :]
        assert options[:3] == ["ray", "job", "submit"]
        assert options[options.index("--working-dir") + 1] == "."
        assert options[options.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
        assert entrypoint[3:] == args
        accepted_by_job_parser(entrypoint)
        metadata = json.loads(options[options.index("--metadata-json") + 1])
        assert metadata["clf_output"] == args[args.index("--output") + 1]
    ids = [c[c.index("--submission-id") + 1] for c in commands]
    assert ids[0] != ids[1]
    assert all(re.fullmatch(r"(train-hym|label-archive)-\d{8}-\d{6}-[0-9a-f]{4}", i) for i in ids)


def test_submit_without_output_is_a_one_line_usage_error(fake_cluster):
    _, env = fake_cluster
    done = submit("submit-label.sh", ["--model", "m", "--input", "i"], env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "cluster/submit-label.sh: error: --output is required (see --help)"
    ]


def test_submit_refuses_a_relative_output_which_would_land_in_the_uploaded_copy(fake_cluster):
    _, env = fake_cluster
    done = submit("submit-label.sh", ["--model", "m", "--input", "i", "--output", "out"], env)
    assert done.returncode == 2
    assert "--output out: give an absolute path or an s3:// URI" in done.stderr


def test_submit_help_is_found_after_other_flags_and_names_every_exit_code(fake_cluster):
    _, env = fake_cluster
    done = submit("submit-train.sh", ["--data", "d", "--help"], env)
    assert done.returncode == 0 and done.stdout.startswith("usage: cluster/submit-train.sh")
    assert "130 interrupted" in done.stdout


def test_submit_names_an_output_the_same_with_or_without_a_trailing_slash(fake_cluster):
    _, env = fake_cluster
    args = ["--model", "m", "--input", "i", "--output", "s3://b/labels/archive/"]
    command = shlex.split(submit("submit-label.sh", args, env, CLF_DRY_RUN="1").stdout)
    metadata = json.loads(command[command.index("--metadata-json") + 1])
    assert metadata["clf_output"] == "s3://b/labels/archive"


@pytest.mark.parametrize(
    ("statuses", "ray_rc", "exit_code"),
    [
        (["SUCCEEDED"], 0, 0),
        (["STOPPED"], 0, 1),  # `ray job submit` exits 0 for a stopped job
        (["FAILED"], 1, 1),
        (["RUNNING", "RUNNING", "SUCCEEDED"], 1, 0),  # the log stream broke, the job did not
        ([], 1, 1),  # never submitted: no status to read
    ],
)
def test_submit_exits_with_the_jobs_outcome(fake_cluster, statuses, ray_rc, exit_code):
    tmp, env = fake_cluster
    (tmp / "statuses").write_text("".join(f"{s}\n" for s in statuses))
    done = submit("submit-train.sh", TRAIN_ARGS, env, FAKE_RAY_RC=str(ray_rc))
    assert done.returncode == exit_code, done.stderr
    if exit_code:
        assert "Re-run the same command" in done.stderr or "cannot read the status" in done.stderr


def test_submit_refuses_while_an_earlier_job_writes_the_same_output(fake_cluster):
    tmp, env = fake_cluster
    (tmp / "unfinished").write_text("train-hym-20260101-000000-abcd\n")
    done = submit("submit-train.sh", TRAIN_ARGS, env)
    assert done.returncode == 3
    assert "train-hym-20260101-000000-abcd" in done.stderr
    assert not (tmp / "ray-args").exists()


def test_submit_sends_the_token_when_one_is_at_hand_and_defaults_to_the_local_head(fake_cluster):
    tmp, env = fake_cluster
    (tmp / "statuses").write_text("SUCCEEDED\n")
    assert submit("submit-label.sh", LABEL_ARGS, env).returncode == 0
    assert (tmp / "ray-args").read_text().splitlines()[:2] == [
        "RAY_AUTH_MODE=",
        "ADDRESS=http://127.0.0.1:8265",
    ]
    (tmp / ".ray").mkdir()
    (tmp / ".ray" / "auth_token").write_text("token")
    (tmp / "statuses").write_text("SUCCEEDED\n")
    done = submit("submit-label.sh", LABEL_ARGS, env, RAY_ADDRESS="http://head:8265")
    assert done.returncode == 0
    assert (tmp / "ray-args").read_text().splitlines()[:2] == [
        "RAY_AUTH_MODE=token",
        "ADDRESS=http://head:8265",
    ]


def test_local_head_serves_its_dashboard_on_loopback_with_token_auth():
    text = (CLUSTER / "local-head.sh").read_text()
    start = re.search(r"RAY_AUTH_MODE=token ray start --head(.*?)\"\$@\"", text, re.S).group(1)
    flags = shlex.split(start.replace("\\\n", " "))
    assert flags[flags.index("--dashboard-host") + 1] == "127.0.0.1"
    assert "ray get-auth-token --generate" in text
