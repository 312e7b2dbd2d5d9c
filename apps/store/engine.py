"""Engines for SQLite and PostgreSQL, and the retry that keeps "database is locked" away from callers.

SQLite: WAL (readers never block the writer), foreign keys on, a 5 s busy timeout, synchronous=NORMAL (durable at
each checkpoint, safe against corruption). The sqlite3 driver's own transaction handling is switched off so that
we emit BEGIN ourselves: write transactions use BEGIN IMMEDIATE, which takes the write lock up front instead of
failing half-way when a read transaction tries to upgrade.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError

from apps.store.errors import StoreError

BUSY_TIMEOUT_MS = 5000
RETRY_ATTEMPTS = 12  # with the backoff below: about 30 s of waiting beyond SQLite's own busy timeout
T = TypeVar("T")


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername not in ("postgresql", "postgresql+psycopg"):
            raise StoreError(f"database URL {parsed.render_as_string()}: expected the psycopg 3 driver "
                             f"(postgresql+psycopg://...), found {parsed.drivername}")
        if parsed.drivername == "postgresql":  # SQLAlchemy would pick psycopg2; the store uses psycopg 3 (COPY)
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    raise StoreError(f"database URL {parsed.render_as_string()}: expected sqlite:///PATH or "
                     f"postgresql+psycopg://USER@HOST/DB, found backend {parsed.get_backend_name()!r}")


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:"):
        raise StoreError(f"database URL {url}: the store needs a SQLite file (WAL is shared between connections), "
                         "found an in-memory database")
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def set_pragmas(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # autocommit at the driver; BEGIN comes from `begin` below
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", f"busy_timeout={BUSY_TIMEOUT_MS}",
                       "synchronous=NORMAL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def write_engine(engine: Engine) -> Engine:
    """The same pool, with write transactions that take SQLite's write lock at BEGIN."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


PG_RETRYABLE = ("40001", "40P01")  # serialization_failure, deadlock_detected: the server asks us to run it again


def is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, OperationalError):
        return False
    if getattr(exc.orig, "sqlstate", None) in PG_RETRYABLE:
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def retry_busy(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Run `fn` (one whole transaction); on SQLite busy or a PostgreSQL deadlock, back off (jittered, exponential)
    and run it again."""
    delay = 0.01
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if not is_busy(exc) or attempt == attempts - 1:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")
