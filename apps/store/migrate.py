"""Alembic, configured in code (no alembic.ini): the migrations in `migrations/` are the source of truth.

`upgrade(engine)` runs in one transaction that also serialises concurrent upgraders (SQLite: BEGIN IMMEDIATE;
PostgreSQL: an advisory lock), so two processes starting on an empty database do not both create tables.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from apps.store.engine import retry_busy, write_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
PG_UPGRADE_LOCK = 0x6D6D636F7265  # advisory lock key ("mmcore" in hex)


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to `revision`; returns the revision the database is at afterwards."""
    retry_busy(lambda: _upgrade_once(engine, revision))
    return current_revision(engine)


def _upgrade_once(engine: Engine, revision: str) -> None:
    sqlite = engine.dialect.name == "sqlite"
    with write_engine(engine).connect() as conn:
        if sqlite:
            # Batch mode copies and drops tables; with foreign keys enforced the drop would fail. The pragma is
            # a no-op inside a transaction, so it goes to the driver before BEGIN.
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_UPGRADE_LOCK})
                command.upgrade(alembic_config(conn), revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration to {revision} left rows with dangling foreign keys: "
                                           f"{broken[:5]}")
        finally:
            if sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def new_revision(engine: Engine, message: str) -> None:
    """Autogenerate a migration from the difference between the models and the (upgraded) database."""
    with engine.connect() as conn:
        command.revision(alembic_config(conn), message=message, autogenerate=True)
