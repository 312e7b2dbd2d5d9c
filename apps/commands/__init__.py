"""CLI command modules. Each exposes `register(subparsers)` and keeps heavy imports inside its handlers."""

from __future__ import annotations

import argparse
import json
import sys

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Every command that runs a model takes `--device`."""
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_HELP} (default: auto)")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()
