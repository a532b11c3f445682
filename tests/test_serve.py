"""jobs.serve's application on a real local Ray, through real HTTP on 127.0.0.1: the same answers
as jobs.predict and jobs.label, batching under concurrency, and a status code for every bad
request, after which the replica keeps serving."""

import io
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from conftest import (
    HYMENOPTERA,
    IMAGENET_SAMPLES,
    LARGE_PHOTOS,
    free_port,
    job_json,
    run_in_process,
    run_job,
)
from PIL import Image
from test_decode import png_header_only

from clf.config import ServeConfig
from clf.serve.job import wait_until_ready

pytestmark = pytest.mark.slow

PHOTOS = [
    IMAGENET_SAMPLES / "n01440764_tench.JPEG",
    IMAGENET_SAMPLES / "n01443537_goldfish.JPEG",
    sorted((HYMENOPTERA / "val" / "bees").iterdir())[0],
    LARGE_PHOTOS / "Dune.jpg",  # 1.3 to 4.9 megapixels: the JPEG draft decode
]
GOOD = PHOTOS[0].read_bytes()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-photos")
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture(scope="module")
def batch_answers(mobilenet_artifact, photos, tmp_path_factory):
    """What the batch jobs answer for the photos: {file name: [(label, score)] * 5} of
    jobs.label and of jobs.predict. Run before Serve holds a CPU of the test's Ray."""
    out = tmp_path_factory.mktemp("serve-labels")
    done = run_job(
        "jobs.label",
        "--model",
        mobilenet_artifact,
        "--input",
        str(photos),
        "--output",
        str(out),
        "--json",
    )
    job_json(done)
    rows = pq.read_table(out).to_pylist()
    labelled = {
        os.path.basename(r["uri"]): list(zip(r["topk_labels"], r["topk_scores"])) for r in rows
    }
    done = run_in_process(
        "jobs.predict",
        "--model",
        mobilenet_artifact,
        "--json",
        *(str(photos / p.name) for p in PHOTOS),
    )
    predicted = {
        os.path.basename(r["image"]): [(t["label"], t["probability"]) for t in r["top"]]
        for r in json.loads(done.stdout)["results"]
    }
    return labelled, predicted


@pytest.fixture(scope="module")
def server(mobilenet_artifact, batch_answers):
    """The application on ``ray.init(num_cpus=2)``, one replica on one CPU: a queue of 16 and a
    2 MB body limit. The other CPU is for a second application, one test at a time."""
    import ray
    from ray import serve

    from clf.serve.app import application

    # One GPU declared and none present: a GPU replica must fall back to the CPU.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"}
    )
    cfg = ServeConfig(
        model=mobilenet_artifact, replicas=1, max_queued_requests=16, max_body_mb=2
    ).validate()
    serve.run(application(cfg), name="clf", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, timeout_s=300)
    yield url
    serve.shutdown()
    ray.shutdown()


def post_image(
    url: str, data: bytes, content_type: str = "image/jpeg", **params
) -> requests.Response:
    return requests.post(
        f"{url}/predict",
        data=data,
        headers={"Content-Type": content_type},
        params=params,
        timeout=60,
    )


def top(answer: dict) -> list[tuple[str, float]]:
    return [(t["label"], t["score"]) for t in answer["top"]]


def assert_same_top(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def metric(url: str, name: str) -> float:
    """``name`` summed over its series: one replica's, here."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines()
        if line.startswith((name + "{", name + " "))
    ]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_a_photo_gets_the_same_top5_from_both_routes_jobs_predict_and_jobs_label(
    server, batch_answers
):
    labelled, predicted = batch_answers
    batch = requests.post(
        f"{server}/predict/batch",
        files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS],
        timeout=60,
    ).json()
    assert [r["file"] for r in batch["results"]] == [p.name for p in PHOTOS]
    for photo, from_batch in zip(PHOTOS, batch["results"]):
        raw = post_image(server, photo.read_bytes()).json()
        as_file = requests.post(
            f"{server}/predict",
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            timeout=60,
        ).json()
        assert raw["error"] is None and from_batch["error"] is None
        for answer in (raw, as_file, from_batch):
            assert_same_top(top(answer), labelled[photo.name])
            assert_same_top(top(answer), predicted[photo.name])
    assert [t["label"] for t in post_image(server, GOOD).json()["top"]][0] == "tench"


def test_k_sets_how_many_classes_an_answer_holds(server):
    answer = post_image(server, GOOD, k=2).json()
    assert [t["index"] for t in answer["top"]][:1] == [0] and len(answer["top"]) == 2


def test_16_concurrent_requests_are_answered_correctly_and_share_model_calls(server, batch_answers):
    labelled, _ = batch_answers
    calls_before = metric(server, "clf_serve_batch_size_count")
    images_before = metric(server, "clf_serve_batch_size_sum")
    photos = [PHOTOS[i % len(PHOTOS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: post_image(server, p.read_bytes()), photos))
    assert [a.status_code for a in answers] == [200] * 16
    for photo, answer in zip(photos, answers):
        assert_same_top(top(answer.json()), labelled[photo.name])
    calls = metric(server, "clf_serve_batch_size_count") - calls_before
    images = metric(server, "clf_serve_batch_size_sum") - images_before
    assert images == 16
    assert images / calls > 1, f"{calls} model calls for 16 concurrent requests"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "an empty body": (b"", "image/jpeg", {}, 400, "empty file"),
    "text sent as a JPEG": (b"hello, world\n", "image/jpeg", {}, 400, "not an image"),
    "a truncated JPEG": (GOOD[: len(GOOD) // 3], "image/jpeg", {}, 400, "truncated"),
    "a blank scan": (png(Image.new("RGB", (300, 200), "white")), "image/png", {}, 400, "blank"),
    "a decompression bomb's header": (
        png_header_only(30000, 30000),
        "image/png",
        {},
        413,
        "image too large (30000x30000)",
    ),
    "a body over the size limit": (
        (LARGE_PHOTOS / "Blinds.jpg").read_bytes() + (LARGE_PHOTOS / "RainDrops.jpg").read_bytes(),
        "image/jpeg",
        {},
        413,
        "bytes is over",
    ),
    "a type that is not an image": (b"hello", "text/plain", {}, 415, "text/plain is not an image"),
    "no content type": (GOOD, "", {}, 415, "no Content-Type"),
    "k of zero": (GOOD, "image/jpeg", {"k": "0"}, 400, "k must be a whole number in [1, 1000]"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_its_status_and_a_json_error_and_the_replica_keeps_serving(server, case):
    body, content_type, params, status, reason = BAD_REQUESTS[case]
    if not content_type:
        answer = requests.post(f"{server}/predict", data=body, params=params, timeout=60)
    else:
        answer = post_image(server, body, content_type, **params)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert reason in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert answer.json()["top"] == []
    assert post_image(server, GOOD).json()["top"][0]["label"] == "tench"


def test_one_bad_file_in_a_batch_request_fails_alone(server):
    files = [
        ("file", ("tench.jpg", GOOD, "image/jpeg")),
        ("file", ("notes.txt", b"not a photo", "text/plain")),
        ("file", ("cut.jpg", GOOD[:500], "image/jpeg")),
        ("file", ("again.jpg", GOOD, "image/jpeg")),
    ]
    answer = requests.post(f"{server}/predict/batch", files=files, timeout=60)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["file"] for r in results] == ["tench.jpg", "notes.txt", "cut.jpg", "again.jpg"]
    assert [bool(r["error"]) for r in results] == [False, True, True, False]
    assert results[1]["error"] == "text/plain is not an image type"
    assert results[0]["top"] == results[3]["top"] and results[1]["top"] == []


def test_a_multipart_request_without_a_file_field_is_400(server):
    answer = requests.post(f"{server}/predict", files={"photo": ("x.jpg", GOOD)}, timeout=60)
    assert answer.status_code == 400 and "no multipart field 'file'" in answer.json()["error"]


def test_health_readiness_and_metadata_describe_the_artifact(server, mobilenet_artifact):
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "alive"}
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200
    meta = json.loads((Path(mobilenet_artifact) / "meta.json").read_text())
    described = requests.get(f"{server}/metadata", timeout=10).json()
    assert described["classes"] == meta["classes"] and described["format"] == "onnx"
    assert described["sha256"] == meta["file_sha256"]["onnx"]
    assert described["input_size"] == 224


def test_metrics_count_requests_by_status_and_decode_errors(server):
    post_image(server, b"garbage", "image/jpeg")
    text = requests.get(f"{server}/metrics", timeout=10).text
    replica = r'replica="[\w-]+"'
    assert re.search(
        rf'clf_serve_requests_total\{{{replica},route="/predict",status="200"\}}', text
    )
    assert re.search(
        rf'clf_serve_requests_total\{{{replica},route="/predict",status="400"\}}', text
    )
    assert re.search(rf'clf_serve_decode_errors_total\{{{replica},status="400"\}} [1-9]', text)
    assert re.search(
        rf'clf_serve_request_seconds_bucket\{{le="0.05",{replica},route="/predict"\}}', text
    )


@pytest.fixture
def tiny_queue(server, mobilenet_artifact):
    """A second application beside the first, whose queue holds two requests, each waiting
    a second for its batch to fill: a third request at once finds the queue full."""
    from ray import serve

    from clf.serve.app import application

    cfg = ServeConfig(
        model=mobilenet_artifact,
        replicas=1,
        max_queued_requests=2,
        max_batch_size=64,
        batch_wait_ms=1000,
    ).validate()
    serve.run(application(cfg), name="tiny-queue", route_prefix="/tiny")
    wait_until_ready(f"{server}/tiny", timeout_s=300)
    yield f"{server}/tiny"
    serve.delete("tiny-queue")


def test_a_full_queue_answers_503_with_a_json_error_and_the_replica_keeps_serving(tiny_queue):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post_image(tiny_queue, GOOD), range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    assert set(statuses) == {200, 503}
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"] == "the server's queue is full; retry shortly"
    assert post_image(tiny_queue, GOOD).json()["top"][0]["label"] == "tench"


def test_a_replica_given_a_gpu_share_without_cuda_serves_the_same_answers_on_the_cpu(
    server, mobilenet_artifact, batch_answers
):
    from ray import serve

    from clf.serve.app import application

    cfg = ServeConfig(model=mobilenet_artifact, replicas=1, gpus_per_replica=1.0).validate()
    serve.run(application(cfg), name="gpu-share", route_prefix="/gpu")
    try:
        wait_until_ready(f"{server}/gpu", timeout_s=300)
        labelled, _ = batch_answers
        for photo in PHOTOS:
            answer = post_image(f"{server}/gpu", photo.read_bytes()).json()
            assert_same_top(top(answer), labelled[photo.name])
    finally:
        serve.delete("gpu-share")
