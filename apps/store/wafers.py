"""Wafer lots, wafers and their scores, with a bulk path fast enough for factory batches.

Scores are written in batches, one transaction per batch (all or nothing), straight to the driver: executemany on
SQLite, COPY on PostgreSQL. Wafers a batch mentions that the lot does not hold yet are created in the same
transaction (INSERT ... ON CONFLICT DO NOTHING, so concurrent writers of the same lot do not collide).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

from sqlalchemy import func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from apps.store.accounts import check_site
from apps.store.audit import act, read_or_record_denial, record, require_role
from apps.store.core import Actor, Store
from apps.store.errors import ConflictError, NotFoundError, PermissionDenied, StoreError
from apps.store.models import SCORE_STATUSES, Wafer, WaferLot, WaferScore, utcnow

LOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._#:/+-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
WAFER_ROLES = ("engineer", "admin")
DEFAULT_BATCH = 5000
DEFAULT_SITE = "main"  # where the system operator's lots go unless told otherwise (also users' default site)
SCORE_COLUMNS = ("wafer_pk", "model_id", "probabilities", "predicted_class", "defect_score", "anomaly_score",
                 "status", "error", "scored_at")
WaferKey = tuple[str, str]  # (source, wafer_id)
# One encoder for every row: json.dumps with keyword arguments builds a new encoder per call (several times slower).
# `default=float` turns numpy scalars into plain numbers.
_to_json = json.JSONEncoder(default=float, allow_nan=False).encode


@dataclasses.dataclass(frozen=True)
class NewWafer:
    wafer_id: str
    source: str = ""
    slot: int | None = None
    map_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class NewWaferScore:
    wafer_id: str
    source: str
    model_id: str
    probabilities: dict[str, float]
    predicted_class: str | None = None
    defect_score: float | None = None
    anomaly_score: float | None = None
    status: str = "ok"
    error: str | None = None
    slot: int | None = None


@dataclasses.dataclass(frozen=True)
class LotInfo:
    id: int
    lot_id: str
    product: str
    site: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class WaferScoreInfo:
    wafer_id: str
    source: str
    slot: int | None
    model_id: str
    probabilities: dict
    predicted_class: str | None
    defect_score: float | None
    anomaly_score: float | None
    status: str
    error: str | None
    scored_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class WaferMapRef:
    """Where a wafer's map is kept: the blob holding it (one blob may hold a whole request's maps)."""

    wafer_id: str
    source: str
    slot: int | None
    map_sha256: str | None  # None when the wafer was registered without its map


@dataclasses.dataclass(frozen=True)
class LotSummary:
    lot_id: str
    product: str
    site: str
    wafers: int
    scored: int  # wafers with at least one score
    errors: int  # wafers whose newest score is an error
    class_counts: dict[str, int]  # predicted class of the newest ok score -> wafers
    mean_defect_score: float | None
    max_anomaly_score: float | None
    model_ids: list[str]


# --- validation ------------------------------------------------------------------------------------------------


def check_lot_id(lot_id) -> str:
    if not isinstance(lot_id, str) or not LOT_ID.match(lot_id):
        raise StoreError(f"lot_id {lot_id!r}: expected 1-64 letters, digits or . _ # : / + -")
    return lot_id


def _bad(where: str, field: str, expected: str, found) -> StoreError:
    return StoreError(f"{where}.{field}: expected {expected}, found {found!r:.80}")


def _check_wafer_key(where: str, wafer_id, source, slot) -> None:
    if not isinstance(wafer_id, str) or not 0 < len(wafer_id) <= 64:
        raise _bad(where, "wafer_id", "text of 1-64 characters", wafer_id)
    if not isinstance(source, str) or len(source) > 512:
        raise _bad(where, "source", "text of at most 512 characters", source)
    if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= 1000):
        raise _bad(where, "slot", "a slot number 0..1000 or None", slot)


def _finite(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(value)
    except TypeError:
        return False


def _float(value) -> float | None:
    return None if value is None else float(value)  # numpy scalars -> Python floats the drivers accept


def _probabilities_ok(probs) -> bool:
    if type(probs) is not dict:
        return False
    try:
        # NaN and infinities fail the range test; text and None raise TypeError.
        return all(type(k) is str and type(v) is not bool and 0.0 <= v <= 1.0 for k, v in probs.items())
    except TypeError:
        return False


def check_score(i: int, s: NewWaferScore) -> None:
    where = f"scores[{i}]"
    if not isinstance(s, NewWaferScore):
        raise StoreError(f"{where}: expected apps.store.NewWaferScore, found {type(s).__name__}")
    _check_wafer_key(where, s.wafer_id, s.source, s.slot)
    if not isinstance(s.model_id, str) or not 0 < len(s.model_id) <= 128:
        raise _bad(where, "model_id", "text of 1-128 characters", s.model_id)
    if not _probabilities_ok(s.probabilities):
        raise _bad(where, "probabilities", "a dict of class name -> probability in [0, 1]", s.probabilities)
    if s.predicted_class is not None and (not isinstance(s.predicted_class, str) or len(s.predicted_class) > 64):
        raise _bad(where, "predicted_class", "text of at most 64 characters or None", s.predicted_class)
    for field in ("defect_score", "anomaly_score"):
        value = getattr(s, field)
        if value is not None and not _finite(value):
            raise _bad(where, field, "a finite number or None", value)
    if s.status not in SCORE_STATUSES:
        raise _bad(where, "status", f"one of {SCORE_STATUSES}", s.status)
    if (s.status == "error") != isinstance(s.error, str) or (s.error is not None and not s.error.strip()):
        raise _bad(where, "error", "a message when status is 'error' and None when 'ok'", s.error)


# --- access ----------------------------------------------------------------------------------------------------


def lot_for(session: Session, actor: Actor, lot_id: str, action: str) -> tuple[Actor, WaferLot]:
    me = require_role(session, actor, WAFER_ROLES, action, "lot", lot_id)
    lot = session.scalars(select(WaferLot).where(WaferLot.lot_id == lot_id)).one_or_none()
    if lot is None:
        raise NotFoundError(f"lot {lot_id!r}: no such lot; create it with get_or_create_lot")
    if me.role != "admin" and lot.site != me.site:
        raise PermissionDenied(f"{me.username} (site {me.site}) is not allowed {action} on lot {lot_id}: it "
                               f"belongs to site {lot.site}", action, "lot", lot_id)
    return me, lot


def _lot_info(lot: WaferLot) -> LotInfo:
    return LotInfo(lot.id, lot.lot_id, lot.product, lot.site, lot.created_at)


# --- lots and wafers -------------------------------------------------------------------------------------------


def get_or_create_lot(store: Store, actor: Actor, lot_id: str, product: str = "", site: str | None = None, *,
                      client: str | None = None) -> LotInfo:
    check_lot_id(lot_id)
    if not isinstance(product, str) or len(product) > 64:
        raise StoreError(f"product: expected text of at most 64 characters, found {product!r:.80}")
    if site is not None:
        check_site(site)

    def run(session: Session) -> LotInfo:
        me = require_role(session, actor, WAFER_ROLES, "lot.create", "lot", lot_id)
        lot_site = site or (DEFAULT_SITE if me.is_system else me.site)
        if me.role != "admin" and lot_site != me.site:
            raise PermissionDenied(f"{me.username} (site {me.site}) may not create lots for site {lot_site}",
                                   "lot.create", "lot", lot_id)
        lot = session.scalars(select(WaferLot).where(WaferLot.lot_id == lot_id)).one_or_none()
        if lot is not None:
            if lot.site != lot_site:
                raise ConflictError(f"lot {lot_id}: already exists at site {lot.site}, not {lot_site}")
            return _lot_info(lot)
        lot = WaferLot(lot_id=lot_id, product=product, site=lot_site, created_by_id=me.user_id)
        session.add(lot)
        session.flush()
        record(session, me, "lot.create", "lot", lot_id, client=client, details={"product": product, "site": lot_site})
        return _lot_info(lot)

    try:
        return act(store, actor, client, run)
    except IntegrityError:  # created concurrently: the second call finds it
        return act(store, actor, client, run)


def list_lots(store: Store, actor: Actor) -> list[LotInfo]:
    def run(session: Session) -> list[LotInfo]:
        me = require_role(session, actor, WAFER_ROLES, "lot.list")
        query = select(WaferLot).order_by(WaferLot.id)
        if me.role != "admin":
            query = query.where(WaferLot.site == me.site)
        return [_lot_info(lot) for lot in session.scalars(query)]

    return act(store, actor, None, run)


def _upsert_wafers(session: Session, lot_pk: int, wafers: dict[WaferKey, dict]) -> dict[WaferKey, int]:
    """Insert the wafers the lot lacks (ignoring ones a concurrent writer just added); return key -> primary key.

    Goes to the driver directly: SQLAlchemy's per-row parameter processing costs more than the insert itself.
    """
    if not wafers:
        return {}
    dbapi = session.connection().connection.driver_connection
    created_at = _bind(session.get_bind().dialect, Wafer.__table__.c.created_at, utcnow())
    keys = sorted(wafers)  # one lock order for every writer: concurrent batches of a lot cannot deadlock
    if session.get_bind().dialect.name == "postgresql":
        # One statement for the whole batch: arrays in, new primary keys out.
        rows = dbapi.execute(
            "INSERT INTO wafers (lot_pk, wafer_id, source, slot, map_sha256, created_at) "
            "SELECT %s, w, s, sl, m, %s FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[]) AS t(w, s, sl, m) "
            "ON CONFLICT (lot_pk, source, wafer_id) DO NOTHING RETURNING id, source, wafer_id",
            (lot_pk, created_at, [k[1] for k in keys], [k[0] for k in keys],
             [wafers[k].get("slot") for k in keys], [wafers[k].get("map_sha256") for k in keys])).fetchall()
        found = {(source, wafer_id): pk for pk, source, wafer_id in rows}
    else:
        # We hold SQLite's write lock (BEGIN IMMEDIATE), so every row inserted now gets a rowid above the current
        # maximum: a primary-key range scan finds them.
        before = dbapi.execute("SELECT coalesce(max(id), 0) FROM wafers").fetchone()[0]
        dbapi.executemany(
            "INSERT INTO wafers (lot_pk, wafer_id, source, slot, map_sha256, created_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (lot_pk, source, wafer_id) DO NOTHING",
            [(lot_pk, k[1], k[0], wafers[k].get("slot"), wafers[k].get("map_sha256"), created_at) for k in keys])
        found = {(source, wafer_id): pk for pk, source, wafer_id in dbapi.execute(
            "SELECT id, source, wafer_id FROM wafers WHERE id > ?", (before,))}
    rest = [k for k in keys if k not in found]  # wafers the lot held already
    for start in range(0, len(rest), 2000):  # (source, wafer_id) pairs: well below the bound-parameter limits
        rows = session.connection().execute(
            select(Wafer.id, Wafer.source, Wafer.wafer_id)
            .where(Wafer.lot_pk == lot_pk, tuple_(Wafer.source, Wafer.wafer_id).in_(rest[start:start + 2000])))
        found.update({(source, wafer_id): pk for pk, source, wafer_id in rows})
    return found


def _bind(dialect, column, value):
    """A value as the driver should receive it (e.g. SQLite's datetime text), computed once per batch."""
    processor = column.type.bind_processor(dialect)
    return processor(value) if processor else value


def add_wafers(store: Store, actor: Actor, lot_id: str, wafers: Iterable[NewWafer], *,
               client: str | None = None) -> int:
    """Register wafers (with their map blobs) before scoring; returns how many were new."""
    wafers = list(wafers)
    rows: dict[WaferKey, dict] = {}
    for i, w in enumerate(wafers):
        if not isinstance(w, NewWafer):
            raise StoreError(f"wafers[{i}]: expected apps.store.NewWafer, found {type(w).__name__}")
        _check_wafer_key(f"wafers[{i}]", w.wafer_id, w.source, w.slot)
        if w.map_sha256 is not None:
            if not isinstance(w.map_sha256, str) or not SHA256_HEX.match(w.map_sha256):
                raise _bad(f"wafers[{i}]", "map_sha256", "a sha256 from store.put_blob", w.map_sha256)
            if not store.has_blob(w.map_sha256):
                raise NotFoundError(f"wafers[{i}].map_sha256: blob {w.map_sha256} is not in the store")
        rows[(w.source, w.wafer_id)] = {"slot": w.slot, "map_sha256": w.map_sha256}

    def run(session: Session) -> int:
        me, lot = lot_for(session, actor, lot_id, "wafer.add")
        before = session.scalar(select(func.count()).select_from(Wafer).where(Wafer.lot_pk == lot.id))
        _upsert_wafers(session, lot.id, rows)
        added = session.scalar(select(func.count()).select_from(Wafer).where(Wafer.lot_pk == lot.id)) - before
        record(session, me, "wafer.add", "lot", lot_id, client=client, details={"given": len(rows), "new": added})
        return added

    return act(store, actor, client, run)


# --- scores ----------------------------------------------------------------------------------------------------


def add_wafer_scores(store: Store, actor: Actor, lot_id: str, scores: Iterable[NewWaferScore], *,
                     batch_size: int = DEFAULT_BATCH, client: str | None = None) -> int:
    """Write scores in transactions of `batch_size` rows; returns the rows written.

    Pipelined: while a writer thread stores batch n, this thread validates and encodes batch n+1 (the database
    and Python each keep a core busy). Batches still commit one after another, in order. A failure stops at a batch
    boundary: earlier batches stay committed, the failing one leaves no trace.
    """
    check_lot_id(lot_id)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
        raise StoreError(f"batch_size: expected 1..100000, found {batch_size!r}")
    known: dict[WaferKey, int] = {}  # wafer primary keys of committed batches
    written = 0
    iterator = iter(scores)
    in_flight: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcore-scores") as writer:
        try:
            for batch_no in itertools.count():
                batch = list(itertools.islice(iterator, batch_size))
                if not batch:
                    break
                prepared = _prepare(store, batch, written)
                if in_flight is not None:
                    known.update(in_flight.result())  # batch n committed; its new wafers are known to batch n+1
                    in_flight = None
                in_flight = writer.submit(_store_batch, store, actor, lot_id, prepared, known, batch_no, client)
                written += len(batch)
        finally:
            if in_flight is not None:  # let the batch in the writer finish (or raise its own, earlier error)
                known.update(in_flight.result())
    return written


@dataclasses.dataclass
class _Prepared:
    """A validated batch, encoded for the driver except for the wafer primary keys the writer resolves."""

    keys: list[WaferKey]
    slots: dict[WaferKey, int | None]
    tails: list  # per row: the columns after wafer_pk (SQLite: a tuple; PostgreSQL: COPY text)
    errors: int
    model_ids: list[str]


def _prepare(store: Store, batch: list[NewWaferScore], offset: int) -> _Prepared:
    for i, s in enumerate(batch):
        check_score(offset + i, s)
    dialect = store.engine.dialect
    scored_at = _bind(dialect, WaferScore.__table__.c.scored_at, utcnow())
    if dialect.name == "postgresql":
        at = scored_at.isoformat()
        tails = [f"{_copy_text(s.model_id)}\t{_copy_text(_to_json(s.probabilities))}\t{_copy_text(s.predicted_class)}"
                 f"\t{_copy_num(s.defect_score)}\t{_copy_num(s.anomaly_score)}\t{s.status}\t{_copy_text(s.error)}"
                 f"\t{at}" for s in batch]
    else:
        tails = [(s.model_id, _to_json(s.probabilities), s.predicted_class, _float(s.defect_score),
                  _float(s.anomaly_score), s.status, s.error, scored_at) for s in batch]
    keys = [(s.source, s.wafer_id) for s in batch]
    return _Prepared(keys, {k: s.slot for k, s in zip(keys, batch)}, tails,
                     sum(s.status == "error" for s in batch), sorted({s.model_id for s in batch}))


def _store_batch(store: Store, actor: Actor, lot_id: str, batch: _Prepared, known: dict[WaferKey, int],
                 batch_no: int, client: str | None) -> dict[WaferKey, int]:
    def run(session: Session) -> dict[WaferKey, int]:
        me, lot = lot_for(session, actor, lot_id, "wafer.scores.add")
        missing = {k: {"slot": batch.slots[k]} for k in batch.keys if k not in known}
        new_keys = _upsert_wafers(session, lot.id, missing)
        pks = [known.get(k) or new_keys[k] for k in batch.keys]
        dbapi = session.connection().connection.driver_connection
        if store.dialect == "postgresql":
            text = "".join([f"{pk}\t{tail}\n" for pk, tail in zip(pks, batch.tails)])
            with dbapi.cursor() as cursor, cursor.copy(f"COPY wafer_scores ({', '.join(SCORE_COLUMNS)}) "
                                                       "FROM STDIN") as copy:
                copy.write(text)
        else:
            dbapi.executemany(f"INSERT INTO wafer_scores ({', '.join(SCORE_COLUMNS)}) "
                              f"VALUES ({', '.join('?' * len(SCORE_COLUMNS))})",
                              [(pk, *tail) for pk, tail in zip(pks, batch.tails)])
        record(session, me, "wafer.scores.add", "lot", lot_id, client=client,
               details={"batch": batch_no, "rows": len(pks), "errors": batch.errors, "model_ids": batch.model_ids})
        return new_keys

    return act(store, actor, client, run)


# PostgreSQL COPY text format: tab-separated, \N for NULL, backslash escapes.
COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str | None) -> str:
    if value is None:
        return "\\N"
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(COPY_ESCAPES)
    return value


def _copy_num(value) -> str:
    return "\\N" if value is None else float.__repr__(float(value))  # exact round-trip, numpy scalars too


def _newest_scores(session: Session, lot_pk: int, model_id: str | None) -> list[WaferScoreInfo]:
    newest = select(func.max(WaferScore.id)).join(Wafer, Wafer.id == WaferScore.wafer_pk) \
        .where(Wafer.lot_pk == lot_pk).group_by(WaferScore.wafer_pk)
    if model_id is not None:
        newest = newest.where(WaferScore.model_id == model_id)
    # Plain column rows, not ORM objects: a lot can hold many thousand wafers and this runs on every resume.
    rows = session.execute(select(Wafer.wafer_id, Wafer.source, Wafer.slot, WaferScore.model_id,
                                  WaferScore.probabilities, WaferScore.predicted_class, WaferScore.defect_score,
                                  WaferScore.anomaly_score, WaferScore.status, WaferScore.error, WaferScore.scored_at)
                           .join(Wafer, Wafer.id == WaferScore.wafer_pk)
                           .where(WaferScore.id.in_(newest)).order_by(WaferScore.id))
    return [WaferScoreInfo(*row) for row in rows]


def scores_for_lot(store: Store, actor: Actor, lot_id: str, *,
                   model_id: str | None = None) -> dict[WaferKey, WaferScoreInfo]:
    """The newest score of each wafer of the lot, keyed by (source, wafer_id): what a resumed run can skip."""
    check_lot_id(lot_id)

    def run(session: Session) -> dict[WaferKey, WaferScoreInfo]:
        _, lot = lot_for(session, actor, lot_id, "lot.view")
        return {(s.source, s.wafer_id): s for s in _newest_scores(session, lot.id, model_id)}

    return read_or_record_denial(store, actor, run)


def wafer_map_refs(store: Store, actor: Actor, lot_id: str) -> list[WaferMapRef]:
    """The map blob of every wafer of the lot, in the order they were added; a read, not audited (the lot report
    that uses it audits `lot.view` through `lot_summary`)."""
    check_lot_id(lot_id)

    def run(session: Session) -> list[WaferMapRef]:
        _, lot = lot_for(session, actor, lot_id, "lot.view")
        rows = session.execute(select(Wafer.wafer_id, Wafer.source, Wafer.slot, Wafer.map_sha256)
                               .where(Wafer.lot_pk == lot.id).order_by(Wafer.id))
        return [WaferMapRef(*row) for row in rows]

    return read_or_record_denial(store, actor, run)


def lot_summary(store: Store, actor: Actor, lot_id: str, *, client: str | None = None) -> LotSummary:
    check_lot_id(lot_id)

    def run(session: Session) -> LotSummary:
        me, lot = lot_for(session, actor, lot_id, "lot.view")
        wafers = session.scalar(select(func.count()).select_from(Wafer).where(Wafer.lot_pk == lot.id))
        newest = _newest_scores(session, lot.id, None)
        ok = [s for s in newest if s.status == "ok"]
        classes: dict[str, int] = {}
        for s in ok:
            if s.predicted_class is not None:
                classes[s.predicted_class] = classes.get(s.predicted_class, 0) + 1
        defects = [s.defect_score for s in ok if s.defect_score is not None]
        anomalies = [s.anomaly_score for s in ok if s.anomaly_score is not None]
        summary = LotSummary(lot.lot_id, lot.product, lot.site, wafers, len(newest), len(newest) - len(ok),
                             dict(sorted(classes.items())), sum(defects) / len(defects) if defects else None,
                             max(anomalies) if anomalies else None, sorted({s.model_id for s in newest}))
        record(session, me, "lot.view", "lot", lot_id, client=client)
        return summary

    return act(store, actor, client, run)
