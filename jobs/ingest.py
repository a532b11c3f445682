"""jobs.ingest: an ImageFolder tree -> Parquet image shards, classes.json and manifest.json.

With --labels CSV instead of --src: add the images of a CSV of uri,label (a filled-in review.csv
from jobs.monitor) to the ingest at --dst, as new shards; an image --dst already holds keeps its
split and takes the corrected class."""

from __future__ import annotations

from dataclasses import asdict

from clf import cli, runtime, storage
from clf.config import IngestConfig
from clf.dataset.add_labels import add_labels
from clf.dataset.ingest import ingest, write_shard
from clf.dataset.shards import SPLITS
from clf.errors import UsageError


def build_parser():
    p = cli.parser("ingest", __doc__)
    p.add_argument(
        "--src",
        type=cli.location,
        help="ImageFolder tree (class/*.jpg) or train/ val/ [test/]",
    )
    p.add_argument(
        "--labels",
        type=cli.location,
        help="instead of --src: a CSV of uri,label to add to the ingest at --dst",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default=IngestConfig.split,
        help="--labels: the split of images --dst does not hold yet",
    )
    p.add_argument("--dst", type=cli.location, required=True, help="output folder or s3:// prefix")
    p.add_argument(
        "--val-fraction",
        type=cli.fraction,
        default=IngestConfig.val_fraction,
        help="when src has no val/",
    )
    p.add_argument(
        "--test-fraction",
        type=cli.fraction,
        default=IngestConfig.test_fraction,
        help="when src has no test/",
    )
    p.add_argument(
        "--seed", type=int, default=IngestConfig.seed, help="seed of the stratified split"
    )
    p.add_argument(
        "--shard-size",
        type=cli.positive_int,
        default=IngestConfig.shard_size,
        help="images per shard",
    )
    p.add_argument(
        "--max-pixels",
        type=cli.positive_int,
        default=IngestConfig.max_pixels,
        help="larger images are rejected from the header, before decoding (decompression bombs)",
    )
    cli.add_read_concurrency_flag(p, IngestConfig, "per shard")
    p.add_argument("--overwrite", action="store_true", help="replace an ingest of another source")
    return p


# This process writes a few shards sooner than an embedded Ray starts, runs them and stops.
LOCAL_SHARDS = 3


def run_shards(plans):
    """Write a small source's shards here; spread a bigger one over the Ray cluster."""
    if len(plans) <= LOCAL_SHARDS:
        return map(write_shard, plans)
    runtime.init_ray()
    return run_on_ray(plans)


def run_on_ray(plans):
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(write_shard)
    pending = [task.remote(plan) for plan in plans]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def main() -> None:
    args = build_parser().parse_args()
    cfg = cli.config_from_args(IngestConfig, args).validate()
    if cfg.labels:
        return add_labels_main(cfg, args.json)
    if not storage.is_dir(cfg.src):
        what = "a file, not a folder" if storage.exists(cfg.src) else "no such folder or prefix"
        raise UsageError(f"--src {cfg.src}: {what}")
    summary = ingest(cfg, run_shards=run_shards, progress=cli.progress(args.json))
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in summary.counts.items())
    lines = [
        f"ingested {summary.images} images in {len(summary.classes)} classes into {summary.dst} "
        f"({summary.shards} shards, {summary.seconds:.1f}s)",
        f"splits: {counts}",
        f"rejected: {len(summary.rejected)}",
        *[f"  {r['key']}: {r['reason']}" for r in summary.rejected[:10]],
    ]
    cli.emit(asdict(summary) | {"images": summary.images}, lines, args.json)


def add_labels_main(cfg: IngestConfig, as_json: bool) -> None:
    summary = add_labels(cfg, progress=cli.progress(as_json))
    added = ", ".join(f"{split} {n}" for split, n in summary.added.items()) or "none"
    lines = [
        f"added labelled images to {summary.dst}: {added}; {summary.relabelled} relabelled, "
        f"{summary.unchanged} unchanged ({len(summary.shards)} shards written, "
        f"{summary.seconds:.1f}s)"
    ]
    cli.emit(asdict(summary), lines, as_json)


if __name__ == "__main__":
    cli.run("ingest", main)
