"""One addressing scheme for local paths, file:// and s3:// (a real S3 API on loopback)."""

import os

import pytest

from clf import storage
from clf.errors import StorageError


@pytest.mark.parametrize("scheme", ["path", "file"])
def test_local_roundtrip_and_listing(tmp_path, scheme):
    root = str(tmp_path) if scheme == "path" else f"file://{tmp_path}"
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_json(storage.join(root, "b.json"), {"k": 1})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.read_json(storage.join(root, "b.json")) == {"k": 1}
    assert storage.list_files(root) == [str(tmp_path / "a" / "x.bin"), str(tmp_path / "b.json")]
    assert not [p for p in os.listdir(tmp_path / "a") if ".tmp-" in p]  # atomic write left no temp


def test_listing_skips_pipes_and_dangling_links(tmp_path):
    (tmp_path / "real.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "real.jpg")]


def test_listing_follows_links_to_files_but_never_into_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "real.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "d" / "real.jpg", tmp_path / "link.jpg")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")  # ELOOP on open
    os.symlink("..", tmp_path / "d" / "up")  # followed, the listing would never end
    os.symlink(tmp_path / "d", tmp_path / "again")
    assert storage.list_files(str(tmp_path)) == [
        str(tmp_path / "d" / "real.jpg"),
        str(tmp_path / "link.jpg"),
    ]
    assert storage.list_files(str(tmp_path), recursive=False) == [str(tmp_path / "link.jpg")]
    assert storage.is_file(str(tmp_path / "link.jpg"))
    assert not storage.is_file(str(tmp_path / "loop.jpg"))
    assert not storage.is_file(str(tmp_path / "d"))


def test_s3_roundtrip_through_aws_endpoint_url(bucket):
    storage.write_bytes(f"{bucket}/run/x.bin", b"abc")
    storage.write_json(f"{bucket}/run/sub/meta.json", {"a": [1, 2]})
    assert storage.read_bytes(f"{bucket}/run/x.bin") == b"abc"
    assert storage.list_files(f"{bucket}/run") == [
        f"{bucket}/run/sub/meta.json",
        f"{bucket}/run/x.bin",
    ]
    assert storage.is_dir(f"{bucket}/run") and storage.exists(f"{bucket}/run/x.bin")


def test_total_bytes_sums_every_object_under_a_prefix(bucket):
    storage.write_bytes(f"{bucket}/split/a.parquet", b"abc")
    storage.write_bytes(f"{bucket}/split/sub/b.parquet", b"defgh")
    assert storage.total_bytes(f"{bucket}/split") == 8
    assert storage.total_bytes(f"{bucket}/no-such-split") == 0


def test_missing_object_is_a_one_line_error_naming_the_uri(bucket):
    with pytest.raises(StorageError, match=f"not found: {bucket}/nope"):
        storage.read_bytes(f"{bucket}/nope")


def test_unknown_scheme_is_refused():
    with pytest.raises(StorageError, match="unsupported URI scheme gs://"):
        storage.normalize("gs://bucket/x")
