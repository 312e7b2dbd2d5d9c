"""`mmcore db`: create, upgrade and inspect the database (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import argparse


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, metavar="URL",
                        help="database URL (default: $MMCORE_DB_URL, else SQLite in the data folder)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="data folder for the SQLite file and blobs (default: $MMCORE_DATA_DIR or ./mmcore-data)")


def open_from_args(args):
    """The store named by --db / --data-dir, upgraded to the newest schema."""
    from apps.store import open_store  # noqa: PLC0415 - SQLAlchemy only when a command runs

    return open_store(args.db, args.data_dir)


def register(subparsers) -> None:
    p = subparsers.add_parser("db", help="create, upgrade and inspect the database")
    sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    up = sub.add_parser("upgrade", help="create the database or bring it to the newest schema")
    add_store_arguments(up)
    up.set_defaults(handler=cmd_upgrade)

    cur = sub.add_parser("current", help="print the database's schema revision and the newest one")
    add_store_arguments(cur)
    cur.set_defaults(handler=cmd_current)

    rev = sub.add_parser("revision", help="(developers) autogenerate a migration from changed models")
    add_store_arguments(rev)
    rev.add_argument("-m", "--message", required=True, help="what the migration changes")
    rev.set_defaults(handler=cmd_revision)


def _engine(args):
    from apps.store.core import resolve_location  # noqa: PLC0415
    from apps.store.engine import make_engine  # noqa: PLC0415

    url, folder = resolve_location(args.db, args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return make_engine(url)


def _current(engine):
    """The schema revision, or a one-line error when the server cannot be reached."""
    from sqlalchemy.exc import OperationalError  # noqa: PLC0415

    from apps.store import StoreError, migrate  # noqa: PLC0415

    try:
        return migrate.current_revision(engine)
    except OperationalError as exc:
        raise StoreError(f"database {engine.url.render_as_string(hide_password=True)}: cannot connect "
                         f"({' '.join(str(exc.orig).split())})") from None


def cmd_upgrade(args) -> int:
    from apps.store import migrate  # noqa: PLC0415

    engine = _engine(args)
    try:
        before = _current(engine)
        after = migrate.upgrade(engine)
        where = engine.url.render_as_string(hide_password=True)
        if before == after:
            print(f"{where}: already at revision {after} (newest)")
        else:
            print(f"{where}: upgraded from {before or 'empty'} to revision {after} (newest)")
    finally:
        engine.dispose()
    return 0


def cmd_current(args) -> int:
    from apps.store import migrate  # noqa: PLC0415

    engine = _engine(args)
    try:
        current, head = _current(engine), migrate.head_revision()
        state = "newest" if current == head else f"behind; run `mmcore db upgrade` to reach {head}"
        print(f"{engine.url.render_as_string(hide_password=True)}: revision {current or 'none (empty)'} ({state})")
    finally:
        engine.dispose()
    return 0 if current == head else 1


def cmd_revision(args) -> int:
    from apps.store import migrate  # noqa: PLC0415

    engine = _engine(args)
    try:
        migrate.upgrade(engine)
        migrate.new_revision(engine, args.message)
    finally:
        engine.dispose()
    return 0
