"""Ingest: deterministic stratified splits from the listing, original bytes, rejects with reasons."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import HYMENOPTERA, job_json, run_in_process

from clf.config import IngestConfig
from clf.dataset.ingest import ingest, plan
from clf.errors import UsageError


@pytest.fixture(scope="module")
def flat_tree(tmp_path_factory):
    """hymenoptera's two classes without its train/val split, plus two bad files."""
    root = tmp_path_factory.mktemp("flat")
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (root / cls).mkdir(exist_ok=True)
            for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:30]:
                (root / cls / f"{split}-{f.name}").write_bytes(f.read_bytes())
    (root / "ants" / "empty.jpg").write_bytes(b"")
    (root / "bees" / "notes.jpg").write_text("not an image")
    whole = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[-1].read_bytes()
    (root / "bees" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    return root


def test_split_is_stratified_and_deterministic(flat_tree):
    cfg = IngestConfig(src=str(flat_tree), dst="unused", val_fraction=0.25, test_fraction=0.25)
    _, first, _ = plan(cfg)
    _, again, _ = plan(cfg)
    assert first == again
    for split in ("val", "test"):
        names = [i.label_name for i in first[split]]
        assert abs(names.count("ants") - names.count("bees")) <= 1
    keys = [i.key for split in first.values() for i in split]
    assert len(keys) == len(set(keys)) == 123  # 120 photos + 3 bad files


def test_another_seed_gives_another_split(flat_tree):
    a = plan(IngestConfig(src=str(flat_tree), dst="x", seed=0))[1]["val"]
    b = plan(IngestConfig(src=str(flat_tree), dst="x", seed=1))[1]["val"]
    assert {i.key for i in a} != {i.key for i in b}


def test_presplit_tree_keeps_its_split_and_rejects_the_gif(tmp_path):
    summary = ingest(IngestConfig(src=str(HYMENOPTERA), dst=str(tmp_path)))
    assert summary.counts == {"train": {"ants": 123, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rejected"] == [
        {
            "key": "train/ants/imageNotFound.gif",
            "reason": "blank or placeholder image (94% one colour)",
        }
    ]
    assert json.loads((tmp_path / "classes.json").read_text()) == ["ants", "bees"]
    table = pq.read_table(tmp_path / "val" / "shard-00000.parquet")
    assert table.schema.names == ["key", "image", "label", "label_name"]
    key = table.column("key")[0].as_py()
    assert table.column("image")[0].as_py() == (HYMENOPTERA / key).read_bytes()  # never re-encoded


def test_bad_files_are_listed_as_rejected(flat_tree, tmp_path):
    summary = ingest(IngestConfig(src=str(flat_tree), dst=str(tmp_path), shard_size=16))
    assert {r["key"]: r["reason"] for r in summary.rejected} == {
        "ants/empty.jpg": "empty file",
        "bees/notes.jpg": "not an image",
        "bees/truncated.jpg": "truncated JPEG",
    }
    assert summary.images == 120
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    written = sum(pq.read_metadata(f).num_rows for f in tmp_path.glob("*/*.parquet"))
    assert written == 120
    assert manifest["shards"]["train"] == len(list((tmp_path / "train").glob("*.parquet"))) > 1


def test_missing_source_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        ingest(IngestConfig(src=str(tmp_path / "nope"), dst=str(tmp_path / "out")))


def test_the_job_writes_a_small_source_without_starting_ray(flat_tree, tmp_path):
    """A few shards are written sooner than Ray starts; a bigger source runs as Ray tasks
    (tests/test_s3_faults.py ingests 8 shards that way, through a faulty S3)."""
    done = run_in_process("jobs.ingest", "--src", str(flat_tree), "--dst", str(tmp_path), "--json")
    summary = job_json(done)  # run_in_process also checks that Ray never started
    assert summary["images"] == 120 and summary["shards"] == 2


# ----- corrected labels back in (jobs.ingest --labels)


@pytest.fixture
def ingested(flat_tree, tmp_path):
    dst = str(tmp_path / "data")
    ingest(IngestConfig(src=str(flat_tree), dst=dst, val_fraction=0.25, shard_size=16))
    return dst


def labels_csv(path, rows) -> str:
    path.write_text("uri,label,confidence\n" + "".join(f"{u},{lab},0.5\n" for u, lab in rows))
    return str(path)


def shard_rows(dst: str) -> dict[str, tuple[str, str]]:
    """key -> (split, class) of every image the ingest holds."""
    import glob

    rows = {}
    for shard in glob.glob(f"{dst}/*/*.parquet"):
        split = shard.rsplit("/", 2)[1]
        table = pq.read_table(shard, columns=["key", "label_name"]).to_pylist()
        rows |= {r["key"]: (split, r["label_name"]) for r in table}
    return rows


def ingest_labels(*args):
    return run_in_process("jobs.ingest", *args, "--json")


def test_labelled_images_join_train_as_new_shards_with_their_classes(ingested, tmp_path):
    new = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[-5:]
    csv = labels_csv(tmp_path / "review.csv", [(f, "bees") for f in new[:3]] + [(new[3], "ants")])
    before = json.loads(open(f"{ingested}/manifest.json").read())
    summary = job_json(ingest_labels("--labels", csv, "--dst", ingested))
    assert summary["added"] == {"train": 4} and summary["relabelled"] == 0
    rows = shard_rows(ingested)
    assert rows[str(new[0])] == ("train", "bees") and rows[str(new[3])] == ("train", "ants")
    manifest = json.loads(open(f"{ingested}/manifest.json").read())
    counts = before["counts"]["train"]
    assert manifest["counts"]["train"] == {"ants": counts["ants"] + 1, "bees": counts["bees"] + 3}
    assert manifest["counts"]["val"] == before["counts"]["val"]
    assert manifest["labels"][0]["added"] == {"train": 4}
    again = job_json(ingest_labels("--labels", csv, "--dst", ingested))  # nothing twice
    assert again["added"] == {} and again["unchanged"] == 4
    assert len(shard_rows(ingested)) == len(rows)


def test_an_image_the_ingest_holds_keeps_its_split_and_takes_the_corrected_class(
    ingested, tmp_path
):
    import glob

    shard = sorted(glob.glob(f"{ingested}/val/*.parquet"))[0]
    key, name = pq.read_table(shard, columns=["key", "label_name"]).to_pylist()[0].values()
    other = "bees" if name == "ants" else "ants"
    csv = labels_csv(tmp_path / "fix.csv", [(f"{shard}#{key}", other)])
    summary = job_json(ingest_labels("--labels", csv, "--dst", ingested, "--split", "test"))
    assert summary["relabelled"] == 1 and summary["added"] == {}
    assert shard_rows(ingested)[key] == ("val", other)
    labels = pq.read_table(shard, columns=["key", "label"]).to_pylist()
    assert labels[0] == {"key": key, "label": ["ants", "bees"].index(other)}


def test_an_unknown_class_or_an_unreadable_image_refuses_the_whole_file(ingested, tmp_path):
    good = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[-1]
    before = shard_rows(ingested), open(f"{ingested}/manifest.json").read()
    cases = {
        "wasp": ([(good, "ants"), (good.with_name("x.jpg"), "wasps")], "class 'wasps' is not"),
        "gone": ([(good, "ants"), (tmp_path / "gone.jpg", "bees")], "gone.jpg"),
        "not an image": ([(good, "ants"), (tmp_path / "labels.csv", "bees")], "not an image"),
        "both": ([(good, "ants"), (good, "bees")], "labelled both ants and bees"),
    }
    for name, (rows, message) in cases.items():
        done = ingest_labels(
            "--labels", labels_csv(tmp_path / "labels.csv", rows), "--dst", ingested
        )
        error = done.stderr.strip().splitlines()[-1]  # after the progress lines
        assert done.returncode == 2 and error.startswith("jobs.ingest: error:"), done.stderr
        assert message in error, (name, error)
        assert (shard_rows(ingested), open(f"{ingested}/manifest.json").read()) == before, name


def test_labels_need_an_existing_ingest_and_are_never_dropped_by_a_new_one(
    flat_tree, ingested, tmp_path
):
    good = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[-1]
    csv = labels_csv(tmp_path / "labels.csv", [(good, "ants")])
    done = ingest_labels("--labels", csv, "--dst", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "no manifest.json" in done.stderr
    done = ingest_labels("--labels", csv, "--src", str(flat_tree), "--dst", ingested)
    assert done.returncode == 2 and "not both" in done.stderr
    job_json(ingest_labels("--labels", csv, "--dst", ingested))
    done = ingest_labels("--src", str(flat_tree), "--dst", ingested)
    assert done.returncode == 2 and "a new ingest from --src would drop" in done.stderr
