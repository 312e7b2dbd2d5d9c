"""Parametric synthetic wafer maps: the eight WM-811K patterns, `none`, MixedWM38-style mixtures and novel patterns.

Geometry: a grid of rows x cols dies (25..64 each) holds a circular wafer; in normalised coordinates
(x, y in [-1, 1], row 0 at the top, notch at the bottom) a die exists when its centre has radius r <= 1.
Each pattern is a per-die fail probability; a mixture fails a die when any of its patterns does
(p = 1 - (1 - p0) * prod(1 - p_k)), with p0 the background random fail rate in [0.01, 0.05].
A mixture's label names only patterns one can see: a pattern whose expected fails are mostly covered by the other
patterns (a Loc blob lying on a Donut's ring) is drawn again, so every label of a mixed map is identifiable.

Everything is drawn from one `numpy.random.Generator`, so a seed reproduces a whole set.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import numpy as np

from pipelines.wafer.maps import CLASSES, FAIL, NO_DIE, PASS, PATTERNS, WaferMap

MIN_SIZE, MAX_SIZE = 25, 64  # dies per side
BACKGROUND = (0.01, 0.05)  # background random fail probability per die
MIN_VISIBLE = 0.5  # share of a mixed pattern's expected fails that the mixture's other patterns must leave uncovered
REDRAWS = 10  # attempts to place a covered pattern elsewhere before keeping the last draw
# MixedWM38's 29 mixtures: at most one of Center/Donut, at most one of Edge-Loc/Edge-Ring, optional Loc and Scratch,
# two to four patterns in all (Near-full and Random never mix).
MIXTURES = tuple(
    tuple(sorted((p for p in combo if p), key=CLASSES.index))
    for combo in itertools.product(("", "Center", "Donut"), ("", "Edge-Loc", "Edge-Ring"), ("", "Loc"), ("", "Scratch"))
    if sum(1 for p in combo if p) >= 2
)
# Patterns that no training map contains: they test the anomaly score and few-shot adaptation.
NOVEL_PATTERNS = ("Reticle", "Half")


class Geometry:
    """Normalised die-centre coordinates of a rows x cols grid: x, y in [-1, 1], r, theta (radians, 0 = east)."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.y, self.x = np.meshgrid((np.arange(rows) + 0.5) / rows * 2 - 1, (np.arange(cols) + 0.5) / cols * 2 - 1,
                                     indexing="ij")
        self.y = -self.y  # row 0 is the top of the wafer: y grows upwards
        self.r = np.hypot(self.x, self.y)
        self.theta = np.arctan2(self.y, self.x)
        # Dies whose centre lies on the wafer, minus a small notch at 6 o'clock.
        self.on_wafer = (self.r <= 1.0) & ~((self.y < -0.93) & (np.abs(self.x) < 0.06))


def _angle_diff(a, b):
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def center(g: Geometry, rng) -> np.ndarray:
    sigma, peak = rng.uniform(0.15, 0.3), rng.uniform(0.75, 0.97)
    return peak * np.exp(-g.r ** 2 / (2 * sigma ** 2))


def donut(g: Geometry, rng) -> np.ndarray:
    r1, w, peak = rng.uniform(0.25, 0.45), rng.uniform(0.12, 0.25), rng.uniform(0.7, 0.95)
    soft = 0.03  # radial fall-off at the ring's borders, in wafer radii
    inside = np.clip(np.minimum(g.r - r1, r1 + w - g.r) / soft + 0.5, 0, 1)
    return peak * inside


def edge_ring(g: Geometry, rng) -> np.ndarray:
    w, peak = rng.uniform(0.06, 0.15), rng.uniform(0.75, 0.97)
    return peak * (g.r > 1 - w)


def edge_loc(g: Geometry, rng) -> np.ndarray:
    w, peak = rng.uniform(0.1, 0.22), rng.uniform(0.75, 0.97)
    theta0, half_width = rng.uniform(-np.pi, np.pi), np.deg2rad(rng.uniform(20, 80)) / 2
    return peak * ((g.r > 1 - w) & (_angle_diff(g.theta, theta0) < half_width))


def loc(g: Geometry, rng) -> np.ndarray:
    radius, theta0 = rng.uniform(0.3, 0.62), rng.uniform(-np.pi, np.pi)
    cx, cy = radius * np.cos(theta0), radius * np.sin(theta0)
    sigma, peak = rng.uniform(0.08, 0.15), rng.uniform(0.75, 0.97)
    return peak * np.exp(-((g.x - cx) ** 2 + (g.y - cy) ** 2) / (2 * sigma ** 2))


def near_full(g: Geometry, rng) -> np.ndarray:
    return np.full(g.r.shape, rng.uniform(0.8, 0.98))


def random_fail(g: Geometry, rng) -> np.ndarray:
    return np.full(g.r.shape, rng.uniform(0.15, 0.35))


def scratch(g: Geometry, rng) -> np.ndarray:
    """A random-walk poly-line 1-2 dies wide, 0.5-1.4 wafer radii long, with Poisson-spaced breaks."""
    p = np.zeros(g.r.shape)
    start_r, start_t = rng.uniform(0, 0.7), rng.uniform(-np.pi, np.pi)
    pos = np.array([start_r * np.cos(start_t), start_r * np.sin(start_t)])
    heading = rng.uniform(-np.pi, np.pi)
    length = rng.uniform(0.5, 1.4)
    step = 0.5 / max(g.rows, g.cols)  # quarter of a die, in normalised units (2 units across)
    width = rng.choice([0.6, 1.1]) * 2 / max(g.rows, g.cols)  # half-width in normalised units
    breaks = rng.poisson(1.0)
    gap_at = set(rng.integers(0, int(length / step), size=breaks).tolist())
    gap_left = 0
    for k in range(int(length / step)):
        heading += rng.normal(0, 0.04)
        pos = pos + step * np.array([np.cos(heading), np.sin(heading)])
        if k in gap_at:
            gap_left = int(rng.integers(2, 6))
        if gap_left:
            gap_left -= 1
            continue
        near = (np.abs(g.x - pos[0]) < width) & (np.abs(g.y - pos[1]) < width)
        p[near] = 0.95
    return p


def reticle(g: Geometry, rng) -> np.ndarray:
    """Reticle repeater: the same die position of every exposure field fails, a lattice at a fixed step."""
    step_r, step_c = int(rng.integers(3, 6)), int(rng.integers(3, 6))
    off_r, off_c = int(rng.integers(0, step_r)), int(rng.integers(0, step_c))
    rows, cols = np.indices(g.r.shape)
    return 0.95 * (((rows - off_r) % step_r == 0) & ((cols - off_c) % step_c == 0))


def half(g: Geometry, rng) -> np.ndarray:
    """Half-wafer failure: every die on one side of a chord through (near) the centre."""
    theta0, offset = rng.uniform(-np.pi, np.pi), rng.uniform(-0.1, 0.1)
    side = g.x * np.cos(theta0) + g.y * np.sin(theta0) > offset
    return rng.uniform(0.85, 0.97) * side


GENERATORS: dict[str, Callable[[Geometry, np.random.Generator], np.ndarray]] = {
    "Center": center, "Donut": donut, "Edge-Loc": edge_loc, "Edge-Ring": edge_ring, "Loc": loc,
    "Near-full": near_full, "Random": random_fail, "Scratch": scratch, "Reticle": reticle, "Half": half,
}


def visible_share(probs: Sequence[np.ndarray], k: int, on_wafer: np.ndarray) -> float:
    """Share of pattern k's expected fails (on the wafer) that no other pattern of the mixture would also fail."""
    others = np.ones(on_wafer.shape)
    for j, p in enumerate(probs):
        if j != k:
            others *= 1.0 - p
    own = float((probs[k] * on_wafer).sum())
    return float((probs[k] * others * on_wafer).sum()) / own if own > 0 else 0.0


def pattern_probs(patterns: Sequence[str], g: Geometry, rng: np.random.Generator) -> list[np.ndarray]:
    """Per-die fail probability of each pattern; in a mixture, covered patterns are redrawn (MIN_VISIBLE)."""
    probs = [GENERATORS[name](g, rng) for name in patterns]
    for _ in range(REDRAWS if len(patterns) > 1 else 0):
        covered = [k for k in range(len(probs)) if visible_share(probs, k, g.on_wafer) < MIN_VISIBLE]
        if not covered:
            break
        for k in covered:
            probs[k] = GENERATORS[patterns[k]](g, rng)
    return probs


def synth_grid(patterns: Sequence[str], rows: int, cols: int, rng: np.random.Generator,
               background: float | None = None) -> np.ndarray:
    """One (rows, cols) uint8 grid with `patterns` (empty = `none`) over background random fails."""
    unknown = [p for p in patterns if p not in GENERATORS]
    if unknown:
        raise ValueError(f"patterns: unknown {unknown}; expected some of {sorted(GENERATORS)}")
    if not (MIN_SIZE <= rows <= MAX_SIZE and MIN_SIZE <= cols <= MAX_SIZE):
        raise ValueError(f"rows/cols: expected {MIN_SIZE}..{MAX_SIZE}, found {rows}x{cols}")
    g = Geometry(rows, cols)
    p0 = rng.uniform(*BACKGROUND) if background is None else background
    survive = np.full(g.r.shape, 1.0 - p0)
    for p in pattern_probs(patterns, g, rng):
        survive *= 1.0 - p
    fails = rng.random(g.r.shape) > survive
    return np.where(g.on_wafer, np.where(fails, FAIL, PASS), NO_DIE).astype(np.uint8)


def random_size(rng: np.random.Generator, square: int | None = None) -> tuple[int, int]:
    """Grid size: square x square, or WM-811K-like (rows in 25..64, columns within a few of rows)."""
    if square:
        return square, square
    rows = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    cols = int(np.clip(rows + rng.integers(-2, 4), MIN_SIZE, MAX_SIZE))
    return rows, cols


def label_pool(mixed: bool = True, novel: Sequence[str] = ()) -> list[tuple[str, ...]]:
    """Every label set a generated map may carry: each single pattern, `none` (empty), MixedWM38 mixtures."""
    pool = [(p,) for p in PATTERNS] + [()]
    if mixed:
        pool += list(MIXTURES)
    return pool + [(n,) for n in novel]


def generate(n: int, seed: int, *, mixed_fraction: float = 0.25, patterns: Sequence[tuple[str, ...]] | None = None,
             square: int | None = None, lot_id: str | None = None, prefix: str = "syn") -> Iterator[WaferMap]:
    """`n` labelled maps. Single classes (and `none`) are equally frequent; `mixed_fraction` of maps are mixtures.
    `patterns` fixes the label sets to draw from uniformly instead. Maps are numbered `{prefix}{seed}_{i:06d}`."""
    if n < 0:
        raise ValueError(f"n: expected >= 0, found {n}")
    if not 0 <= mixed_fraction <= 1:
        raise ValueError(f"mixed_fraction: expected 0..1, found {mixed_fraction}")
    rng = np.random.default_rng(seed)
    singles = [(p,) for p in PATTERNS] + [()]
    for i in range(n):
        if patterns is not None:
            labels = tuple(patterns[int(rng.integers(len(patterns)))])
        elif rng.random() < mixed_fraction:
            labels = MIXTURES[int(rng.integers(len(MIXTURES)))]
        else:
            labels = singles[int(rng.integers(len(singles)))]
        rows, cols = random_size(rng, square)
        grid = synth_grid(labels, rows, cols, rng)
        wafer_id = f"{prefix}{seed}_{i:06d}"
        yield WaferMap(grid=grid, wafer_id=wafer_id, source=f"synthetic:seed={seed}#{i}", lot_id=lot_id,
                       slot=i % 25 + 1, labels=labels)


FORMATS = ("npy", "g85", "png")
LABELS_FILE = "labels.csv"  # file,labels (patterns joined by "+", or "none")


def write_dataset(out_dir, n: int, seed: int, *, fmt: str = "npy", mixed_fraction: float = 0.25,
                  patterns: Sequence[tuple[str, ...]] | None = None, square: int | None = None,
                  lot_id: str | None = None, progress=None) -> int:
    """Write `n` generated maps into `out_dir` (one file each) plus `labels.csv`; returns the count written."""
    import csv
    import io
    from pathlib import Path

    from pipelines.wafer.maps import _atomic_write, write_g85, write_npy, write_png

    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, found {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"npy": write_npy, "g85": write_g85, "png": write_png}[fmt]
    suffix = {"npy": ".npy", "g85": ".xml", "png": ".png"}[fmt]
    rows = io.StringIO()
    table = csv.writer(rows)
    table.writerow(["file", "labels"])
    count = 0
    for wafer in generate(n, seed, mixed_fraction=mixed_fraction, patterns=patterns, square=square, lot_id=lot_id):
        name = wafer.wafer_id + suffix
        writer(wafer, out / name)
        table.writerow([name, "+".join(wafer.labels) or "none"])
        count += 1
        if progress is not None:
            progress(1)
    _atomic_write(out / LABELS_FILE, lambda f: f.write(rows.getvalue().encode()))
    return count
