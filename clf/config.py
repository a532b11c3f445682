"""Every job's typed config, in one place.

A config is built once from defaults, an optional YAML file and flag overrides, validated
before Ray starts (an unknown key or a bad value is a one-line ``UsageError`` naming the key),
and saved with the run as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from clf import storage
from clf.errors import ClfError, UsageError
from clf.storage import DEFAULT_READ_CONCURRENCY, MAX_READ_CONCURRENCY

Device = Literal["auto", "cpu", "cuda"]
Decode = Literal["auto", "cpu", "gpu"]
BASELINE_MODEL = "hog_svm"  # the classical baseline's name wherever a model name is taken
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs


@dataclass
class DataConfig:
    path: str = ""  # ingest output (DST) holding train/ val/ [test/] shards and classes.json
    batch_size: int = 32  # per worker
    input_size: int | None = None  # None: the model's own default
    # Normalisation statistics: the backbone's own, ImageNet's, or computed from the train split.
    norm: Literal["model", "imagenet", "dataset"] = "model"
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: every class equally often
    # Fraction of a CPU that each Ray Data read task asks for; training workers hold the rest.
    read_cpus: float = 0.25


@dataclass
class AugmentConfig:
    scale_min: float = 0.08  # RandomResizedCrop lower area bound
    hflip: float = 0.5
    rotation: float = 0.0  # degrees
    color_jitter: float = 0.0  # brightness, contrast and saturation strength
    auto: Literal["none", "trivial", "randaugment"] = "none"
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # Beta(alpha, alpha) of MixUp; 0 turns it off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; with both on, each batch picks one


@dataclass
class ModelConfig:
    name: str = "mobilenet_v2"
    pretrained: str | None = None  # path or URI of a state dict
    strategy: Literal["frozen", "finetune", "two-phase"] = "finetune"
    head_epochs: int = 1  # two-phase: epochs that train the head alone
    drop_rate: float = 0.0
    ema_decay: float | None = None  # e.g. 0.999: evaluate and export an EMA of the weights


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # for a global batch of batch_size * workers
    weight_decay: float = 0.05
    momentum: float = 0.9
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    accumulate: int = 1  # micro-batches per optimizer step
    finetune_lr_scale: float = 0.1  # two-phase: backbone lr = lr * this after unfreezing
    # Discriminative learning rates: the backbone is cut into layer_groups slices by depth, and
    # each slice below the head gets this factor once more (1 turns it off).
    discriminative_lr: float = 1.0
    layer_groups: int = 3
    class_weights: Literal["none", "balanced"] = "none"  # balanced: loss weights n / (C * n_c)


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # cosine, step and constant
    step_epochs: float = 10.0  # step: multiply the lr by gamma every this many epochs
    gamma: float = 0.1
    onecycle_pct_start: float = 0.3  # onecycle: share of the steps spent rising to lr


@dataclass
class TrainConfig:
    output: str = ""
    epochs: int = 5
    workers: int = 2
    device: Device = "auto"
    seed: int = 0
    amp: bool = True  # used only on CUDA
    channels_last: bool = True  # on CPU too: oneDNN's convolutions run faster in it
    keep_checkpoints: int = 2
    max_failures: int = 3
    early_stopping: int | None = None  # patience: epochs without a better val_acc before stopping
    tensorboard: bool = True  # event files under RUN/tensorboard
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> TrainConfig:
        _positive(self, "epochs", "workers", "keep_checkpoints", "data.batch_size")
        _positive(self, "optim.accumulate", "optim.layer_groups", "schedule.step_epochs")
        _at_least(self, 0, "max_failures", "schedule.warmup_epochs", "model.head_epochs")
        _at_least(self, 0, "augment.mixup", "augment.cutmix", "augment.rotation")
        _at_least(self, 0, "augment.color_jitter", "optim.weight_decay")
        _positive(self, "optim.finetune_lr_scale")
        _fraction(self, "optim.momentum")
        if self.optim.clip_grad is not None:
            _positive(self, "optim.clip_grad")
        _fraction(self, "augment.hflip", "augment.random_erasing", "optim.label_smoothing")
        _fraction(self, "augment.scale_min", "model.drop_rate", "schedule.gamma")
        _fraction(self, "optim.discriminative_lr", "schedule.onecycle_pct_start")
        if self.optim.discriminative_lr <= 0:
            raise UsageError("config key optim.discriminative_lr: must be in (0, 1]")
        if self.model.ema_decay is not None and not 0 < self.model.ema_decay < 1:
            raise UsageError(
                f"config key model.ema_decay: must be in (0, 1), got {self.model.ema_decay}"
            )
        if self.early_stopping is not None and self.early_stopping < 1:
            raise UsageError(
                f"config key early_stopping: patience must be at least 1, got {self.early_stopping}"
            )
        if not 0 < self.optim.lr < 10:
            raise UsageError(f"config key optim.lr: must be in (0, 10), got {self.optim.lr}")
        if self.data.input_size is not None and self.data.input_size < 8:
            raise UsageError("config key data.input_size: must be at least 8")
        if not 0 < self.data.read_cpus <= 1:
            raise UsageError("config key data.read_cpus: must be in (0, 1]")
        if self.model.strategy == "two-phase" and self.model.head_epochs >= self.epochs:
            raise UsageError(
                f"config key model.head_epochs: two-phase needs head_epochs ({self.model.head_epochs})"
                f" < epochs ({self.epochs})"
            )
        # Ray Train runs the training function in a working folder of its own.
        self.output, self.data.path = absolute(self.output), absolute(self.data.path)
        if self.model.pretrained:
            self.model.pretrained = absolute(self.model.pretrained)
        return self


@dataclass
class IngestConfig:
    src: str | None = None  # or labels
    dst: str = ""
    val_fraction: float = 0.2  # used when the source has no val/ folder
    test_fraction: float = 0.0  # used when the source has no test/ folder
    seed: int = 0
    shard_size: int = 1000  # images per Parquet shard
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    read_concurrency: int = DEFAULT_READ_CONCURRENCY  # source images read at once
    labels: str | None = None  # a CSV of uri,label to add to the existing ingest at dst
    split: Literal["train", "val", "test"] = "train"  # --labels: where images new to dst go

    def validate(self) -> IngestConfig:
        if not self.dst:
            raise UsageError("--dst is required")
        if bool(self.src) == bool(self.labels):
            raise UsageError("give --src (a folder tree to ingest) or --labels (a CSV), not both")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1:
            raise UsageError("--val-fraction plus --test-fraction must be below 1")
        _positive(self, "shard_size", "max_pixels")
        _read_concurrency(self.read_concurrency)
        return self


@dataclass
class PoolConfig:
    """What jobs.label and jobs.evaluate share: the model, its actor pool and the decoding."""

    model: str = ""  # artifact folder or URI
    output: str = ""  # folder or prefix the job writes
    top_k: int = 5
    batch_size: int = 64  # images per model actor batch
    actors: int | None = None  # None: one per GPU, or a CPU-sized pool
    gpus_per_actor: float = 1.0
    device: Device = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Images per decode batch of shard rows, and the fewest per decode task of listed files.
    decode_batch_size: int = 32
    # Without a cluster to join, at most this many images are run in the job's own process,
    # with no Ray to start (0: never). RESULTS.md measures where Ray starts to pay.
    small_input: int = 1000

    def validate(self) -> PoolConfig:
        for key in ("model", "output"):
            if not getattr(self, key):
                raise UsageError(f"--{key} is required")
        for key in ("top_k", "batch_size", "max_pixels", "decode_batch_size"):
            _at_least_one(key, getattr(self, key))
        if self.actors is not None:
            _at_least_one("actors", self.actors)
        _gpu_share(self.gpus_per_actor)
        if self.small_input < 0:
            raise UsageError(f"--small-input must be 0 or more, got {self.small_input}")
        return self


@dataclass
class LabelConfig(PoolConfig):
    input: str = ""  # folder/prefix of image files, or of Parquet image shards
    skip_existing: bool = False
    read_concurrency: int = DEFAULT_READ_CONCURRENCY  # object reads in flight per decode task
    decode: Decode = "auto"  # auto: JPEGs decode on the predictor's GPU when it has one
    progress_every: float = 30.0  # seconds between progress lines
    rows_per_file: int = 512  # label rows per committed Parquet file (the last may hold fewer)

    def validate(self) -> LabelConfig:
        if not self.input:
            raise UsageError("--input is required")
        super().validate()
        _positive(self, "progress_every", "rows_per_file")
        _read_concurrency(self.read_concurrency)
        return self


@dataclass
class EvaluateConfig(PoolConfig):
    """``model`` may also be "hog_svm": the baseline, fit on ``train`` first."""

    data: str = ""  # a split of jobs.ingest shards, DST/test; classes.json sits in DST
    diagnostics: bool = False  # also filters.png and confident_mistakes.png
    train: str | None = None  # hog_svm: the training split, DST/train
    baseline_size: int = 64  # hog_svm: HOG image side
    confused_pairs: int = 20
    mistakes: int = 16  # images in confident_mistakes.png

    def validate(self) -> EvaluateConfig:
        if not self.data:
            raise UsageError("--data is required")
        super().validate()
        for key in ("confused_pairs", "mistakes"):
            _at_least_one(key, getattr(self, key))
        if self.baseline_size < 16:
            raise UsageError(f"--baseline-size must be at least 16, got {self.baseline_size}")
        if self.train and self.model != BASELINE_MODEL:
            raise UsageError(f"--train is for --model {BASELINE_MODEL} only")
        return self

    @property
    def fits_baseline(self) -> bool:
        return self.model == BASELINE_MODEL


@dataclass
class ServeConfig:
    model: str = ""  # artifact folder or URI
    format: str | None = None  # which of the artifact's files to run; None: its own
    host: str = "127.0.0.1"  # loopback unless the user names another address on purpose
    port: int = 8000
    # None: one per CPU of the cluster, as TorchServe's workers, or one per GPU share;
    # auto: Serve adds and removes replicas with the load
    replicas: int | Literal["auto"] | None = None
    gpus_per_replica: float = 0.0  # 0: replicas run on CPU
    max_batch_size: int = 32  # images per model call
    batch_wait_ms: float = 10.0  # how long a batch waits to fill before it runs
    max_queued_requests: int = 256  # per replica, beyond those in its model batches; more get 503
    max_body_mb: float = 20.0  # larger request bodies get 413 before they are read whole
    top_k: int = 5
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> ServeConfig:
        if not self.model:
            raise UsageError("--model is required")
        if not 1 <= self.port <= 65535:
            raise UsageError(f"--port must be in [1, 65535], got {self.port}")
        if self.replicas not in ("auto", None):
            _at_least_one("replicas", self.replicas)
        for key in ("max_batch_size", "max_queued_requests", "top_k", "max_pixels"):
            _at_least_one(key, getattr(self, key))
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise UsageError(f"--batch-wait-ms must be in [0, 10000], got {self.batch_wait_ms}")
        if not 0 < self.max_body_mb < math.inf:
            raise UsageError(f"--max-body-mb must be positive, got {self.max_body_mb}")
        if self.gpus_per_replica:
            _gpu_share(self.gpus_per_replica, "--gpus-per-replica")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


ReviewStrategy = Literal["least-confidence", "margin", "entropy"]


@dataclass
class MonitorConfig:
    labels: str = ""  # a jobs.label output
    output: str = ""  # folder or prefix for drift.json, drift.png and the review queue
    run: str | None = None  # which run of --labels; None: the latest that labelled anything
    # An artifact (its reference.parquet) or a label output; None: the run's own artifact.
    reference: str | None = None
    reference_run: str | None = None  # of a --reference label output; None: all its other rows
    p_value: float = 0.05  # chi-square and KS: drift below this p-value
    js_distance: float = 0.1  # class shares: drift at or above this Jensen-Shannon distance
    psi: float = 0.1  # confidence and entropy: drift at or above this PSI
    error_share: float = 0.05  # drift when the share of error rows grows by this much or more
    # The tests decide while either sample has at most this many rows; past it the distances
    # do, since a test on so many rows flags shifts too small to matter.
    large_sample: int = 1000
    review: int = 0  # rows in the review queue; 0: no queue
    strategy: ReviewStrategy = "least-confidence"
    stratify: bool = False  # review: at most an even share of the queue per predicted class

    def validate(self) -> MonitorConfig:
        for key in ("labels", "output"):
            if not getattr(self, key):
                raise UsageError(f"--{key} is required")
        if not 0 < self.p_value < 1:
            raise UsageError(f"--p-value must be in (0, 1), got {self.p_value}")
        for key in ("js_distance", "error_share"):
            if not 0 < getattr(self, key) <= 1:
                raise UsageError(
                    f"--{key.replace('_', '-')} must be in (0, 1], got {getattr(self, key)}"
                )
        _positive(self, "psi", "large_sample")
        if self.review < 0:
            raise UsageError(f"--review must be 0 or more, got {self.review}")
        if self.reference_run and not self.reference:
            raise UsageError("--reference-run needs --reference, a label output")
        return self


# ---------------------------------------------------------------------------------------------
# Building and overriding configs


def absolute(uri: str) -> str:
    """A local path made absolute, so that it means the same in every process; a URI as given."""
    if uri.startswith("file://"):
        return "file://" + absolute(uri[len("file://") :])
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from plain values, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise UsageError(f"config key {prefix.rstrip('.') or '<root>'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise UsageError(f"unknown config key {prefix}{key}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (``{"optim.lr": 0.01}``) to a nested dict."""
    merged = _deepcopy(base)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"config key {dotted}: {part} is not a section")
            node = child
        node[leaf] = value
    return merged


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = storage.read_bytes(path)
    except (ClfError, OSError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping at the top level")
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML, so numbers and booleans keep their type."""
    import yaml

    if "=" not in text:
        raise UsageError(f"--set {text}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string; learning rates are written that way
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"config key {key}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            allowed = "|".join(map(str, choices))
            raise UsageError(f"config key {key}: must be one of {allowed}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"config key {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"config key {key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"config key {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"config key {key}: expected a string, got {value!r}")
    return value


def _deepcopy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in values.items()}


def get_key(config: Any, dotted: str) -> Any:
    """A config value by its dotted key, e.g. ``optim.lr``."""
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _gpu_share(share: float, flag: str = "--gpus-per-actor") -> None:
    """Ray gives an actor a share of one GPU, or whole GPUs: never 1.5 of them."""
    if not 0 < share < math.inf or (share > 1 and share != int(share)):
        raise UsageError(f"{flag} {share}: use a share of one GPU (0.5) or a whole number of GPUs")


# Written as "not (in range)" so that NaN, which fails every comparison, is refused too.
def _positive(config: Any, *keys: str) -> None:
    for key in keys:
        if not 0 < get_key(config, key) < math.inf:
            raise UsageError(f"config key {key}: must be positive, got {get_key(config, key)}")


# Written as "not (in range)" so that NaN, which fails every comparison, is refused too.
def _at_least_one(key: str, value: float) -> None:
    if not 1 <= value < math.inf:
        raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {value}")


def _read_concurrency(value: int) -> None:
    if not 1 <= value <= MAX_READ_CONCURRENCY:
        raise UsageError(f"--read-concurrency must be in [1, {MAX_READ_CONCURRENCY}], got {value}")


def _at_least(config: Any, low: float, *keys: str) -> None:
    for key in keys:
        if not low <= get_key(config, key) < math.inf:
            raise UsageError(f"config key {key}: must be >= {low}, got {get_key(config, key)}")


def _fraction(config: Any, *keys: str) -> None:
    for key in keys:
        if not 0 <= get_key(config, key) <= 1:
            raise UsageError(f"config key {key}: must be in [0, 1], got {get_key(config, key)}")
