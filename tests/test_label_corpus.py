"""The bad-input corpus: every case of a messy archive gets exactly one row, and the job lives.

Real photos from ../shared/data, the same photo in every format, mode and EXIF orientation,
and the classic bad files. Entries that are not files at all (a directory named like an
image, a FIFO, dangling and looping links, a link to a parent folder) are not inputs: the
listing skips them without opening them, so they get no row. A FIFO that were opened would
block the job forever; the subprocess timeout is what catches that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR, HYMENOPTERA, IMAGENET_SAMPLES, LARGE_PHOTOS, ROOT
from PIL import Image
from test_decode import TO_STORED, encode, png_header_only

from clf.label.output import read_rows

pytestmark = pytest.mark.slow

REFERENCE = IMAGENET_SAMPLES / "n01677366_common_iguana.JPEG"  # MobileNetV2: 0.999 iguana
SAME = "same"  # labelled, and with the reference photo's label
OK = "ok"  # labelled
NOT_INPUTS = ["dir.jpg", "fifo.jpg", "dangling.jpg", "loop.jpg", "parent"]


def build_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under ``root``; returns each input's expected outcome: SAME, OK or
    a regular expression its error must match."""
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = outcome

    reference = REFERENCE.read_bytes()
    photo = Image.open(REFERENCE).convert("RGB")
    samples = sorted(os.listdir(IMAGENET_SAMPLES))

    # Real photos, as they come.
    put("reference.jpg", reference, SAME)
    for name in samples[100:105]:
        put(name, (IMAGENET_SAMPLES / name).read_bytes(), OK)
    put("greyscale.JPEG", (IMAGENET_SAMPLES / "n02096051_Airedale.JPEG").read_bytes(), OK)
    bees = HYMENOPTERA / "train" / "bees"
    put("nested/deeper/bee.JPG", (bees / sorted(os.listdir(bees))[0]).read_bytes(), OK)
    put("large-4.9MP.jpg", (LARGE_PHOTOS / "Dune.jpg").read_bytes(), OK)
    put("tiny-32px.jpg", (CIFAR / "test" / "cat" / "0000.jpg").read_bytes(), OK)
    put("no-extension", reference, SAME)

    # The reference photo in every orientation, mode and format.
    for orientation, to_stored in TO_STORED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = Image.fromarray(np.ascontiguousarray(to_stored(np.asarray(photo))))
        put(
            f"exif-{orientation}.jpg", encode(stored, "JPEG", quality=95, exif=exif.tobytes()), SAME
        )
    put("progressive.jpg", encode(photo, "JPEG", quality=95, progressive=True), SAME)
    put("cmyk.jpg", encode(photo.convert("CMYK"), "JPEG", quality=95), SAME)
    put("mode-L.png", encode(photo.convert("L"), "PNG"), OK)
    put("mode-LA.png", encode(photo.convert("LA"), "PNG"), OK)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    put("palette-transparent.png", encode(palette, "PNG", transparency=0), OK)
    put("palette-transparent.gif", encode(palette, "GIF", transparency=0), OK)
    put("rgba-opaque.png", encode(photo.convert("RGBA"), "PNG"), SAME)
    half = photo.convert("RGBA")
    half.putalpha(128)
    put("rgba-half-transparent.png", encode(half, "PNG"), OK)
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
    put("sixteen-bit.png", encode(grey16, "PNG"), OK)
    put("sixteen-bit.tif", encode(grey16, "TIFF"), OK)
    flipped = palette.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    put("animated.gif", encode(palette, "GIF", save_all=True, append_images=[flipped]), OK)
    put("lossless.webp", encode(photo, "WEBP", lossless=True), SAME)
    put("lossy.webp", encode(photo, "WEBP", quality=90), SAME)
    put("bitmap.bmp", encode(photo, "BMP"), SAME)
    put("scan.tiff", encode(photo, "TIFF", compression="tiff_lzw"), SAME)
    put("png-named.jpg", encode(photo, "PNG"), SAME)
    put("jpeg-named.png", reference, SAME)
    put("dir.jpg/inside.jpg", reference, SAME)  # the folder is walked, never read

    # Bad files: one error row each, with a short reason.
    bomb = png_header_only(30000, 30000)
    put("bomb.png", bomb, r"^image too large \(30000x30000\)$")
    put("bomb-named.jpg", bomb, r"^image too large \(30000x30000\)$")
    put("truncated.jpg", reference[: len(reference) // 3], r"^(truncated|corrupt) JPEG$")
    garbage = np.random.default_rng(0).bytes(20_000)
    put("corrupt-header.jpg", b"\xff\xd8\xff\xe0" + garbage, r"^(unreadable image header|corrupt)")
    broken = bytearray(encode(photo, "PNG"))
    broken[len(broken) // 2 : len(broken) // 2 + 64] = b"\x13" * 64
    put("corrupt-data.png", bytes(broken), r"^corrupt PNG$")
    put("random-bytes.jpg", garbage, r"^not an image$")
    put("notes.jpg", b"this is a text file, not a photo\n", r"^not an image$")
    put("error-page.png", b"<html><body>404 Not Found</body></html>\n", r"^not an image$")
    put("empty.jpg", b"", r"^empty file$")
    placeholder = (HYMENOPTERA / "train" / "ants" / "imageNotFound.gif").read_bytes()
    put("imageNotFound.gif", placeholder, r"^blank or placeholder image")

    # A link to a real file is an input like any other.
    os.symlink(root / "reference.jpg", root / "link-to-reference.jpg")
    expected["link-to-reference.jpg"] = SAME

    # Not inputs: never opened, no row.
    os.mkfifo(root / "fifo.jpg")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    os.symlink("..", root / "parent")  # followed, it would list the whole parent tree, forever
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus") / "archive"
    root.mkdir()
    return root, build_corpus(root)


def test_the_corpus_covers_every_case(corpus):
    root, expected = corpus
    assert len(expected) >= 30
    errors = [o for o in expected.values() if o not in (SAME, OK)]
    assert len(errors) >= 10 and len(expected) - len(errors) >= 30
    for name in NOT_INPUTS:
        assert os.path.lexists(root / name)
    crafted = ["mode-L.png", "mode-LA.png", "palette-transparent.png", "rgba-opaque.png"]
    crafted += ["cmyk.jpg", "sixteen-bit.png", "sixteen-bit.tif"]
    modes = {Image.open(root / name).mode for name in crafted}
    assert modes == {"L", "LA", "P", "RGBA", "CMYK", "I;16"}
    assert "transparency" in Image.open(root / "palette-transparent.png").info
    exif = {Image.open(root / f"exif-{n}.jpg").getexif()[0x0112] for n in range(1, 9)}
    assert exif == set(range(1, 9))
    assert Image.open(root / "png-named.jpg").format == "PNG"
    assert Image.open(root / "animated.gif").n_frames == 2


@pytest.mark.parametrize("small_input", ["100000", "0"], ids=["in-process", "ray"])
def test_every_input_gets_exactly_one_row_and_the_job_exits_0(
    small_input, corpus, mobilenet_artifact, tmp_path
):
    root, expected = corpus
    out = str(tmp_path / "labels")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--model", mobilenet_artifact]
        + ["--input", str(root), "--output", out, "--small-input", small_input, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a FIFO opened for reading would block here
    )
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("DeprecationWarning", "Progress bars disabled", "available CPUs"):
        assert noise not in done.stderr  # nothing for a user to act on; the last one alarms
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\ncorpus of {len(expected)} inputs: job wall time {wall:.1f}s "
        f"(pipeline {summary['seconds']:.1f}s, listing {summary['listing_seconds']:.2f}s)"
    )

    rows = read_rows(out).to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == len(expected)
    by_name = {os.path.relpath(r["uri"], root): r for r in rows}
    assert set(by_name) == set(expected)  # the FIFO, the folder and the broken links: no row

    want = by_name["reference.jpg"]["label"]
    assert want == "common iguana"
    for name, outcome in sorted(expected.items()):
        row = by_name[name]
        if outcome in (SAME, OK):
            assert row["error"] is None, (name, row["error"])
            assert row["label"] and len(row["topk_labels"]) == 5, name
            if outcome == SAME:
                assert row["label"] == want, (name, row["label"], row["confidence"])
        else:
            assert row["error"] and row["label"] is None and row["topk_scores"] is None, name
            assert re.search(outcome, row["error"]), (name, row["error"])
            assert len(row["error"]) <= 60, row["error"]
    bad = sum(o not in (SAME, OK) for o in expected.values())
    assert summary["labelled"] == len(expected) and sum(summary["errors"].values()) == bad
    assert os.path.exists(root / "fifo.jpg")  # still there, never touched
    shutil.rmtree(out)


def label_rows_by_path(model: str, src: str, out: Path) -> dict[str, list[dict]]:
    """The rows of ``src`` labelled in the job's process and through the Ray pipeline."""
    rows = {}
    for path, small_input in (("in-process", "100000"), ("ray", "0")):
        args = ["--model", model, "--input", src, "--output", str(out / path)]
        done = subprocess.run(
            [sys.executable, "-m", "jobs.label", *args, "--small-input", small_input],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows[path] = sorted(read_rows(str(out / path)).to_pylist(), key=lambda r: r["uri"])
    return rows


def assert_same_rows(rows: dict[str, list[dict]]) -> None:
    here, ray = rows["in-process"], rows["ray"]
    assert [r["uri"] for r in here] == [r["uri"] for r in ray]
    for a, b in zip(here, ray):
        for column in ("label", "label_id", "topk_labels", "model", "error"):
            assert a[column] == b[column], (a["uri"], column)
        if a["error"] is None:
            assert np.allclose(a["topk_scores"], b["topk_scores"], atol=1e-5), a["uri"]


def test_both_paths_give_every_file_of_the_corpus_the_same_row(
    corpus, mobilenet_artifact, tmp_path
):
    root, expected = corpus
    rows = label_rows_by_path(mobilenet_artifact, str(root), tmp_path)
    assert len(rows["ray"]) == len(expected)
    assert_same_rows(rows)


def test_both_paths_give_every_shard_row_the_same_row(mobilenet_artifact, tmp_path):
    from clf.config import IngestConfig
    from clf.dataset.ingest import ingest

    ingest(IngestConfig(src=str(HYMENOPTERA / "val"), dst=str(tmp_path / "data"), shard_size=50))
    rows = label_rows_by_path(mobilenet_artifact, str(tmp_path / "data" / "train"), tmp_path)
    assert len(rows["ray"]) == 122 and all("#" in r["uri"] for r in rows["ray"])
    assert_same_rows(rows)
