"""Store fixtures: every store test runs on SQLite, and on PostgreSQL when MMCORE_TEST_PG_URL is set.

PostgreSQL isolation: each test session gets its own schema (random name, dropped at the end), so reruns and
other people's concurrent runs on the same server never see each other's rows. The schema is built once with
`alembic upgrade head`; between tests its tables are emptied. SQLite: the migrated file is built once and copied.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from apps.store import AccountPolicy, Actor, create_user, open_store
from apps.store import migrate
from apps.store.engine import make_engine

# Cheap argon2 so tests can create many users; production costs are the AccountPolicy defaults.
FAST_POLICY = AccountPolicy(argon2_time_cost=1, argon2_memory_kib=1024, argon2_parallelism=1)
PG_ENV = "MMCORE_TEST_PG_URL"
PASSWORD = "correct horse battery"


def pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def with_schema(url: str, schema: str) -> str:
    return f"{url.split('?', 1)[0]}?options=-csearch_path%3D{schema}"


def pg_admin(url: str):
    import psycopg

    return psycopg.connect(url.split("?", 1)[0].replace("+psycopg", ""), autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_schema_url():
    base = pg_base_url()
    if base is None:
        pytest.skip(f"PostgreSQL store tests skipped: {PG_ENV} is not set (`make test` sets it when a server "
                    "answers on 127.0.0.1:5432)")
    schema = f"mmcore_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with pg_admin(base) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = with_schema(base, schema)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    with pg_admin(base) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "mmcore.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return path


def empty_pg_tables(url: str) -> None:
    schema = url.rsplit("%3D", 1)[1]
    with pg_admin(url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> 'alembic_version'", (schema,))]
        # Replica mode skips triggers: the append-only guard on audit_events (which would rightly refuse) and the
        # foreign-key checks (so the order does not matter). DELETE beats TRUNCATE on a dozen small tables.
        conn.execute("SET session_replication_role = replica")
        for table in tables:
            conn.execute(f"DELETE FROM {schema}.{table}")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request):
    return request.param


@pytest.fixture
def store_url(backend, request, tmp_path):
    if backend == "postgresql":
        url = request.getfixturevalue("pg_schema_url")
        empty_pg_tables(url)
        return url
    template = request.getfixturevalue("sqlite_template")
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(template, tmp_path / "data" / "mmcore.db")
    return f"sqlite:///{tmp_path / 'data' / 'mmcore.db'}"


@pytest.fixture
def store(store_url, tmp_path):
    s = open_store(store_url, tmp_path / "data", policy=FAST_POLICY)
    yield s
    s.close()


@pytest.fixture
def people(store):
    """A small hospital and fab: two clinicians at north, one at south, an engineer per site, an admin."""
    system = Actor.system()
    return {
        "dr_a": create_user(store, system, "dr_a", PASSWORD, "clinician", "north"),
        "dr_b": create_user(store, system, "dr_b", PASSWORD, "clinician", "north"),
        "dr_south": create_user(store, system, "dr_south", PASSWORD, "clinician", "south"),
        "eng_north": create_user(store, system, "eng_north", PASSWORD, "engineer", "north"),
        "eng_south": create_user(store, system, "eng_south", PASSWORD, "engineer", "south"),
        "admin": create_user(store, system, "admin", PASSWORD, "admin", "north"),
    }


@pytest.fixture
def audit_log(store):
    """`audit_log(action=..., ...)`: the trail, oldest first, without the reads of the trail itself."""
    from apps.store import audit_events

    def read(**filters):
        found = audit_events(store, Actor.system(), limit=100_000, **filters)
        return [e for e in reversed(found) if e.action != "audit.view"]

    return read
