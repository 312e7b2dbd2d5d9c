import sqlite3
import threading

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from apps.store import StoreError
from apps.store.engine import is_busy, make_engine, retry_busy


def operational(orig: Exception) -> OperationalError:
    return OperationalError("COMMIT", {}, orig)


def test_busy_errors_are_recognised():
    assert is_busy(operational(sqlite3.OperationalError("database is locked")))
    assert is_busy(operational(psycopg.errors.DeadlockDetected("deadlock detected")))
    assert not is_busy(operational(sqlite3.OperationalError("no such table: users")))
    assert not is_busy(ValueError("database is locked"))


def test_retry_runs_the_transaction_again_until_it_passes(monkeypatch):
    monkeypatch.setattr("apps.store.engine.time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise operational(sqlite3.OperationalError("database is locked"))
        return "committed"

    assert retry_busy(flaky) == "committed" and len(calls) == 4

    def failing(message):
        def run():
            calls.append(message)
            raise operational(sqlite3.OperationalError(message))
        return run

    calls.clear()
    with pytest.raises(OperationalError, match="no such table"):  # not a lock: no second try
        retry_busy(failing("no such table: x"))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(OperationalError, match="database is locked"):  # gives up after its attempts
        retry_busy(failing("database is locked"), attempts=3)
    assert len(calls) == 3


def test_writers_wait_for_the_lock_instead_of_failing(tmp_path):
    """Two engines (as two processes would) writing the same SQLite file at once: both commit, none errors."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first, second = make_engine(url), make_engine(url)
    with first.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    errors = []

    def write(engine, start):
        from apps.store.engine import write_engine

        try:
            for i in range(start, start + 50):
                retry_busy(lambda: _insert(write_engine(engine), i))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(e, s)) for e, s in ((first, 0), (second, 1000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with first.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 100
    assert errors == []
    first.dispose()
    second.dispose()


def _insert(engine, i):
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO t VALUES ({i})")


def test_only_psycopg_3_for_postgresql():
    with pytest.raises(StoreError, match="expected the psycopg 3 driver"):
        make_engine("postgresql+psycopg2://u@localhost/db")
    assert make_engine("postgresql://u@localhost/db").dialect.driver == "psycopg"
