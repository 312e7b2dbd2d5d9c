"""`open_store()` and the `Store` every service function takes first; `Actor`, the identity acting on it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from apps.store import migrate
from apps.store.blobs import BlobStore
from apps.store.engine import make_engine, retry_busy, write_engine
from apps.store.errors import StoreError

DEFAULT_DATA_DIR = "mmcore-data"
DB_FILE = "mmcore.db"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class AccountPolicy:
    max_failed_logins: int = 5  # failures within the window that lock the account
    failure_window_s: float = 15 * 60
    lockout_s: float = 15 * 60
    session_ttl_s: float = 8 * 3600  # one working shift
    api_token_days: int = 90
    min_password_length: int = 8
    # argon2id cost (argon2-cffi defaults, RFC 9106 low-memory profile); hashes made with other costs are
    # upgraded at the next successful log-in.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 64 * 1024
    argon2_parallelism: int = 4

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"AccountPolicy.{field.name}: expected a positive number, "
                                 f"found {getattr(self, field.name)!r}")


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who is acting. Service functions reload the user row, so a stale Actor cannot outlive a deactivation."""

    user_id: int | None
    username: str
    role: str
    site: str
    # As the account stood when this Actor was made (log-in, session or token check); the store re-reads the row.
    must_change_password: bool = dataclasses.field(default=False, compare=False)

    @classmethod
    def system(cls) -> Actor:
        """The local operator: the command line run on the database host. Admin rights, audited as `system`."""
        return cls(user_id=None, username="system", role="admin", site="*")

    @property
    def is_system(self) -> bool:
        return self.user_id is None


class Store:
    def __init__(self, engine: Engine, data_dir: Path, policy: AccountPolicy | None = None):
        self.engine = engine
        self.data_dir = data_dir
        self.url = engine.url.render_as_string(hide_password=True)
        self.dialect = engine.dialect.name
        self.policy = policy or AccountPolicy()
        self.blobs = BlobStore(data_dir / "blobs")
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(write_engine(engine), expire_on_commit=False)

    @contextlib.contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        """One transaction: commits when the block ends, rolls back on an exception. Not retried (see `write`)."""
        with (self._write if write else self._read)() as session, session.begin():
            yield session

    def write(self, fn: Callable[[Session], T]) -> T:
        """Run `fn(session)` in one write transaction, rerunning the whole of it while SQLite reports busy."""
        def once() -> T:
            with self.session(write=True) as session:
                return fn(session)
        return retry_busy(once)

    def read(self, fn: Callable[[Session], T]) -> T:
        def once() -> T:
            with self.session(write=False) as session:
                return fn(session)
        return retry_busy(once)

    def put_blob(self, data: bytes | str | Path | BinaryIO) -> str:
        return self.blobs.put(data)

    def open_blob(self, sha256: str) -> BinaryIO:
        return self.blobs.open(sha256)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs.path(sha256)

    def has_blob(self, sha256: str) -> bool:
        return self.blobs.exists(sha256)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, data_dir={str(self.data_dir)!r})"


def resolve_location(url: str | None = None, data_dir: str | Path | None = None) -> tuple[str, Path]:
    folder = Path(data_dir or os.environ.get("MMCORE_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    url = url or os.environ.get("MMCORE_DB_URL") or f"sqlite:///{folder / DB_FILE}"
    try:
        make_url(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises ArgumentError and others for junk
        raise StoreError(f"database URL {url!r}: expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
                         f"({exc})") from None
    return url, folder


def open_store(url: str | None = None, data_dir: str | Path | None = None, *, upgrade: bool = True,
               policy: AccountPolicy | None = None) -> Store:
    url, folder = resolve_location(url, data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        head = migrate.head_revision()
        try:
            current = migrate.current_revision(engine)
        except OperationalError as exc:
            raise StoreError(f"database {engine.url.render_as_string(hide_password=True)}: cannot connect "
                             f"({' '.join(str(exc.orig).split())})") from None
        if current != head:
            if not upgrade:
                raise StoreError(f"database {engine.url.render_as_string(hide_password=True)} is at schema "
                                 f"{current or 'none (empty)'}, expected {head}: run `mmcore db upgrade`")
            migrate.upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, folder, policy)
