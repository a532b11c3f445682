"""Config: one typed tree; every mistake is a one-line error naming the key."""

import os

import pytest

from clf.config import TrainConfig, from_dict, merge, parse_override, to_dict
from clf.errors import UsageError


def build(**overrides):
    return from_dict(TrainConfig, merge(to_dict(TrainConfig()), overrides)).validate()


def test_defaults_are_valid():
    assert build().optim.name == "adamw"


def test_local_paths_become_absolute_and_uris_stay_as_given(tmp_path, monkeypatch):
    """Ray Train runs the training function in a folder of its own, where a relative
    --pretrained, --data or --output would name nothing."""
    monkeypatch.chdir(tmp_path)
    cfg = build(**{"output": "run", "data.path": "file://dst", "model.pretrained": "~/w.pth"})
    assert cfg.output == str(tmp_path / "run") and cfg.data.path == f"file://{tmp_path}/dst"
    assert cfg.model.pretrained == os.path.expanduser("~/w.pth")
    remote = build(**{"output": "s3://b/run", "model.pretrained": "s3://b/w.pth"})
    assert (remote.output, remote.model.pretrained) == ("s3://b/run", "s3://b/w.pth")


def test_dotted_overrides_reach_nested_keys():
    cfg = build(**{"optim.lr": 0.01, "model.strategy": "two-phase", "epochs": 3})
    assert (cfg.optim.lr, cfg.model.strategy, cfg.epochs) == (0.01, "two-phase", 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optim.lrr": 0.1}, "unknown config key optim.lrr"),
        ({"optim.name": "adam"}, "config key optim.name: must be one of adamw|sgd"),
        ({"epochs": "ten"}, "config key epochs: expected an integer"),
        ({"epochs": 0}, "config key epochs: must be positive"),
        ({"augment.hflip": 2.0}, "config key augment.hflip: must be in [0, 1]"),
        (
            {"model.strategy": "two-phase", "model.head_epochs": 5, "epochs": 5},
            "config key model.head_epochs",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UsageError) as e:
        build(**override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_set_values_keep_their_yaml_types():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("amp=false") == ("amp", False)
    assert parse_override("model.name=resnet18") == ("model.name", "resnet18")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"augment.mixup": -1}, "config key augment.mixup: must be >= 0"),
        ({"optim.discriminative_lr": 0}, "config key optim.discriminative_lr"),
        ({"optim.accumulate": 0}, "config key optim.accumulate: must be positive"),
        ({"optim.class_weights": "auto"}, "config key optim.class_weights: must be one of"),
        ({"data.sampler": "weighted"}, "config key data.sampler: must be one of shuffle|balanced"),
        ({"data.norm": "mine"}, "config key data.norm: must be one of model|imagenet|dataset"),
        ({"schedule.name": "linear"}, "config key schedule.name: must be one of"),
        ({"model.ema_decay": 1.5}, "config key model.ema_decay: must be in (0, 1)"),
        ({"early_stopping": 0}, "config key early_stopping: patience must be at least 1"),
        ({"optim.weight_decay": -1.0}, "config key optim.weight_decay: must be >= 0"),
        ({"optim.momentum": 1.5}, "config key optim.momentum: must be in [0, 1]"),
        ({"optim.clip_grad": 0.0}, "config key optim.clip_grad: must be positive"),
        ({"optim.finetune_lr_scale": 0.0}, "config key optim.finetune_lr_scale"),
        ({"augment.rotation": -10.0}, "config key augment.rotation: must be >= 0"),
        ({"augment.color_jitter": -0.1}, "config key augment.color_jitter: must be >= 0"),
        ({"augment.cutmix": float("nan")}, "config key augment.cutmix: must be >= 0, got nan"),
        ({"augment.mixup": float("inf")}, "config key augment.mixup: must be >= 0, got inf"),
        ({"schedule.step_epochs": float("nan")}, "config key schedule.step_epochs"),
    ],
)
def test_recipe_keys_are_validated_with_the_key_named(override, message):
    with pytest.raises(UsageError) as e:
        build(**override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
