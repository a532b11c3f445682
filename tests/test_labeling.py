"""Label stages without a cluster: decode never raises, rows follow the label row schema."""

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import imported_by
from PIL import Image

from clf.artifact.export import export_artifact
from clf.artifact.meta import read_meta
from clf.config import LabelConfig
from clf.dataset.label_rows import part_name
from clf.images.nvjpeg import decode_on_device
from clf.images.preprocess import Preprocess
from clf.inference.pixels import decode_batch, read_batch
from clf.inference.stage import (
    MAX_FILES_PER_TASK,
    MAX_TASK_OUTPUT_BYTES,
    TASKS_PER_CPU,
    files_per_task,
    model_threads,
)
from clf.label.inputs import list_inputs
from clf.label.output import CommitProgress
from clf.label.predictor import Predictor
from clf.label.sink import LABEL_SCHEMA, AtomicParquetSink
from clf.models import create_model

SPEC = Preprocess(input_size=32, resize=36)


def test_decode_batch_turns_every_file_into_pixels_or_a_reason(bad_files_dir):
    uris = sorted(str(p) for p in bad_files_dir.iterdir())
    out = decode_batch({"uri": np.array(uris, dtype=object)}, SPEC.to_meta(), 10**8)
    reasons = {u.rsplit("/", 1)[1]: e for u, e in zip(out["uri"], out["error"])}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"] == "not an image"
    assert reasons["truncated.jpg"] in ("truncated JPEG", "corrupt JPEG")
    assert reasons["imageNotFound.gif"].startswith("blank or placeholder image")
    good = [i for i, e in enumerate(out["error"]) if e == ""]
    assert len(good) == 6 and out["pixels"].shape == (len(uris), 3, 32, 32)
    assert all(out["pixels"][i].std() > 0 for i in good)


def export_small_cnn(folder, formats=("torchscript",)) -> str:
    torch.manual_seed(0)
    export_artifact(
        create_model("small_cnn", 4).eval(),
        str(folder),
        arch="small_cnn",
        classes=["w", "x", "y", "z"],
        preprocess=SPEC,
        formats=formats,
    )
    return str(folder)


@pytest.fixture
def small_artifact(tmp_path):
    return export_small_cnn(tmp_path)


def test_predictor_rows_have_the_label_schema_and_null_on_error(small_artifact):
    predictor = Predictor(small_artifact, top_k=3, prefer_gpu=False)
    batch = {
        "uri": np.array(["a.jpg", "b.jpg"], dtype=object),
        "pixels": np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "error": np.array(["", "corrupt JPEG"], dtype=object),
    }
    table = predictor(batch)
    assert table.schema == LABEL_SCHEMA
    good, bad = table.to_pylist()
    assert good["error"] is None and good["label"] == good["topk_labels"][0]
    assert len(good["topk_scores"]) == 3 and good["confidence"] == pytest.approx(
        good["topk_scores"][0]
    )
    assert sorted(good["topk_scores"], reverse=True) == good["topk_scores"]
    assert bad["error"] == "corrupt JPEG"
    assert all(
        bad[k] is None for k in ("label", "label_id", "confidence", "topk_labels", "topk_scores")
    )
    assert good["model"] == bad["model"] == read_meta(small_artifact)["sha256"][:12]


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_predictor_runs_its_model_on_the_cpu_threads_it_is_given(
    tmp_path, restore_torch_threads
):
    onnx_artifact = export_small_cnn(tmp_path / "onnx", formats=("onnx",))
    session = Predictor(onnx_artifact, top_k=3, prefer_gpu=False, threads=2).model.session
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    # Idle onnxruntime threads sleep: they share the cores with the decode tasks.
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torchscript_artifact = export_small_cnn(tmp_path / "ts")
    Predictor(torchscript_artifact, top_k=3, prefer_gpu=False, threads=2)
    assert torch.get_num_threads() == 2


def test_a_cpu_label_actor_of_an_onnx_artifact_never_imports_torch(tmp_path):
    """torch costs 2.3 s of CPU at the actor's start, which a CPU node's decode tasks need."""
    art = export_small_cnn(tmp_path, formats=("onnx",))
    batch = "{'uri': np.array(['a'], dtype=object), 'error': np.array([''], dtype=object), "
    batch += "'pixels': np.zeros((1, 3, 32, 32), dtype=np.uint8)}"
    labels = f"clf.label.predictor.Predictor({art!r}, 3, False, threads=2)({batch})"
    assert imported_by("numpy as np, clf.label.predictor", {"torch"}, then=labels) == []


@pytest.mark.parametrize(
    "cpus, actors, gpu, threads",
    [(2, 1, False, 2), (16, 4, False, 4), (2, 3, False, 1), (16, 1, True, 1)],
)
def test_each_cpu_actor_gets_its_share_of_the_cores_and_a_gpu_actor_one(
    monkeypatch, cpus, actors, gpu, threads
):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cpus)})
    assert model_threads(actors, gpu) == threads


@pytest.mark.parametrize("count", [1, 6, 150, 300, 6_000, 300_000])
@pytest.mark.parametrize("cpus", [2, 16])
@pytest.mark.parametrize("crop", [32, 224, 512])
def test_decode_tasks_of_listed_files_are_large_yet_several_per_cpu_with_small_outputs(
    count, cpus, crop
):
    per_task = files_per_task(count, cpus, crop, least=32)
    largest = min(MAX_FILES_PER_TASK, MAX_TASK_OUTPUT_BYTES // (3 * crop * crop))
    assert 32 <= per_task <= max(32, largest)  # the output block stays small
    tasks = -(-count // per_task)
    assert per_task == 32 or tasks >= TASKS_PER_CPU * cpus  # a small input is spread wide
    if count == 300_000:
        assert per_task == max(32, largest)  # a large one pays few ramp-ups


def test_the_sink_commits_each_write_calls_blocks_as_one_file_named_by_its_inputs(tmp_path):
    def block(uris):
        rows = {f.name: [None] * len(uris) for f in LABEL_SCHEMA}
        return pa.table(rows | {"uri": uris, "error": ["x"] * len(uris)}, schema=LABEL_SCHEMA)

    sink = AtomicParquetSink(str(tmp_path), rows_per_file=5)
    assert sink.min_rows_per_write == 5  # Ray Data bundles blocks up to this per write call
    written = sink.write([block(["a", "b"]), block([]), block(["c", "d", "e"])], None)
    assert written == [(part_name(["e", "d", "c", "b", "a"]), 5)]
    assert pq.read_table(tmp_path / written[0][0]).column("uri").to_pylist() == list("abcde")
    assert sink.write([block([])], None) == [] and len(list(tmp_path.iterdir())) == 1


def test_part_names_depend_only_on_the_inputs_covered():
    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a", "c"])


def test_shard_inputs_are_addressed_by_shard_and_key(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"key": ["x/1.jpg", "x/2.jpg"], "image": [b"", b""]}), tmp_path / "s.parquet"
    )
    inputs = list_inputs(str(tmp_path))
    assert inputs.kind == "shards"
    assert inputs.uris == [f"{tmp_path}/s.parquet#x/1.jpg", f"{tmp_path}/s.parquet#x/2.jpg"]


def test_shard_plan_reads_only_shards_with_work_and_filters_only_partly_done_ones(tmp_path):
    import pyarrow.parquet as pq

    from clf.inference.parquet_rows import with_uris
    from clf.label.inputs import shard_plan

    for name in ("a", "b", "c"):
        keys = [f"{name}/{i}.jpg" for i in range(3)]
        pq.write_table(pa.table({"key": keys, "image": [b""] * 3}), tmp_path / f"{name}.parquet")
    inputs = list_inputs(str(tmp_path))
    a, b = f"{tmp_path}/a.parquet", f"{tmp_path}/b.parquet"
    todo = {u for u in inputs.uris if u.startswith(a)} | {f"{b}#b/1.jpg"}  # c is all done
    read, partial = shard_plan(inputs, todo)
    assert read == [a, b]
    assert partial == {b: frozenset({"b/1.jpg"})}  # a is wholly to do: read as it is

    batch = {
        "path": np.array([a, a, b, b], dtype=object),
        "key": np.array(["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg"], dtype=object),
        "image": np.array([b"0", b"1", b"2", b"3"], dtype=object),
    }
    rows = with_uris(batch, "", partial)
    assert rows["uri"].tolist() == [f"{a}#a/0.jpg", f"{a}#a/1.jpg", f"{b}#b/1.jpg"]
    assert rows["image"].tolist() == [b"0", b"1", b"3"]
    assert set(rows["uri"]) <= todo


def test_a_pipe_given_as_input_is_refused_without_opening_it(tmp_path):
    import os

    from clf.errors import UsageError

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(UsageError, match="not a regular file"):
        list_inputs(str(tmp_path / "pipe.jpg"))


@pytest.mark.parametrize("share", [1.5, 0, -1, float("nan"), float("inf")])
def test_gpus_per_actor_is_a_share_of_one_gpu_or_whole_gpus(small_artifact, tmp_path, share):
    from clf.config import LabelConfig
    from clf.errors import UsageError
    from clf.label.checks import check_label

    cfg = LabelConfig(
        model=small_artifact,
        input=str(tmp_path),
        output=str(tmp_path / "out"),
        gpus_per_actor=share,
    )
    with pytest.raises(UsageError, match="--gpus-per-actor"):
        check_label(cfg)
    for fine in (0.25, 0.5, 1.0, 2.0):
        check_label(
            LabelConfig(
                model=small_artifact,
                input=str(tmp_path),
                output=str(tmp_path / "o"),
                gpus_per_actor=fine,
            )
        )


def test_a_temp_file_left_by_a_kill_is_never_output_and_is_cleaned(tmp_path):
    import pyarrow.parquet as pq

    from clf.label.output import committed_files, read_rows, remove_temp_files

    row = {f.name: [None] for f in LABEL_SCHEMA} | {"uri": ["a.jpg"], "model": ["m"]}
    pq.write_table(pa.table(row, schema=LABEL_SCHEMA), tmp_path / "part-1.parquet")
    left = tmp_path / "part-2.parquet.tmp-0123abcd"  # killed between write and rename
    pq.write_table(pa.table(row, schema=LABEL_SCHEMA), left)
    assert committed_files(str(tmp_path)) == [str(tmp_path / "part-1.parquet")]
    assert read_rows(str(tmp_path)).num_rows == 1
    remove_temp_files(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-1.parquet"]


def test_a_storage_fault_that_outlived_the_retries_fails_the_task_instead_of_becoming_a_row(
    monkeypatch,
):
    from clf import storage
    from clf.errors import StorageError, TransientStorageError

    def read(uri):
        if "throttled" in uri:
            raise TransientStorageError(f"cannot read {uri}: SlowDown")
        raise StorageError(f"not found: {uri}")

    monkeypatch.setattr(storage, "read_bytes", read)
    uris = np.array(["s3://b/missing.jpg"], dtype=object)
    assert decode_batch({"uri": uris}, SPEC.to_meta(), 10**8)["error"][0].startswith("unreadable")
    with pytest.raises(TransientStorageError):  # Ray retries the task; no row is written
        decode_batch(
            {"uri": np.array(["s3://b/throttled.jpg"], dtype=object)}, SPEC.to_meta(), 10**8
        )


@pytest.fixture(scope="module")
def messy_archive(tmp_path_factory) -> list[str]:
    """The bad-input corpus of test_label_corpus, plus a blank JPEG for the device blank check."""
    from test_label_corpus import build_corpus

    root = tmp_path_factory.mktemp("messy")
    names = list(build_corpus(root))
    Image.new("RGB", (320, 240), (250, 250, 250)).save(root / "blank.jpg", quality=95)
    return sorted(str(root / name) for name in [*names, "blank.jpg"])


def test_only_plain_complete_jpegs_are_sent_to_the_device_as_bytes(messy_archive):
    out = read_batch({"uri": np.array(messy_archive, dtype=object)}, Preprocess().to_meta(), 10**8)
    kind = {u.rsplit("/", 1)[1]: k for u, k in zip(out["uri"], out["kind"])}
    for name in ("reference.jpg", "greyscale.JPEG", "exif-1.jpg", "jpeg-named.png", "blank.jpg"):
        assert kind[name] == "jpeg", name
    for name in ("progressive.jpg", "cmyk.jpg", "exif-6.jpg", "png-named.jpg", "sixteen-bit.png"):
        assert kind[name] == "pixels", name  # decoded on the CPU, sent as the crop's pixels
    for name in ("truncated.jpg", "empty.jpg", "bomb-named.jpg", "corrupt-header.jpg"):
        assert kind[name] == "", name  # an error row already
    sent = [d for d, k in zip(out["data"], out["kind"]) if k == "pixels"]
    assert all(len(d) == 3 * 224 * 224 for d in sent)


def test_decoding_on_the_device_gives_every_input_the_cpu_paths_answer(messy_archive, tmp_path):
    """read_batch -> Predictor decodes JPEGs where the model runs (here the CPU stands in for
    a GPU): the same error for every input and the same label for every image."""
    torch.manual_seed(0)
    spec = Preprocess()
    art = str(tmp_path)
    export_artifact(
        create_model("small_cnn", 4).eval(),
        art,
        arch="small_cnn",
        classes=list("wxyz"),
        preprocess=spec,
    )
    predictor = Predictor(art, top_k=3, prefer_gpu=False)
    uris = np.array(messy_archive, dtype=object)
    on_cpu = predictor(decode_batch({"uri": uris}, spec.to_meta(), 10**8)).to_pylist()
    on_device = predictor(read_batch({"uri": uris}, spec.to_meta(), 10**8)).to_pylist()
    assert [r["error"] for r in on_device] == [r["error"] for r in on_cpu]
    blank = messy_archive.index(next(u for u in messy_archive if u.endswith("/blank.jpg")))
    assert on_device[blank]["error"].startswith("blank or placeholder image (100%")
    # The CPU decodes large JPEGs at a reduced DCT scale; the device decodes them whole.
    same = [r["label_id"] for r, u in zip(on_cpu, messy_archive) if "large-" not in u]
    assert [r["label_id"] for r, u in zip(on_device, messy_archive) if "large-" not in u] == same


def test_device_decoded_pixels_match_the_cpu_decode_within_resampling(messy_archive):
    spec = Preprocess()
    jpegs = [u for u in messy_archive if u.endswith(".JPEG")]
    data = [open(u, "rb").read() for u in jpegs]
    pixels, errors = decode_on_device(data, spec, torch.device("cpu"), 10**8)
    reference = decode_batch({"uri": np.array(jpegs, dtype=object)}, spec.to_meta(), 10**8)
    assert errors == [""] * len(jpegs) and list(reference["error"]) == errors
    difference = np.abs(pixels.numpy().astype(int) - reference["pixels"].astype(int))
    assert difference.mean() < 0.01 and difference.max() <= 2


def test_the_label_actor_starts_without_torchvision():
    """torchvision's import pulls in torch._dynamo: 1.3 s more on the critical path of every
    labelling job, whose actor is what the pipeline waits for on a CPU node."""
    assert (
        imported_by(
            "clf.label.predictor, clf.artifact.torch_model, clf.images.nvjpeg", {"torchvision"}
        )
        == []
    )


def test_the_job_process_labels_without_importing_torch():
    """It lists inputs and commits rows; only the predictor actors run the model."""
    assert imported_by("clf.label.job", {"torch"}) == []


def test_the_output_sink_runs_without_torch():
    """Ray Data runs it in worker processes of its own, which import its module first."""
    assert imported_by("clf.label.sink", {"torch", "torchvision"}) == []


def test_progress_counts_the_rows_this_run_commits_and_not_an_earlier_runs(tmp_path):
    def commit(name: str, rows: int) -> None:
        table = pa.table({f.name: [None] * rows for f in LABEL_SCHEMA}, schema=LABEL_SCHEMA)
        pq.write_table(table, tmp_path / name)

    commit("part-earlier.parquet", 5)
    lines: list[str] = []
    with CommitProgress(str(tmp_path), total=10, every=0.05, progress=lines.append):
        commit("part-new.parquet", 3)
        deadline = time.monotonic() + 10
        while not any(line.startswith("[label] 3/10 ") for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
    assert all(line.startswith(("[label] 0/10 ", "[label] 3/10 ")) for line in lines), lines


def test_the_ray_start_address_is_looked_for_where_ray_itself_writes_it(monkeypatch, tmp_path):
    from ray._common.utils import get_ray_address_file

    from clf import runtime

    for env in ({}, {"TMPDIR": str(tmp_path)}, {"RAY_TMPDIR": str(tmp_path / "ray-tmp")}):
        for name in ("TMPDIR", "RAY_TMPDIR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert runtime.ray_start_address_file() == get_ray_address_file(None), env


def test_a_small_input_runs_in_process_only_with_no_cluster_to_join(monkeypatch, tmp_path):
    from clf import runtime
    from clf.inference.stage import runs_in_process

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = LabelConfig(small_input=10)
    assert runs_in_process(cfg, 10) and not runs_in_process(cfg, 11)
    assert not runs_in_process(LabelConfig(small_input=10, device="cuda"), 1)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert not runs_in_process(cfg, 1)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for "start one here"
    assert runs_in_process(cfg, 1)
    monkeypatch.delenv("RAY_ADDRESS")
    os.makedirs(os.path.dirname(runtime.ray_start_address_file()))
    open(runtime.ray_start_address_file(), "w").write("127.0.0.1:6379")  # after `ray start`
    assert not runs_in_process(cfg, 1)
