"""The `mmcore` command line: sub-commands grouped by domain.

Start-up must stay fast (`mmcore --help` well under a second), so this module and every command module import
only the standard library at load time; handlers import torch, pydicom, SQLAlchemy, ... when they run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from mmcore import __version__
from mmcore.errors import InputError

# Command modules in the order `mmcore --help` lists them. Each defines `register(subparsers)`.
# A module that is not part of this build is left out, so `--help` lists only what exists.
COMMAND_MODULES = (
    "apps.commands.ct",
    "apps.commands.wafer",
    "apps.commands.speech",
    "apps.commands.train",
    "apps.commands.finetune",
    "apps.commands.eval",
    "apps.commands.db",
    "apps.commands.users",
    "apps.commands.serve",
)

log = logging.getLogger("mmcore")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad argument; we print one line that names the fix."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="mmcore",
        description="Multimodal analysis: CT report drafting and wafer-map defect scoring.",
    )
    parser.add_argument("--version", action="version", version=f"mmcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def configure_logging(debug: bool, verbose: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug, args.verbose)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("mmcore: interrupted", file=sys.stderr)
        return 130
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"mmcore: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything else is our bug: say so on one line, keep the traceback for --debug
        if args.debug:
            raise
        print(f"mmcore: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
