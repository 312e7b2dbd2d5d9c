"""Bulk insert of wafer scores: `add_wafer_scores` (executemany on SQLite, COPY on PostgreSQL, one transaction per
5,000-row batch, new wafers created on the way, the next batch encoded while the last one is written) against a
plain per-row ORM loop (`session.add` + flush per wafer, as code that needs each new wafer's id writes it) in the
same run.

Data: synthetic factory batches, 9 WM-811K pattern classes per score, a new wafer per score, 25 wafers a lot.
PostgreSQL: MMCORE_TEST_PG_URL, else MMCORE_DB_URL when it is a PostgreSQL URL; a throwaway schema is created and
dropped. Without a server the PostgreSQL metrics are null.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import tempfile
import time
import uuid

from benchmarks.harness import time_interleaved

GOALS = {"sqlite_rows_per_s": (">=", 20_000), "postgres_rows_per_s": (">=", 20_000)}
LIBRARIES = ("sqlalchemy", "alembic", "psycopg")
CLASSES = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Random", "Scratch", "none")


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, default=20_000, help="score rows per timed insert (default 20000)")
    parser.add_argument("--peer-rows", type=int, default=1_000, help="rows per timed per-row ORM insert")
    parser.add_argument("--repeats", type=int, default=3)


def synthetic_scores(n: int, seed: int):
    from apps.store import NewWaferScore

    rng = random.Random(seed)
    out = []
    for i in range(n):
        weights = [rng.random() for _ in CLASSES]
        total = sum(weights)
        probs = {c: w / total for c, w in zip(CLASSES, weights)}
        top = max(probs, key=probs.get)
        failed = rng.random() < 0.01  # about 1 % of maps fail to read in a real batch
        out.append(NewWaferScore(
            wafer_id=f"W{i % 25 + 1:02d}", source=f"batch-{seed}/map-{i:06d}.npy", model_id="wafer-tiny@1",
            probabilities={} if failed else probs, predicted_class=None if failed else top,
            defect_score=None if failed else 1.0 - probs["none"], anomaly_score=None if failed else rng.random(),
            status="error" if failed else "ok", error="unreadable map" if failed else None, slot=i % 25 + 1))
    return out


def per_row_orm(store, lot_pk: int, scores) -> None:
    """The peer: what straightforward ORM code does, one wafer and one score at a time."""
    from apps.store.models import Wafer, WaferScore

    with store.session() as session:
        for s in scores:
            wafer = Wafer(lot_pk=lot_pk, wafer_id=s.wafer_id, source=s.source, slot=s.slot)
            session.add(wafer)
            session.flush()  # the score needs the wafer's id
            session.add(WaferScore(wafer_pk=wafer.id, model_id=s.model_id, probabilities=s.probabilities,
                                   predicted_class=s.predicted_class, defect_score=s.defect_score,
                                   anomaly_score=s.anomaly_score, status=s.status, error=s.error))


def measure(url: str | None, args) -> dict:
    from apps.store import Actor, add_wafer_scores, create_user, get_or_create_lot, open_store

    data_dir = tempfile.mkdtemp(prefix="mmcore-bench-store-")
    store = open_store(url, data_dir)
    try:
        engineer = create_user(store, Actor.system(), "bench", "bench-password", "engineer", "fab1")
        counter = itertools.count()
        peer_rows = synthetic_scores(args.peer_rows, 2)
        # One score list per timed call (warm-up, repeats, the CPU-time run), built before any timing: new sources
        # each time, so every score creates its wafer, as in a factory batch.
        runs = iter([synthetic_scores(args.rows, seed) for seed in range(10, 10 + args.repeats + 2)])

        def bulk():
            scores = next(runs)
            lot = f"BULK{next(counter)}"
            get_or_create_lot(store, engineer, lot, "P1")
            assert add_wafer_scores(store, engineer, lot, scores) == len(scores)

        def peer():
            lot = f"ORM{next(counter)}"
            info = get_or_create_lot(store, engineer, lot, "P1")
            per_row_orm(store, info.id, peer_rows)

        times = time_interleaved({"bulk": bulk, "peer": peer}, repeats=args.repeats, warmup=1)
        bulk_rate = args.rows / times["bulk"]
        peer_rate = args.peer_rows / times["peer"]
        # CPU seconds (this process, plus the PostgreSQL server processes when local) per bulk insert: what the
        # work costs whatever else the shared machine runs at the time.
        cpu_before = time.process_time() + server_cpu_s(store)
        bulk()
        cpu = time.process_time() + server_cpu_s(store) - cpu_before
        return {"rows_per_s": bulk_rate, "orm_rows_per_s": peer_rate, "speedup": bulk_rate / peer_rate,
                "rows_per_cpu_s": args.rows / cpu if cpu > 0 else None}
    finally:
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def server_cpu_s(store) -> float:
    """CPU time (s) used so far by the server processes behind the store's pooled connections (0 for SQLite, or
    when the server is not on this host)."""
    if store.dialect != "postgresql":
        return 0.0
    from sqlalchemy import text

    with store.engine.connect() as conn:
        app = conn.execute(text("SELECT current_setting('application_name')")).scalar()
        pids = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = :app"),
                            {"app": app}).scalars().all()
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def postgres_url() -> str | None:
    for name in ("MMCORE_TEST_PG_URL", "MMCORE_DB_URL"):
        url = os.environ.get(name, "")
        if url.startswith("postgresql"):
            return url
    return None


def measure_postgres(url: str, args) -> dict:
    import psycopg

    base = url.split("?", 1)[0]
    conninfo = base.replace("+psycopg", "")
    schema = f"mmcore_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        return measure(f"{base}?options=-csearch_path%3D{schema}&application_name={schema}", args)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def run(args) -> dict:
    load_before = os.getloadavg()[0]
    sqlite = measure(None, args)
    pg_url = postgres_url()
    pg = None
    if pg_url is not None:
        try:
            pg = measure_postgres(pg_url, args)
        except Exception as exc:  # noqa: BLE001 - report the server problem, keep the SQLite numbers
            print(f"postgres: not measured: {type(exc).__name__}: {exc}", file=sys.stderr)
    return {
        "rows": args.rows,
        # The machine is shared: the 1-minute load average before the run tells how much of it this run had.
        "load_average_1m": round(load_before, 2),
        "sqlite_rows_per_s": sqlite["rows_per_s"],
        "sqlite_orm_rows_per_s": sqlite["orm_rows_per_s"],
        "sqlite_speedup_vs_orm": sqlite["speedup"],
        "sqlite_rows_per_cpu_s": sqlite["rows_per_cpu_s"],
        "postgres_rows_per_s": pg["rows_per_s"] if pg else None,
        "postgres_orm_rows_per_s": pg["orm_rows_per_s"] if pg else None,
        "postgres_speedup_vs_orm": pg["speedup"] if pg else None,
        "postgres_rows_per_cpu_s": pg["rows_per_cpu_s"] if pg else None,
    }
