"""`mmcore serve`: the web UI and REST API."""

from __future__ import annotations

import importlib.util

from mmcore.errors import InputError

# The application needs both of these modules; until they exist, serving says so instead of failing obscurely.
APP_MODULES = ("apps.api", "apps.web")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="start the web UI and REST API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--db", default=None, help="database URL (default: SQLite in the data folder)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $MMCORE_DATA_DIR or ./mmcore-data)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    missing = [m for m in APP_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            "the web application is not part of this build yet: "
            f"{', '.join(missing)} missing; the CLI commands listed by `mmcore --help` work"
        )
    from apps.api import serve  # noqa: PLC0415 - heavy import on purpose

    return serve(host=args.host, port=args.port, db_url=args.db, data_dir=args.data_dir)
