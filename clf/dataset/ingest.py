"""ImageFolder tree -> Parquet image shards, ``classes.json`` and ``manifest.json``.

The split is made from the listing alone, before any image is read: a file's split depends
only on its key and the seed (its rank in a per-class hash order), so re-ingesting a grown
archive never moves an old image between train and val.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from clf import storage
from clf.config import IngestConfig
from clf.dataset.shards import SHARD_SCHEMA, SPLITS, list_shards
from clf.errors import UsageError
from clf.images.decode import DecodeError, decode_image


@dataclass(frozen=True)
class Item:
    key: str  # path relative to the source root, with forward slashes
    label: int
    label_name: str


@dataclass
class ShardPlan:
    split: str
    src: str
    dst: str  # full URI of the shard file
    items: list[Item]
    max_pixels: int
    read_concurrency: int = storage.DEFAULT_READ_CONCURRENCY


@dataclass
class ShardResult:
    split: str
    dst: str
    written: int
    rejected: list[dict] = field(default_factory=list)


@dataclass
class IngestSummary:
    dst: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    rejected: list[dict]
    shards: int
    seconds: float

    @property
    def images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def _layout(keys: list[str]) -> bool:
    """True when the tree is already split into train/ val/ [test/]."""
    tops = {k.split("/", 1)[0] for k in keys if "/" in k}
    return "train" in tops and bool(tops & {"val", "test"}) and tops <= set(SPLITS)


def _rank(key: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def plan(cfg: IngestConfig) -> tuple[list[str], dict[str, list[Item]], list[dict]]:
    """List the source, assign classes and splits. Returns classes, items per split, rejects."""
    if not storage.is_dir(cfg.src):
        raise UsageError(f"--src {cfg.src}: no such folder or prefix")
    root = storage.normalize(cfg.src)
    keys = [storage.relative(uri, root).replace("\\", "/") for uri in storage.list_files(root)]
    keys = [k for k in keys if not posixpath.basename(k).startswith(".")]
    presplit = _layout(keys)
    depth = 3 if presplit else 2
    rejected = [
        {"key": k, "reason": "not inside a class folder"} for k in keys if k.count("/") + 1 != depth
    ]
    keys = [k for k in keys if k.count("/") + 1 == depth]
    class_of = {k: k.split("/")[-2] for k in keys}
    source = [k for k in keys if k.startswith("train/")] if presplit else keys
    classes = sorted({class_of[k] for k in source})
    if not classes:
        raise UsageError(f"--src {cfg.src}: no class folders with files (expected class/*.jpg)")
    index = {name: i for i, name in enumerate(classes)}

    splits: dict[str, list[str]] = defaultdict(list)
    unsplit = []
    for k in keys:
        if class_of[k] not in index:
            rejected.append({"key": k, "reason": f"class {class_of[k]!r} is not in train/"})
        elif presplit and not k.startswith("train/"):
            splits[k.split("/", 1)[0]].append(k)
        else:
            unsplit.append(k)
    fractions = {
        "val": 0.0 if splits.get("val") else cfg.val_fraction,
        "test": 0.0 if splits.get("test") else cfg.test_fraction,
    }
    by_class: dict[str, list[str]] = defaultdict(list)
    for k in unsplit:
        by_class[class_of[k]].append(k)
    for members in by_class.values():
        members.sort(key=lambda k: _rank(k, cfg.seed))
        n_val = round(fractions["val"] * len(members))
        n_test = round(fractions["test"] * len(members))
        splits["val"] += members[:n_val]
        splits["test"] += members[n_val : n_val + n_test]
        splits["train"] += members[n_val + n_test :]

    items = {
        split: [
            Item(k, index[class_of[k]], class_of[k])
            for k in sorted(
                splits[split], key=lambda k: _rank(k, cfg.seed)
            )  # mixed classes per shard
        ]
        for split in SPLITS
        if splits.get(split)
    }
    return classes, items, rejected


def shard_plans(cfg: IngestConfig, items: dict[str, list[Item]]) -> list[ShardPlan]:
    plans = []
    for split, members in items.items():
        for start in range(0, len(members), cfg.shard_size):
            name = f"shard-{start // cfg.shard_size:05d}.parquet"
            plans.append(
                ShardPlan(
                    split=split,
                    src=storage.normalize(cfg.src),
                    dst=storage.join(cfg.dst, split, name),
                    items=members[start : start + cfg.shard_size],
                    max_pixels=cfg.max_pixels,
                    read_concurrency=cfg.read_concurrency,
                )
            )
    return plans


def check_image(data: bytes, max_pixels: int) -> str | None:
    """None when ``data`` is a usable image, else the reason. Draft decoding keeps this cheap."""
    try:
        decode_image(data, min_size=32, max_pixels=max_pixels)
    except DecodeError as e:
        return str(e)
    return None


def write_shard(plan: ShardPlan) -> ShardResult:
    """Read, check and write one shard. The original bytes are stored, never re-encoded."""

    rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    result = ShardResult(plan.split, plan.dst, 0)
    uris = [storage.join(plan.src, item.key) for item in plan.items]
    for item, read in zip(plan.items, storage.read_many(uris, plan.read_concurrency)):
        try:
            data = read.result()
        except storage.StorageError as e:
            result.rejected.append({"key": item.key, "reason": str(e)})
            continue
        reason = check_image(data, plan.max_pixels)
        if reason:
            result.rejected.append({"key": item.key, "reason": reason})
            continue
        rows["key"].append(item.key)
        rows["image"].append(data)
        rows["label"].append(item.label)
        rows["label_name"].append(item.label_name)
    sink = io.BytesIO()
    pq.write_table(pa.table(rows, schema=SHARD_SCHEMA), sink, compression="none")
    storage.write_bytes(plan.dst, sink.getvalue())
    result.written = len(rows["key"])
    return result


def ingest(
    cfg: IngestConfig,
    *,
    run_shards: Callable[[list[ShardPlan]], Iterable[ShardResult]] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> IngestSummary:
    """Ingest ``cfg.src`` into ``cfg.dst``. ``run_shards`` maps ``write_shard`` over the plans
    (the job spreads a big source over Ray tasks); by default they are written one after another
    in this process."""
    started = time.monotonic()
    cfg.validate()
    manifest_uri = storage.join(cfg.dst, "manifest.json")
    if storage.exists(manifest_uri) and not cfg.overwrite:
        previous = storage.read_json(manifest_uri)
        if previous.get("source") != storage.normalize(cfg.src):
            raise UsageError(f"--dst {cfg.dst} already holds an ingest of {previous.get('source')}")
        if previous.get("labels"):
            raise UsageError(
                f"--dst {cfg.dst} holds labels added with --labels, which a new ingest from --src "
                "would drop; use a new --dst, or --overwrite to drop them"
            )
    classes, items, rejected = plan(cfg)
    plans = shard_plans(cfg, items)
    progress(
        f"ingest: {sum(map(len, items.values()))} files in {len(classes)} classes -> {len(plans)} shards"
    )
    results = (run_shards or (lambda ps: map(write_shard, ps)))(plans)
    for done, result in enumerate(results, 1):
        rejected += result.rejected
        progress(f"ingest: shard {done}/{len(plans)} {result.split} ({result.written} images)")
    bad = {r["key"] for r in rejected}
    counts = {
        split: Counter(i.label_name for i in members if i.key not in bad)
        for split, members in items.items()
    }
    _remove_stale_shards(cfg.dst, {p.dst for p in plans})
    storage.write_json(storage.join(cfg.dst, "classes.json"), classes)
    summary = IngestSummary(
        dst=storage.normalize(cfg.dst),
        classes=classes,
        counts={split: dict(sorted(c.items())) for split, c in counts.items()},
        rejected=sorted(rejected, key=lambda r: r["key"]),
        shards=len(plans),
        seconds=time.monotonic() - started,
    )
    storage.write_json(  # written last: its presence marks a complete ingest
        manifest_uri,
        {
            "source": storage.normalize(cfg.src),
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
            "classes": classes,
            "counts": summary.counts,
            "shards": dict(Counter(p.split for p in plans)),
            "rejected": summary.rejected,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return summary


def _remove_stale_shards(dst: str, keep: set[str]) -> None:
    for split in SPLITS:
        for uri in list_shards(storage.join(dst, split)):
            if uri not in keep:
                storage.delete(uri)
