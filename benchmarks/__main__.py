"""`python -m benchmarks NAME [--json] [--no-record]`: run one benchmark, print it, record it."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

import benchmarks
from benchmarks import harness


def available() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name not in ("harness",) and not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Measure mmcore against its peers.")
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(names) or '(none yet)'}")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    known, rest = parser.parse_known_args(argv)
    if known.name not in names:
        parser.exit(2, f"python -m benchmarks: error: unknown benchmark {known.name!r}; expected one of: "
                       f"{', '.join(names) or '(none yet)'}\n")
    module = importlib.import_module(f"benchmarks.{known.name.replace('-', '_')}")
    sub = argparse.ArgumentParser(prog=f"python -m benchmarks {known.name}")
    if hasattr(module, "add_arguments"):
        module.add_arguments(sub)
    args = sub.parse_args(rest)
    goals = getattr(module, "GOALS", {})
    metrics = module.run(args)
    machine = harness.machine_info(getattr(module, "LIBRARIES", ("torch", "numpy")))
    if not known.no_record:
        harness.append_row(known.name, metrics, goals, machine)
    if known.json:
        print(json.dumps({**metrics, "machine": machine}, default=str))
    else:
        print(harness.render_table(known.name, metrics, goals))
        print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
