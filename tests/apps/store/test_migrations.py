import sqlite3

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from apps.store import Actor, StoreError, create_user, open_store
from apps.store import migrate
from apps.store.engine import make_engine
from apps.store.models import Base

TABLES = {"users", "auth_sessions", "api_tokens", "studies", "series", "study_shares", "voice_notes", "reports",
          "wafer_lots", "wafers", "wafer_scores", "audit_events", "alembic_version"}


def test_models_and_migrations_agree(store):
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert migrate.current_revision(store.engine) == migrate.head_revision()


def test_empty_database_is_upgraded_on_first_open(tmp_path):
    store = open_store(None, tmp_path / "fresh")
    try:
        assert (tmp_path / "fresh" / "mmcore.db").is_file()
        assert set(inspect(store.engine).get_table_names()) == TABLES
        assert migrate.current_revision(store.engine) == migrate.head_revision() == "0003"
        assert (tmp_path / "fresh" / "blobs" / "tmp").is_dir()
    finally:
        store.close()


def test_open_without_upgrade_names_the_command(tmp_path):
    with pytest.raises(StoreError, match=r"schema none \(empty\), expected 0003: run `mmcore db upgrade`"):
        open_store(None, tmp_path, upgrade=False)


def test_environment_chooses_the_location(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCORE_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.delenv("MMCORE_DB_URL", raising=False)
    with open_store() as store:
        assert store.url == f"sqlite:///{tmp_path / 'env-data' / 'mmcore.db'}"
    monkeypatch.setenv("MMCORE_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    with open_store() as store:
        assert store.url.endswith("other.db") and store.data_dir == tmp_path / "env-data"


def test_bad_urls_are_refused(tmp_path):
    with pytest.raises(StoreError, match="expected sqlite:///PATH or postgresql"):
        open_store("mysql://root@localhost/db", tmp_path)
    with pytest.raises(StoreError, match="in-memory"):
        open_store("sqlite://", tmp_path)
    with pytest.raises(StoreError, match=r"postgresql\+psycopg://nobody@127.0.0.1:9/x: cannot connect \(.*refused"):
        open_store("postgresql+psycopg://nobody@127.0.0.1:9/x", tmp_path)


def test_downgrade_to_base_and_back(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert migrate.upgrade(engine) == "0003"
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


def test_sqlite_connection_settings(tmp_path):
    with open_store(None, tmp_path) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    # The pragmas are on our engine only: a plain sqlite3 connection keeps the library defaults.
    plain = sqlite3.connect(tmp_path / "other.db")
    assert plain.execute("PRAGMA foreign_keys").fetchone()[0] == 0
    plain.close()


def test_foreign_keys_are_enforced(store):
    with pytest.raises(DBAPIError), store.session() as session:
        session.execute(text("INSERT INTO wafers (lot_pk, wafer_id, source, created_at) "
                             "VALUES (4242, 'W01', '', CURRENT_TIMESTAMP)"))


def test_audit_trail_is_append_only(store):
    create_user(store, Actor.system(), "someone", "long enough password", "clinician", "north")
    for statement in ("UPDATE audit_events SET action = 'forged'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), store.session() as session:
            session.execute(text(statement))
    with store.session() as session:
        assert session.execute(text("SELECT action FROM audit_events")).scalars().all() == ["user.create"]


def test_upgrade_keeps_and_fills_existing_rows(backend, request, tmp_path):
    """A database at 0001 holding a report moves to head: reports.site is filled from the study,
    users.must_change_password with false, nothing is lost."""
    if backend == "postgresql":
        import uuid

        import psycopg

        base = request.getfixturevalue("pg_schema_url").split("?", 1)[0]
        schema = f"mmcore_test_mig_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(base.replace("+psycopg", ""), autocommit=True)
        admin.execute(f"CREATE SCHEMA {schema}")
        url = f"{base}?options=-csearch_path%3D{schema}"
    else:
        url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    try:
        migrate.upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, username, password_hash, role, site, active, created_at, "
                              "failed_logins) VALUES (1, 'dr_a', 'x', 'clinician', 'north', true, :t, 0)"),
                         {"t": "2026-01-01 00:00:00"})
            conn.execute(text("INSERT INTO studies (id, study_uid, description, owner_id, site, created_at) "
                              "VALUES (7, '1.2.3', '', 1, 'north', :t)"), {"t": "2026-01-01 00:00:00"})
            conn.execute(text("INSERT INTO reports (id, study_id, version, status, content, author_id, created_at, "
                              "updated_at) VALUES (3, 7, 1, 'draft', '{\"findings\": \"ok\"}', 1, :t, :t)"),
                         {"t": "2026-01-01 00:00:00"})
        assert migrate.upgrade(engine) == migrate.head_revision()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, site, status FROM reports")).all() == [(3, "north", "draft")]
            # Accounts from before 0003 chose their own passwords: none is asked to change it.
            assert conn.execute(text("SELECT username, must_change_password FROM users")).all() == [("dr_a", False)]
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    Base.metadata) == []
    finally:
        engine.dispose()
        if backend == "postgresql":
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.close()
