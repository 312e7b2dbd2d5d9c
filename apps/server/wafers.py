"""Wafer scoring for the API and the UI: uploads (files, zips, G85, pickles) or JSON grids -> micro-batched model
-> one score row per wafer in the store; lot reports rebuilt from the stored scores and map blobs."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apps.server.inference import WaferBatcher
from apps.server.metrics import Metrics
from apps.server.settings import Settings
from apps.store import (Actor, NewWafer, NewWaferScore, Store, add_wafer_scores, add_wafers, get_or_create_lot,
                        lot_summary, scores_for_lot, wafer_map_refs)
from pipelines.wafer.maps import SUFFIXES, WaferError, WaferMap, WaferReadError, check_grid, read_file

MAX_ZIP_MEMBERS = 20_000
MAX_ZIP_RATIO = 200.0  # uncompressed / compressed per member above 1 MiB: more is a zip bomb
MAX_MEMBER_BYTES = 256 * 1024 * 1024


class WaferUploadError(WaferError):
    """A wafer upload refused as a whole (zip bomb, too many maps, bad JSON grid)."""


@dataclass
class WaferFile:
    name: str  # client file name: the wafer's source
    data: bytes


def _read_zip(f: WaferFile, max_total: int) -> list[WaferMap | WaferReadError]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(f.data))
    except zipfile.BadZipFile as exc:
        raise WaferUploadError(f"{f.name}: not a readable zip archive ({exc})") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise WaferUploadError(f"{f.name}: {len(members)} members, more than the {MAX_ZIP_MEMBERS} accepted")
        # zipfile never yields more than a member's declared size, so checking declarations bounds what we read.
        total = sum(m.file_size for m in members)
        if total > max_total:
            raise WaferUploadError(f"{f.name}: expands to {total} bytes, over the {max_total} byte limit")
        for m in members:
            if m.file_size > MAX_MEMBER_BYTES or (m.file_size > 2**20 and
                                                  m.file_size > MAX_ZIP_RATIO * max(m.compress_size, 1)):
                raise WaferUploadError(f"{f.name}: member {m.filename!r} expands "
                                       f"{m.file_size / max(m.compress_size, 1):.0f}x to {m.file_size} bytes; "
                                       "refused as a zip bomb")
        out: list = []
        for m in sorted(members, key=lambda m: m.filename):
            name = m.filename
            if Path(name).suffix.lower() not in SUFFIXES or "__MACOSX" in name:
                continue
            member = f"{f.name}::{name}"
            try:
                data = archive.read(m)
            except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
                out.append(WaferReadError(Path(name).stem, member, f"{member}: unreadable zip member ({exc})"))
                continue
            for item in read_file(Path(name), data):
                if isinstance(item, WaferReadError):
                    out.append(WaferReadError(item.wafer_id, member, item.error.replace(name, member, 1)))
                else:
                    item.source = member + item.source[len(name):]
                    out.append(item)
        return out


def read_uploads(files: list[WaferFile], max_maps: int, max_total: int) -> list[WaferMap | WaferReadError]:
    items: list = []
    for f in files:
        if f.name.lower().endswith(".zip") or zipfile.is_zipfile(io.BytesIO(f.data)):
            items += _read_zip(f, max_total)
        else:
            items += list(read_file(Path(f.name), f.data))
        if len(items) > max_maps:
            raise WaferUploadError(f"files: more than {max_maps} wafer maps in one request; split the lot")
    if not items:
        raise WaferUploadError("files: no wafer maps found; expected " + ", ".join(SUFFIXES) + " files or a zip")
    return items


def maps_from_json(entries, max_maps: int) -> list[WaferMap]:
    if not isinstance(entries, list) or not entries:
        raise WaferUploadError("maps: expected a non-empty list of {wafer_id, grid} objects")
    if len(entries) > max_maps:
        raise WaferUploadError(f"maps: {len(entries)} maps, more than the {max_maps} accepted in one request")
    out = []
    for i, e in enumerate(entries):
        where = f"maps[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("wafer_id"), str) or not e["wafer_id"].strip():
            raise WaferUploadError(f"{where}.wafer_id: expected a non-empty string")
        slot = e.get("slot")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or not 1 <= slot <= 10_000):
            raise WaferUploadError(f"{where}.slot: expected an integer slot number, found {slot!r}")
        grid = e.get("grid")
        if not isinstance(grid, list) or not grid or not all(isinstance(r, list) for r in grid) \
                or len({len(r) for r in grid}) != 1 or len(grid) > 1024 or len(grid[0]) > 1024:
            raise WaferUploadError(f"{where}.grid: expected a rectangular list of rows of die codes 0/1/2, "
                                   "at most 1024 x 1024")
        if not all(isinstance(v, int) and not isinstance(v, bool) for r in grid for v in r):
            raise WaferUploadError(f"{where}.grid: expected integer die codes 0/1/2")
        arr = check_grid(np.asarray(grid, dtype=np.int64), f"{where}.grid")
        source = str(e.get("source") or "json")[:512]
        out.append(WaferMap(grid=arr, wafer_id=e["wafer_id"].strip()[:64], source=source, slot=slot))
    return out


def _bundle_bytes(maps: list[WaferMap]) -> bytes:
    """The request's maps as one .npz: `keys` (source, wafer_id) pairs as JSON and `map_<i>` grids."""
    buf = io.BytesIO()
    keys = json.dumps([[m.source, m.wafer_id] for m in maps])
    np.savez_compressed(buf, keys=np.frombuffer(keys.encode(), dtype=np.uint8),
                        **{f"map_{i}": m.grid for i, m in enumerate(maps)})
    return buf.getvalue()


def _bundle_maps(data: bytes) -> dict[tuple[str, str], np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        keys = json.loads(z["keys"].tobytes().decode())
        return {(source, wafer_id): z[f"map_{i}"] for i, (source, wafer_id) in enumerate(keys)}


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class WaferService:
    def __init__(self, store: Store, settings: Settings, metrics: Metrics):
        from pipelines.wafer.scoring import DEFAULT_CHECKPOINT

        self.store, self.settings, self.metrics = store, settings, metrics
        self.checkpoint = Path(settings.wafer_checkpoint or DEFAULT_CHECKPOINT)
        self._model_id: str | None = None
        self._thresholds = None
        self._known_lots: set[tuple[str, str]] = set()
        # SQLite has one writer: taking turns here avoids the store's busy-retry backoff under many clients.
        self._write_lock = threading.Lock() if store.dialect == "sqlite" else _NoLock()
        self.batcher = WaferBatcher(self._load_scorer, metrics, window_ms=settings.wafer_batch_window_ms,
                                    max_batch=settings.wafer_max_batch, defect_threshold=self.defect_threshold)

    @property
    def available(self) -> bool:
        return (self.checkpoint / "config.json").is_file() and (self.checkpoint / "model.safetensors").is_file()

    def _require_model(self) -> None:
        if not self.available:
            from apps.server.errors import ApiError

            raise ApiError(503, "model_unavailable", f"wafer scoring needs a checkpoint at {self.checkpoint} "
                                                     "(config.json + model.safetensors); train one with "
                                                     "`mmcore train wafer --out DIR` and serve with it")

    def _load_scorer(self):
        from apps.server.errors import ApiError
        from pipelines.wafer.scoring import WaferScorer

        # Intra-op threads per model call: a server runs many calls side by side, and on a small machine extra
        # torch threads fight each other (measured 10x slower with 2 threads on 2 busy cores).
        try:
            return WaferScorer(self.checkpoint, device="cpu", threads=self.settings.torch_threads)
        except WaferError as exc:  # the server's checkpoint, not the caller's input, is at fault
            raise ApiError(503, "model_unavailable", f"wafer model at {self.checkpoint}: {exc}") from exc

    @property
    def thresholds(self):
        from pipelines.wafer.scoring import Thresholds, read_wafer_meta

        if self._thresholds is None:
            try:
                self._thresholds = Thresholds.from_dict(read_wafer_meta(self.checkpoint).get("thresholds", {}))
            except (WaferError, ValueError):
                self._thresholds = Thresholds()
        return self._thresholds

    def defect_threshold(self, product: str | None) -> float:
        return self.thresholds.for_product(product).defect

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            from apps.commands.wafer import model_id_for

            self._model_id = model_id_for(self.checkpoint)
        return self._model_id

    def score(self, actor: Actor, lot_id: str, product: str, items: list[WaferMap | WaferReadError], *,
              client: str | None = None) -> list[dict]:
        """Score and store every item (read errors become error rows); results in the CLI's JSON-lines shape."""
        from apps.server.auth import require_role
        from pipelines.wafer.batch import error_result

        require_role(actor, "engineer", "admin")
        self._require_model()
        if (actor.site, lot_id) not in self._known_lots:  # site check before the model runs
            get_or_create_lot(self.store, actor, lot_id, product=product, client=client)
            self._known_lots.add((actor.site, lot_id))  # add_wafers checks the site again on every write
        maps = [m for m in items if isinstance(m, WaferMap)]
        scored = iter(self.batcher.score(maps, product or None)) if maps else iter(())
        results = [next(scored) if isinstance(item, WaferMap) else error_result(item) for item in items]
        with self.metrics.stage("wafer", "store"), self._write_lock:
            # One blob per request holds its maps (one fsync instead of one per wafer); each wafer points at it.
            bundle = self.store.put_blob(_bundle_bytes(maps)) if maps else None
            add_wafers(self.store, actor, lot_id, [NewWafer(m.wafer_id, source=m.source, slot=m.slot,
                                                            map_sha256=bundle) for m in maps], client=client)
            add_wafer_scores(self.store, actor, lot_id, [
                NewWaferScore(wafer_id=r.wafer_id, source=r.source, model_id=self.model_id,
                              probabilities=r.class_probs or {}, predicted_class=r.predicted_class,
                              defect_score=r.defect_score, anomaly_score=r.anomaly_score, status=r.status,
                              error=r.error, slot=r.slot) for r in results], client=client)
        return [r.to_json() for r in results]

    # ------------------------------------------------------------------------------------------------ reports

    def _maps(self, actor: Actor, lot_id: str) -> dict[tuple[str, str], WaferMap]:
        """The lot's stored maps, read back from their request bundles (each blob is read once)."""
        out, bundles = {}, {}
        for ref in wafer_map_refs(self.store, actor, lot_id):
            if not ref.map_sha256 or not self.store.has_blob(ref.map_sha256):
                continue
            if ref.map_sha256 not in bundles:
                with self.store.open_blob(ref.map_sha256) as f:
                    bundles[ref.map_sha256] = _bundle_maps(f.read())
            grid = bundles[ref.map_sha256].get((ref.source, ref.wafer_id))
            if grid is not None:
                out[(ref.source, ref.wafer_id)] = WaferMap(grid=grid, wafer_id=ref.wafer_id, source=ref.source,
                                                           slot=ref.slot)
        return out

    def lot_report(self, actor: Actor, lot_id: str, *, client: str | None = None):
        """The pipelines.wafer.report LotReport of a stored lot (yield, histogram, density, excursions)."""
        from pipelines.wafer.report import LotWafer, build_report

        summary = lot_summary(self.store, actor, lot_id, client=client)  # permission check and audit
        scores = scores_for_lot(self.store, actor, lot_id)
        wafers = [LotWafer(wafer_id=s.wafer_id, source=s.source, status=s.status, slot=s.slot, error=s.error,
                           predicted_class=s.predicted_class, class_probs=dict(s.probabilities or {}),
                           defect_score=s.defect_score, anomaly_score=s.anomaly_score, model_id=s.model_id)
                  for s in scores.values()]
        limits = self.thresholds.for_product(summary.product or None)
        return build_report(lot_id, summary.product, wafers, self._maps(actor, lot_id), limits.defect, limits.anomaly)

    def export(self, actor: Actor, lot_id: str, fmt: str, *, client: str | None = None) -> tuple[bytes, str, str]:
        import tempfile

        from pipelines.wafer.report import write_csv, write_json, write_pdf

        kinds = {"json": (write_json, "application/json"), "csv": (write_csv, "text/csv"),
                 "pdf": (write_pdf, "application/pdf")}
        if fmt not in kinds:
            raise WaferUploadError(f"format: expected one of {', '.join(kinds)}, found {fmt!r}")
        report = self.lot_report(actor, lot_id, client=client)
        writer, media = kinds[fmt]
        stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in lot_id)
        self.settings.upload_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.settings.upload_dir) as tmp:
            path = writer(report, Path(tmp) / f"{stem}.{fmt}")
            return Path(path).read_bytes(), media, f"{stem}.{fmt}"
