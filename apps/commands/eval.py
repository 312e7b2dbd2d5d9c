"""`mmcore eval NAME ...`: evaluations too long for the test suite, printed as a table or one JSON object.

Each domain's command module may define `register_eval(subparsers)`, adding one sub-command per evaluation
(e.g. `ct-measure`, `speech`, `wafer`, `ct-report`) whose handler prints its result with `report_metrics`.
"""

from __future__ import annotations

import importlib
import importlib.util

from apps.commands import print_json

EVAL_PROVIDERS = (
    "apps.commands.core",
    "apps.commands.ct",
    "apps.commands.speech",
    "apps.commands.wafer",
)


def register(subparsers) -> None:
    providers = [importlib.import_module(name) for name in EVAL_PROVIDERS if importlib.util.find_spec(name)]
    providers = [m for m in providers if hasattr(m, "register_eval")]
    if not providers:  # `mmcore --help` lists only what exists
        return
    p = subparsers.add_parser("eval", help="run an evaluation and print its metrics")
    evals = p.add_subparsers(dest="evaluation", metavar="NAME", parser_class=type(p))
    evals.required = True
    for module in providers:
        module.register_eval(evals)


def report_metrics(metrics: dict, as_json: bool, title: str) -> None:
    """Print an evaluation result: one JSON object with --json, else an aligned key/value table."""
    if as_json:
        print_json(metrics)
        return
    print(title)
    width = max((len(k) for k in metrics), default=0)
    for key, value in metrics.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {key.ljust(width)}  {text}")
