"""The training recipe's parts: groups, schedules, sampling, mixing, statistics, split reads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA
from PIL import Image

from clf import storage
from clf.config import (
    AugmentConfig,
    IngestConfig,
    ScheduleConfig,
    TrainConfig,
    from_dict,
    merge,
    to_dict,
)
from clf.dataset.ingest import ingest
from clf.images.preprocess import Preprocess
from clf.images.transforms import batch_mixer
from clf.models import create_model, head_parameter_names
from clf.training import history, loader
from clf.training.loader import (
    CACHED_SPLIT_BYTES,
    BalancedResampler,
    balanced_weights,
    channel_stats,
    iter_rows,
    shard_name,
    split_blocks,
    worker_datasets,
)
from clf.training.loop import should_stop
from clf.training.optim import lr_factor, param_groups
from clf.training.preview import preview_augmentations


@pytest.fixture(scope="module")
def hymenoptera_shards(tmp_path_factory) -> str:
    dst = str(tmp_path_factory.mktemp("shards"))
    ingest(IngestConfig(src=str(HYMENOPTERA), dst=dst))
    return dst


def test_norms_and_biases_get_no_weight_decay():
    model = create_model("small_cnn", 3)
    groups = param_groups(model, lr=0.1, weight_decay=0.05)
    for group in groups:
        assert all((p.ndim > 1) == (group["weight_decay"] > 0) for p in group["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_discriminative_lr_decays_with_depth_below_the_head():
    model = create_model("mobilenet_v2", 2)
    groups = param_groups(model, lr=1.0, weight_decay=0.0, discriminative_lr=0.5, layer_groups=3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    heads = head_parameter_names(model)
    assert {lr_of[id(named[n])] for n in heads} == {1.0}
    assert lr_of[id(named["features.0.0.weight"])] == 0.125  # the stem: three groups down
    assert lr_of[id(named["features.18.0.weight"])] == 0.5  # the last block: next to the head
    assert sorted({g["lr"] for g in groups}) == [0.125, 0.25, 0.5, 1.0]


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = create_model("small_cnn", 3)
    heads = head_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad = name in heads
    groups = param_groups(model, 0.1, 0.0, discriminative_lr=0.5)
    assert sum(len(g["params"]) for g in groups) == len(heads)


def schedule(**keys) -> list[float]:
    factor = lr_factor(ScheduleConfig(**keys), steps_per_epoch=10, epochs=10)
    return [factor(step) for step in range(100)]


def test_warmup_then_cosine_rises_linearly_and_decays_to_zero():
    lrs = schedule(name="cosine", warmup_epochs=1)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.001


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    lrs = schedule(name="step", step_epochs=3, gamma=0.1)
    assert lrs[29] == 1.0 and lrs[30] == pytest.approx(0.1) and lrs[90] == pytest.approx(0.001)


def test_onecycle_rises_to_the_peak_then_anneals_far_below_the_start():
    lrs = schedule(name="onecycle", onecycle_pct_start=0.3)
    assert lrs[0] == pytest.approx(1 / 25)
    assert max(lrs) == pytest.approx(1.0) and int(np.argmax(lrs)) == 30
    last = lr_factor(ScheduleConfig(name="onecycle"), steps_per_epoch=10, epochs=10)(100)
    assert last == pytest.approx(1 / 25e4)


def test_balanced_weights_are_sklearns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 100 + [1] * 10 + [2] * 30)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(balanced_weights([100, 10, 30]), expected)


def test_balanced_resampler_sees_every_class_equally_often_and_keeps_the_epoch_length():
    labels = np.array([0] * 500 + [1] * 50)  # 10:1
    images = np.array([b"x" * (i % 97 + 1) for i in range(len(labels))], dtype=object)
    resampler = BalancedResampler([500, 50], seed=0)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    batches = [slice(i, i + 55) for i in range(0, len(labels), 55)]
    drawn = np.concatenate([labels[b][resampler(images[b], labels[b])] for b in batches])
    counts = np.bincount(drawn, minlength=2)
    assert abs(counts[0] - counts[1]) < 0.15 * counts.sum()
    assert 0.85 * len(labels) < counts.sum() < 1.15 * len(labels)


def test_balanced_resampler_is_seeded_by_run_epoch_and_batch():
    labels = np.array([0] * 40 + [1] * 4)
    images = np.array([b"a" * (i + 1) for i in range(44)], dtype=object)
    first, again = BalancedResampler([40, 4], 7), BalancedResampler([40, 4], 7)
    assert np.array_equal(first(images, labels), again(images, labels))
    again.epoch = 1
    assert not np.array_equal(first(images, labels), again(images, labels))


@pytest.mark.parametrize("keys", [{"mixup": 0.2}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}])
def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one(keys):
    mixer = batch_mixer(AugmentConfig(**keys), num_classes=4)
    images, targets = mixer(torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3] * 2))
    assert images.shape == (8, 3, 16, 16) and targets.shape == (8, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 4), targets)
    assert torch.isfinite(loss)


def test_no_mixing_is_configured_by_default():
    assert batch_mixer(AugmentConfig(), num_classes=4) is None


def test_early_stopping_waits_for_patience_epochs_without_improvement():
    cfg = from_dict(TrainConfig, merge(to_dict(TrainConfig()), {"early_stopping": 2}))
    assert not should_stop(cfg, epoch=3, best_epoch=2)
    assert should_stop(cfg, epoch=4, best_epoch=2)
    assert not should_stop(TrainConfig(), epoch=40, best_epoch=0)


def test_an_epoch_line_is_written_only_for_a_committed_checkpoint_and_only_once(tmp_path):
    run = str(tmp_path)
    log = history.CommittedEpochLog(run)
    first = {"epoch": 0, "start_epoch": 0, "val_acc": 0.5}
    log.after_report(None, [first, first], checkpoint=None)
    assert history.read(run) == []
    log.after_report(None, [first, first], checkpoint=object())
    history.append(run, first)  # a resume re-adding the line of its restored checkpoint
    retried = {"epoch": 1, "start_epoch": 1, "val_acc": 0.6}
    history.append(run, {"epoch": 1, "start_epoch": 0, "val_acc": 0.4})  # an attempt, then a kill
    log.after_report(None, [retried], checkpoint=object())
    assert [(r["epoch"], r["start_epoch"]) for r in history.read(run)] == [(0, 0), (1, 0), (1, 1)]


def test_tensorboard_events_of_a_local_run_are_written_under_its_folder(tmp_path):
    board = history.TensorBoard(str(tmp_path))
    board.log({**{key: 0.5 for key in history.TensorBoard.SCALARS}, "epoch": 0})
    board.close()
    (events,) = os.listdir(tmp_path / "tensorboard")
    assert events.startswith("events.out.tfevents")


def test_tensorboard_events_of_an_s3_run_land_in_the_bucket_and_leave_no_local_folder(bucket):
    run = f"{bucket}/runs/a"
    board = history.TensorBoard(run)
    row = {key: 0.5 for key in history.TensorBoard.SCALARS}
    board.log({**row, "epoch": 0})
    board.log({**row, "epoch": 1})
    staging = Path(board.logdir)
    (events,) = storage.list_files(f"{run}/tensorboard")
    (staged,) = staging.iterdir()
    assert "tfevents" in events
    assert storage.read_bytes(events) == staged.read_bytes()
    board.close()
    assert not os.path.exists(staging)


def test_dataset_statistics_are_measured_on_real_train_images(hymenoptera_shards):
    spec = channel_stats(hymenoptera_shards, Preprocess(64, 72), limit=64)
    assert spec.input_size == 64
    assert all(0.3 < m < 0.6 for m in spec.mean)  # outdoor photos: mid-grey on average
    assert all(0.15 < s < 0.35 for s in spec.std)
    assert spec.mean != Preprocess().mean


def test_augmentation_preview_is_a_grid_of_eval_and_augmented_views(hymenoptera_shards, tmp_path):
    cfg = from_dict(
        TrainConfig,
        merge(
            to_dict(TrainConfig()),
            {"data.path": hymenoptera_shards, "augment.auto": "trivial", "augment.mixup": 0.4},
        ),
    )
    png = preview_augmentations(cfg, Preprocess(64, 72), str(tmp_path / "aug.png"), images=4)
    image = Image.open(io.BytesIO(open(png, "rb").read()))
    # 8 columns (eval view + 7 augmented) and 4 image rows plus the mixed row, 2 px padding.
    assert image.size == (8 * 66 + 2, 5 * 66 + 2)


def test_train_with_the_hog_svm_baseline_fits_without_ray(hymenoptera_shards, tmp_path):
    from conftest import job_json, run_job

    done = run_job(
        "jobs.train", "--data", hymenoptera_shards, "--model", "hog_svm",
        "--output", str(tmp_path / "run"), "--json", timeout=300,
    )  # fmt: skip
    summary = job_json(done)
    assert 0 <= summary["val_acc"] <= 1 and "f1_macro" in summary["metrics"]
    assert (tmp_path / "run" / "model" / "meta.json").exists()
    assert "ray" not in done.stderr.lower()


def test_training_on_an_embedded_ray_leaves_out_only_the_placement_group_cleaner():
    """The cleaner frees a dead controller's placement group on a lasting cluster, asking the
    dashboard; an embedded Ray has no dashboard and ends with the job, group and all."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from clf.training.embedded_trainer import EmbeddedTorchTrainer

    def callbacks(cls) -> list[str]:
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    lasting = callbacks(TorchTrainer)
    assert "PlacementGroupCleanerCallback" in lasting
    assert callbacks(EmbeddedTorchTrainer) == [
        name for name in lasting if name != "PlacementGroupCleanerCallback"
    ]


def test_a_small_split_is_cut_into_blocks_shuffled_by_seed_then_split_by_rank():
    import pyarrow as pa

    table = pa.table({"label": list(range(10))})

    def labels(parts):
        return [
            [row for block in part for row in block.column("label").to_pylist()] for part in parts
        ]

    train = split_blocks(table, 3, block_rows=2, equal=True, seed=0)
    assert [len(rows) for rows in labels(train)] == [3, 3, 3]  # DDP: equal steps, remainder dropped
    assert max(block.num_rows for part in train for block in part) <= 2
    assert labels(train) == labels(split_blocks(table, 3, block_rows=2, equal=True, seed=0))
    assert labels(train) != labels(split_blocks(table, 3, block_rows=2, equal=True, seed=1))
    starts = [rows[0] for rows in labels(split_blocks(table, 5, block_rows=2, equal=True, seed=0))]
    assert sorted(starts) == [0, 2, 4, 6, 8] and starts != sorted(starts)  # whole blocks moved

    val = labels(split_blocks(table, 3, block_rows=4, equal=False, seed=None))
    assert val == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]  # every row kept, file order
    few = split_blocks(pa.table({"label": [7]}), 2, block_rows=4, equal=False, seed=None)
    assert labels(few) == [[], [7]] and few[0][0].schema == few[1][0].schema


def test_a_small_split_is_cached_and_split_between_workers_before_training(
    hymenoptera_shards, monkeypatch
):
    import ray

    train = os.path.join(hymenoptera_shards, "train")
    on_disk = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(train)
        for name in names
    )
    assert storage.total_bytes(train) == on_disk
    assert 0 < on_disk <= CACHED_SPLIT_BYTES  # cached: no read tasks in every epoch
    ray.init(num_cpus=2, logging_level="ERROR")
    try:
        datasets, streamed = worker_datasets(hymenoptera_shards, 2, 1, block_rows=16, seed=0)
        labels = {
            name: [list(block["label"]) for block in ds.iter_batches(batch_size=None)]
            for name, ds in datasets.items()
        }
        monkeypatch.setattr(loader, "CACHED_SPLIT_BYTES", 0)
        big, big_streamed = worker_datasets(hymenoptera_shards, 2, 1, block_rows=16, seed=0)
    finally:
        ray.shutdown()
    # Each worker reads its own part: no split coordinator actors, no block cuts mid-epoch.
    assert streamed == [] and sorted(labels) == ["train_0", "train_1", "val_0", "val_1"]
    assert [shard_name("train", 1, streamed), shard_name("val", 0, streamed)] == [
        "train_1",
        "val_0",
    ]
    rows = {name: sum(blocks, []) for name, blocks in labels.items()}
    train_rows = len(list(iter_rows(hymenoptera_shards, "train", 10**6)))
    assert len(rows["train_0"]) == len(rows["train_1"]) == train_rows // 2  # DDP: equal steps
    assert len(rows["val_0"]) + len(rows["val_1"]) == 153  # every val image is scored
    assert all(set(rows[f"train_{rank}"]) == {0, 1} for rank in (0, 1))  # blocks shuffled first
    assert max(len(block) for blocks in labels.values() for block in blocks) <= 16
    # A split too big to cache streams, and Ray Train splits it.
    assert big_streamed == ["train", "val"] and sorted(big) == ["train", "val"]
    assert shard_name("val", 1, big_streamed) == "val"
