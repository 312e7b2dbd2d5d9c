"""Server settings: where it listens, which database and data folder it uses, and the limits it enforces."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from apps.store.core import DEFAULT_DATA_DIR

MB = 1024 * 1024


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    db_url: str | None = None  # None: $MMCORE_DB_URL, else SQLite in the data folder
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("MMCORE_DATA_DIR") or DEFAULT_DATA_DIR))
    max_request_bytes: int = 512 * MB  # whole request body (uploads included)
    max_wafer_maps: int = 5000  # maps per scoring request
    wafer_batch_window_ms: float = 5.0  # requests arriving within this window are scored in one model call
    wafer_max_batch: int = 256  # maps per model call
    wafer_workers: int = 1  # concurrent wafer model calls
    ct_workers: int = 1  # concurrent CT drafts (ingest + measure + template)
    speech_workers: int = 1  # concurrent transcriptions
    torch_threads: int = 1  # intra-op threads per model call (calls already run side by side)
    # None: $MMCORE_WAFER_CHECKPOINT, else the shipped demo checkpoint (data/checkpoints/wafer)
    wafer_checkpoint: Path | None = field(default_factory=lambda: os.environ.get("MMCORE_WAFER_CHECKPOINT") or None)
    report_checkpoint: Path | None = None  # None: data/checkpoints/ct-report when present
    load_speech: bool = True  # False: voice notes are stored but not transcribed (a flag says so)
    cookie_secure: bool = False  # True behind HTTPS
    print_bootstrap: bool = True  # print the first admin's one-time password on first start

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).resolve()
        for name in ("port", "max_request_bytes", "max_wafer_maps", "wafer_max_batch", "wafer_workers", "ct_workers",
                     "speech_workers", "torch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or (name == "port" and value > 65535):
                raise ValueError(f"Settings.{name}: expected a positive integer{' <= 65535' if name == 'port' else ''}"
                                 f", found {value!r}")
        if not 0 <= self.wafer_batch_window_ms <= 1000:
            raise ValueError(f"Settings.wafer_batch_window_ms: expected 0..1000 ms, found {self.wafer_batch_window_ms}")

    @property
    def upload_dir(self) -> Path:
        """Per-request scratch folders (deleted when the request ends)."""
        return self.data_dir / "uploads"

    @property
    def gradio_dir(self) -> Path:
        """GRADIO_TEMP_DIR: the UI's file cache, inside the data folder and wiped at start-up."""
        return self.data_dir / "gradio"
