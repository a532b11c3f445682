"""Labels a person gave back (a CSV of ``uri,label``, such as a filled-in ``review.csv`` from
``jobs.monitor``) added to an existing ingest output, all or nothing.

An image the output does not hold yet goes into new shards of one split (train by default); one
it holds keeps its split, and its shard is rewritten with the corrected class. Every class is
checked against ``classes.json`` and every new image is read and checked before anything is
written; ``manifest.json`` is rewritten last.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from clf import storage
from clf.config import IngestConfig
from clf.dataset.ingest import check_image
from clf.dataset.shards import (
    SHARD_SCHEMA,
    SPLITS,
    list_shards,
    read_classes,
    read_images,
    read_shard,
    split_ref,
)
from clf.errors import UsageError

SHOWN_PROBLEMS = 5  # problems named in the one-line error; the count says how many in all


@dataclass
class AddLabelsSummary:
    dst: str
    added: dict[str, int] = field(default_factory=dict)  # split -> new images
    relabelled: int = 0  # images the output held, now with another class
    unchanged: int = 0  # images the output held, with the class they already had
    shards: list[str] = field(default_factory=list)  # written or rewritten
    seconds: float = 0.0


@dataclass(frozen=True)
class Held:
    split: str
    shard: str
    label_name: str


def add_labels(
    cfg: IngestConfig, progress: Callable[[str], None] = lambda message: None
) -> AddLabelsSummary:
    started = time.monotonic()
    manifest_uri = storage.join(cfg.dst, "manifest.json")
    if not storage.exists(manifest_uri):
        raise UsageError(
            f"--dst {cfg.dst}: no manifest.json; --labels adds to a jobs.ingest output"
        )
    manifest = storage.read_json(manifest_uri)
    classes = read_classes(cfg.dst)
    wanted = read_label_csv(cfg.labels, classes)
    held = held_images(cfg.dst)
    summary = AddLabelsSummary(storage.normalize(cfg.dst))
    new: list[tuple[str, str, str]] = []  # (uri, key, class)
    relabel: dict[str, dict[str, str]] = defaultdict(dict)  # shard -> key -> class
    for uri, label in wanted.items():
        key = key_of(uri, cfg.dst, manifest["source"])
        if key not in held:
            new.append((uri, key, label))
        elif held[key].label_name == label:
            summary.unchanged += 1
        else:
            relabel[held[key].shard][key] = label
    progress(
        f"ingest --labels: {len(new)} new images, {sum(map(len, relabel.values()))} relabelled"
    )
    images = read_new(new, cfg.max_pixels)

    counts = {split: Counter(c) for split, c in manifest["counts"].items()}
    summary.shards += write_new_shards(cfg, new, images, classes, counts)
    summary.shards += relabel_shards(relabel, held, classes, counts)
    summary.added = {cfg.split: len(new)} if new else {}
    summary.relabelled = sum(map(len, relabel.values()))
    manifest["counts"] = {
        s: dict(sorted((k, v) for k, v in c.items() if v)) for s, c in counts.items()
    }
    manifest["shards"] = {s: len(list_shards(storage.join(cfg.dst, s))) for s in counts}
    manifest.setdefault("labels", []).append(
        {
            "file": storage.normalize(cfg.labels),
            "added": summary.added,
            "relabelled": summary.relabelled,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    storage.write_json(manifest_uri, manifest)
    summary.seconds = time.monotonic() - started
    return summary


def write_new_shards(
    cfg: IngestConfig,
    new: list[tuple[str, str, str]],
    images: list[bytes],
    classes: list[str],
    counts: dict[str, Counter],
) -> list[str]:
    """``new`` images as ``labels-*.parquet`` shards of ``cfg.split``, named by their keys so
    that the same CSV writes the same files; ``counts`` learn of them."""
    index = {name: i for i, name in enumerate(classes)}
    written = []
    for start in range(0, len(new), cfg.shard_size):
        chunk = new[start : start + cfg.shard_size]
        rows = {
            "key": [key for _, key, _ in chunk],
            "image": images[start : start + len(chunk)],
            "label": [index[label] for _, _, label in chunk],
            "label_name": [label for _, _, label in chunk],
        }
        digest = hashlib.sha256("\n".join(rows["key"]).encode()).hexdigest()[:16]
        shard = storage.join(cfg.dst, cfg.split, f"labels-{digest}.parquet")
        _write(shard, pa.table(rows, schema=SHARD_SCHEMA))
        written.append(shard)
        counts.setdefault(cfg.split, Counter()).update(rows["label_name"])
    return written


def relabel_shards(
    relabel: dict[str, dict[str, str]],
    held: dict[str, Held],
    classes: list[str],
    counts: dict[str, Counter],
) -> list[str]:
    """Each shard in ``relabel`` rewritten whole, its named keys with their new class."""
    index = {name: i for i, name in enumerate(classes)}
    for shard, keys in relabel.items():
        table = read_shard(shard, SHARD_SCHEMA.names)
        old = table.column("label_name").to_pylist()
        names = [keys.get(k, name) for k, name in zip(table.column("key").to_pylist(), old)]
        for key, label in keys.items():
            counts[held[key].split][held[key].label_name] -= 1
            counts[held[key].split][label] += 1
        labels = pa.array([index[n] for n in names], pa.int32())
        table = table.set_column(SHARD_SCHEMA.get_field_index("label"), "label", labels)
        names = pa.array(names, pa.string())
        table = table.set_column(SHARD_SCHEMA.get_field_index("label_name"), "label_name", names)
        _write(shard, table)
    return list(relabel)


def read_label_csv(uri: str, classes: list[str]) -> dict[str, str]:
    """uri -> class of a CSV with ``uri`` and ``label`` columns (others are ignored), checked."""
    if not storage.is_file(uri):
        raise UsageError(f"--labels {uri}: no such file")
    options = pcsv.ConvertOptions(
        include_columns=["uri", "label"],
        column_types={"uri": pa.string(), "label": pa.string()},
        strings_can_be_null=False,
    )
    try:
        table = pcsv.read_csv(io.BytesIO(storage.read_bytes(uri)), convert_options=options)
    except pa.ArrowInvalid as e:
        raise UsageError(f"--labels {uri}: not a CSV with uri and label columns ({e})") from None
    known, problems, wanted = set(classes), [], {}
    for line, (image, label) in enumerate(zip(*table.to_pydict().values()), start=2):
        image, label = image.strip(), label.strip()
        if not image or not label:
            problems.append(f"line {line}: no {'uri' if not image else 'label'}")
        elif label not in known:
            problems.append(f"line {line}: class {label!r} is not in classes.json")
        elif wanted.setdefault(image, label) != label:
            problems.append(f"line {line}: {image} is labelled both {wanted[image]} and {label}")
    if not wanted and not problems:
        problems.append("no rows")
    _refuse(f"--labels {uri}", problems)
    return wanted


def held_images(dst: str) -> dict[str, Held]:
    """Every image key the output holds, with its split, shard and class."""
    held = {}
    for split in SPLITS:
        for shard in list_shards(storage.join(dst, split)):
            table = read_shard(shard, ["key", "label_name"])
            for key, name in zip(table["key"].to_pylist(), table["label_name"].to_pylist()):
                held[key] = Held(split, shard, name)
    return held


def key_of(uri: str, dst: str, source: str) -> str:
    """The shard key an image has, or would have, in the output: a row of one of its own shards
    keeps its key; a file under the ingest's source its path there; anything else its URI."""
    ref = split_ref(uri)
    if ref and storage.normalize(ref[0]).startswith(storage.normalize(dst) + "/"):
        return ref[1]
    if ref:
        return f"{storage.normalize(ref[0])}#{ref[1]}"
    where = storage.normalize(uri)
    return storage.relative(where, source) if where.startswith(source + "/") else where


def read_new(new: list[tuple[str, str, str]], max_pixels: int) -> list[bytes]:
    """The new images' bytes, each read and checked as an ingest checks it; any failure refuses
    them all."""
    images, problems = [], []
    for (uri, _, _), data in zip(new, read_images([uri for uri, _, _ in new])):
        if isinstance(data, Exception):
            problems.append(str(data))  # which names the URI
        elif reason := check_image(data, max_pixels):
            problems.append(f"{uri}: {reason}")
        images.append(data)
    _refuse("--labels", problems, "nothing was added")
    return images


def _refuse(what: str, problems: list[str], then: str = "") -> None:
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = (
            f" and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        )
        raise UsageError(
            f"{what}: {len(problems)} problem(s): {shown}{more}" + (f"; {then}" if then else "")
        )


def _write(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none")
    storage.write_bytes(uri, sink.getvalue())
