import hashlib
import io
import os
import time

import pytest

from apps.store import NotFoundError, StoreError
from apps.store.blobs import STALE_TEMP_S, BlobStore, copy_blob


def test_put_names_blobs_by_sha256_and_deduplicates(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha[2:]
    source = tmp_path / "scan.dcm"
    source.write_bytes(data)
    assert blobs.put(source) == sha == blobs.put(str(source)) == blobs.put(io.BytesIO(data))
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [blobs.path(sha)]  # one copy, no temps
    with blobs.open(sha) as f:
        assert f.read() == data
    assert copy_blob(blobs, sha, tmp_path / "out.dcm").read_bytes() == data


def test_bad_names_and_missing_blobs(tmp_path):
    blobs = BlobStore(tmp_path)
    with pytest.raises(StoreError, match="expected 64 lowercase hex digits"):
        blobs.path("../../etc/passwd")
    with pytest.raises(NotFoundError, match="not in"):
        blobs.open("0" * 64)
    assert not blobs.exists("0" * 64)
    with pytest.raises(NotFoundError, match="expected a file to store as a blob, found a folder"):
        blobs.put(tmp_path)
    with pytest.raises(StoreError, match="expected bytes, a path or a binary file, found int"):
        blobs.put(42)
    with pytest.raises(StoreError, match="expected a binary file, found one giving str"):
        blobs.put(io.StringIO("text mode"))
    assert list((tmp_path / "tmp").iterdir()) == []  # failed puts leave no temp file


def test_stale_temp_files_are_removed_on_open(tmp_path):
    BlobStore(tmp_path)
    stale, fresh = tmp_path / "tmp" / "blob-old", tmp_path / "tmp" / "blob-new"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"being written right now")
    old = time.time() - STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    BlobStore(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_store_delegates_to_its_blob_folder(store):
    sha = store.put_blob(b"audio")
    assert store.has_blob(sha) and store.blob_path(sha).read_bytes() == b"audio"
    assert store.blob_path(sha).is_relative_to(store.data_dir / "blobs")
