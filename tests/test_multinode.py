"""Placement on a real multi-node Ray (ray.cluster_utils.Cluster): a head that runs nothing, a
node that declares a GPU it does not have, and a CPU node.

- Labelling puts its predictor actor on the GPU node, where it falls back to CPU inference
  (CUDA is absent), and its decode tasks on the CPU node.
- Training with two workers and placement_strategy SPREAD puts one worker on each node.

Where things ran is recorded by test-side wrappers around the product's own functions: each
writes its node id into a folder that every node of this one-machine cluster shares. (Ray's
state API, ray.util.state, needs the full dashboard, which this install does not have.)
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import HYMENOPTERA, IMAGENET_SAMPLES
from ray.cluster_utils import Cluster

from clf import runtime
from clf.artifact.export import export_artifact
from clf.config import DataConfig, IngestConfig, LabelConfig, ModelConfig, TrainConfig
from clf.dataset.ingest import ingest
from clf.errors import UsageError
from clf.images.preprocess import Preprocess
from clf.inference import stage
from clf.label import job, output
from clf.label.checks import check_label
from clf.label.predictor import Predictor
from clf.models import create_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)  # the predictor actor fills it
    cpu_node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": runtime.forwarded_env()})
    # Workers cannot import this test module: ship the recording wrappers whole.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield {"gpu": gpu_node.node_id, "cpu": cpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def record(folder: Path, **facts) -> None:
    facts["node"] = ray.get_runtime_context().get_node_id()
    (folder / uuid.uuid4().hex).write_text(json.dumps(facts))


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.iterdir()]


def test_gpu_slots_count_each_node_and_shares_of_a_gpu(cluster):
    assert runtime.cluster_gpus() == 1 and runtime.use_gpu("auto") and not runtime.use_gpu("cpu")
    assert [runtime.gpu_actor_slots(share) for share in (1, 0.5, 0.3, 2)] == [1, 2, 3, 0]
    assert stage.pool_size(LabelConfig(gpus_per_actor=0.5), gpu=True) == 2
    assert stage.pool_size(LabelConfig(actors=3), gpu=True) == 3
    with pytest.raises(UsageError, match="no node has that many GPUs"):
        stage.pool_size(LabelConfig(gpus_per_actor=2), gpu=True)


def test_label_runs_the_predictor_on_the_gpu_node_and_decodes_elsewhere(
    cluster, tmp_path, monkeypatch
):
    from ray.data import DataContext

    src, model, out = tmp_path / "images", str(tmp_path / "model"), str(tmp_path / "labels")
    src.mkdir()
    for name in sorted(os.listdir(IMAGENET_SAMPLES))[:24]:
        os.symlink(IMAGENET_SAMPLES / name, src / name)
    net = create_model("small_cnn", 3).eval()
    spec = Preprocess(input_size=32, resize=36)
    export_artifact(net, model, arch="small_cnn", classes=["a", "b", "c"], preprocess=spec)

    decodes, predictors = tmp_path / "decodes", tmp_path / "predictors"
    decodes.mkdir(), predictors.mkdir()
    decode_batch = job.decode_batch

    def recorded_decode(batch, preprocess, max_pixels, read_concurrency):
        record(decodes)
        return decode_batch(batch, preprocess, max_pixels, read_concurrency)

    class RecordedPredictor(Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
            record(predictors, device=str(self.model.device), gpus=gpus)

    monkeypatch.setattr(job, "decode_batch", recorded_decode)
    monkeypatch.setattr(job, "Predictor", RecordedPredictor)
    # Ray Data starts actors and tasks at once: let the actor take the GPU node's one CPU
    # before a decode task can, so that where each ran says where each was meant to run.
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 120)

    cfg = LabelConfig(model=model, input=str(src), output=out, batch_size=8)
    summary = job.label(cfg, check_label(cfg))
    assert summary.labelled == 24 and output.read_rows(out).num_rows == 24

    (predictor,) = records(predictors)  # one actor: one per GPU
    assert predictor == {"node": cluster["gpu"], "gpus": ["0"], "device": "cpu"}
    # With no CUDA driver behind the declared GPU, JPEGs are not sent to it as bytes either.
    assert {r["node"] for r in records(decodes)} == {cluster["cpu"]}
    assert not runtime.gpu_has_cuda(1.0)


def test_train_spreads_two_workers_over_two_nodes(cluster, tmp_path, monkeypatch):
    from clf.training import loop
    from clf.training.checks import check_train
    from clf.training.trainer import train

    data, ran = str(tmp_path / "shards"), tmp_path / "workers"
    ran.mkdir()
    ingest(IngestConfig(src=str(HYMENOPTERA), dst=data))
    train_loop = loop.train_loop_per_worker

    def recorded_loop(config):
        record(ran, rank=ray.train.get_context().get_world_rank())
        return train_loop(config)

    monkeypatch.setattr(loop, "train_loop_per_worker", recorded_loop)
    cfg = TrainConfig(
        output=str(tmp_path / "run"),
        epochs=1,
        workers=2,
        device="cpu",  # the GPU node's GPU is declared, not real; one GPU cannot hold 2 workers
        tensorboard=False,
        data=DataConfig(path=data, batch_size=16, input_size=32),
        model=ModelConfig(name="small_cnn"),
    )
    summary = train(cfg, *check_train(cfg), progress=lambda message: None)
    assert summary.epochs_run == 1 and np.isfinite(summary.best_val_acc)

    workers = records(ran)
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert {w["node"] for w in workers} == {cluster["gpu"], cluster["cpu"]}
