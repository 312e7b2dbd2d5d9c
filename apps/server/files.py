"""Which user may fetch which file of the UI's cache.

Gradio's cache does no per-user authorisation. Every file the UI shows is either an upload (registered from the
upload response) or an image the server rendered into a fresh folder of the cache (registered when written), so a
URL for any other file, or someone else's, is refused. Downloads of stored results never touch the cache: they are
FastAPI routes that check ownership in the store.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path


class FileRegistry:
    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir).resolve()
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Wipe the cache folder (start-up): nothing from a previous run stays reachable."""
        if self.cache_dir.exists():
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.cache_dir, 0o700)

    def _key(self, path: str | Path) -> str | None:
        try:
            resolved = Path(path).resolve()
        except (OSError, ValueError):
            return None
        if not resolved.is_relative_to(self.cache_dir):
            return None
        return str(resolved)

    def register(self, user: str, path: str | Path) -> None:
        key = self._key(path)
        if key is not None:
            with self._lock:
                self._owners.setdefault(key, user)

    def allowed(self, user: str, path: str | Path) -> bool:
        key = self._key(path)
        with self._lock:
            return key is not None and self._owners.get(key) == user

    def forget(self, path: str | Path) -> None:
        """Drop an upload once its bytes are in the store, and delete it from the cache."""
        key = self._key(path)
        if key is None:
            return
        with self._lock:
            self._owners.pop(key, None)
        Path(key).unlink(missing_ok=True)
        try:
            Path(key).parent.rmdir()  # Gradio puts each upload in its own folder
        except OSError:
            pass

    def write(self, user: str, name: str, data: bytes) -> str:
        """Write `data` as a new cache file owned by `user`; returns its path (Gradio keeps cache files in place)."""
        folder = self.cache_dir / f"u{secrets.token_hex(12)}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(name).name
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.register(user, path)
        return str(path)
