"""Shared benchmark machinery: interleaved timing with medians, peak memory, machine facts, result rows.

A benchmark module (`benchmarks/<name>.py`, dashes in NAME become underscores) defines
    GOALS: dict[str, tuple[str, float]]   # metric -> (">=" or "<=", target), shown against the result
    def add_arguments(parser) -> None       # optional
    def run(args) -> dict                    # flat dict of metrics (numbers, None, short strings, small dicts)
and `python -m benchmarks NAME [--json]` prints a table (or one JSON object), then appends a dated row to
docs/benchmarks.md and refreshes the README's benchmark table.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2,
                     sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall time (s) per function, running them round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def rss_bytes() -> int:
    """Resident set size of this process now (bytes), from /proc (Linux) or psutil."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakRSS:
    """Context manager that samples RSS every `interval_s` and reports the peak above the starting level (bytes)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(names: tuple[str, ...] = ("torch", "numpy")) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def machine_info(libraries: tuple[str, ...] = ("torch", "numpy")) -> dict:
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "versions": library_versions(libraries),
    }


def goal_status(value, goal: tuple[str, float]) -> str:
    op, target = goal
    if not isinstance(value, (int, float)) or value is None:
        return "n/a"
    ok = value >= target if op == ">=" else value <= target
    return "met" if ok else "MISSED"


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:80]
    return str(value)


def render_table(name: str, metrics: dict, goals: dict) -> str:
    rows = [("metric", "value", "goal", "status")]
    for key, value in metrics.items():
        goal = goals.get(key)
        rows.append((key, format_value(value), f"{goal[0]} {goal[1]:g}" if goal else "",
                     goal_status(value, goal) if goal else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"benchmark: {name}"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(metrics: dict, goals: dict) -> str:
    """Short text of the goal metrics (or every scalar when there are no goals) for one table cell."""
    keys = list(goals) or [k for k, v in metrics.items() if isinstance(v, (int, float))]
    parts = []
    for key in keys:
        if key in metrics:
            text = f"{key}={format_value(metrics[key])}"
            if key in goals:
                text += f" ({goals[key][0]} {goals[key][1]:g}: {goal_status(metrics[key], goals[key])})"
            parts.append(text)
    return "; ".join(parts)


def append_row(name: str, metrics: dict, goals: dict, machine: dict) -> None:
    """Append a dated row to docs/benchmarks.md and refresh the latest-results table in the README."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    row = (f"| {date} | {name} | {summary(metrics, goals)} | {machine['cpu']}, {machine['cores']} cores "
           f"| {versions}, Python {machine['python']} | {machine['torch_threads']} |")
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(
            "# Benchmark results\n\nAppended by `python -m benchmarks NAME`; each row is one run, newest last.\n\n"
            "| date | benchmark | results | machine | versions | torch threads |\n"
            "| --- | --- | --- | --- | --- | --- |\n")
    with RESULTS_MD.open("a") as f:
        f.write(row + "\n")
    refresh_readme()


def latest_rows() -> dict[str, str]:
    """The newest docs/benchmarks.md row of each benchmark."""
    latest: dict[str, str] = {}
    if not RESULTS_MD.exists():
        return latest
    for line in RESULTS_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and re.match(r"\d{4}-\d{2}-\d{2}", cells[0]):
            latest[cells[1]] = f"| {cells[1]} | {cells[2]} | {cells[0]} |"
    return latest


def refresh_readme() -> None:
    if not README.exists():
        return
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return
    rows = latest_rows()
    table = ["| benchmark | latest result | when |", "| --- | --- | --- |", *[rows[k] for k in sorted(rows)]]
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    README.write_text(head + README_START + "\n" + "\n".join(table) + "\n" + README_END + tail)
