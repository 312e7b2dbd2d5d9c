"""Content-addressed blob folder: DICOM files, audio, wafer maps, exports.

A blob's name is the sha256 of its bytes (`blobs/ab/cdef...`), so equal content is stored once and a name always
tells whether the bytes are intact. Writes go to `blobs/tmp/`, are fsynced, then renamed into place: a crash
leaves at most a stray temp file, never a partial blob under its final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from apps.store.errors import NotFoundError, StoreError

CHUNK = 1 << 20  # bytes per read while hashing and copying
STALE_TEMP_S = 3600  # temp files older than this are left over from a crash and removed on open
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    def put(self, data: bytes | str | Path | BinaryIO) -> str:
        """Store bytes, a file path or a readable binary file; return the sha256 (hex) that names it."""
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in _chunks(data):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.path(sha, must_exist=False)
            if final.exists():
                tmp.unlink()
                return sha
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def path(self, sha256: str, must_exist: bool = True) -> Path:
        if not isinstance(sha256, str) or not SHA256_HEX.match(sha256):
            raise StoreError(f"blob name {sha256!r}: expected 64 lowercase hex digits (a sha256)")
        path = self.root / sha256[:2] / sha256[2:]
        if must_exist and not path.is_file():
            raise NotFoundError(f"blob {sha256}: not in {self.root}")
        return path

    def exists(self, sha256: str) -> bool:
        return self.path(sha256, must_exist=False).is_file()

    def open(self, sha256: str) -> BinaryIO:
        return self.path(sha256).open("rb")

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for leftover in self.tmp.glob("blob-*"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            except FileNotFoundError:
                pass  # another process cleaned it first


def _chunks(data: bytes | str | Path | BinaryIO):
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
    elif isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise NotFoundError(f"{path}: expected a file to store as a blob, found "
                                f"{'a folder' if path.is_dir() else 'nothing'}")
        with path.open("rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")
    elif hasattr(data, "read"):
        for chunk in iter(lambda: data.read(CHUNK), b""):
            if not isinstance(chunk, (bytes, bytearray)):
                raise StoreError(f"blob data: expected a binary file, found one giving {type(chunk).__name__}")
            yield bytes(chunk)
    else:
        raise StoreError(f"blob data: expected bytes, a path or a binary file, found {type(data).__name__}")


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_blob(blobs: BlobStore, sha256: str, dest: str | Path) -> Path:
    """Copy a blob out to `dest` (exports); atomic like `put`."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with blobs.open(sha256) as src, tmp.open("wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return dest
