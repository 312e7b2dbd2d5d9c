"""Wafer maps as model tensors, and labelled wafer sets for training and evaluation.

Model input: each map becomes three channels (no die, pass, fail) at `size` x `size`, each cell holding the fraction
of the dies under it with that code (an area resize of the one-hot map: a one-die-wide scratch on a 64 x 64 map
survives at 32 x 32 as half-filled cells instead of vanishing between nearest-neighbour samples).
Labels: an 8-way multi-hot over the patterns (MixedWM38 style); all zeros means `none`.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipelines.wafer.maps import CLASSES, PATTERNS, WaferError, WaferMap, WaferReadError, iter_wafers, read_file
from pipelines.wafer.synth import LABELS_FILE, generate

DEFAULT_SIZE = 32  # model input side, in dies after resizing


def resize_nearest(grid: np.ndarray, size: int) -> np.ndarray:
    """(rows, cols) -> (size, size) by nearest neighbour on die centres."""
    rows, cols = grid.shape
    ri = ((np.arange(size) + 0.5) * rows / size).astype(np.intp)
    ci = ((np.arange(size) + 0.5) * cols / size).astype(np.intp)
    return grid[ri[:, None], ci[None, :]]


def _boxes(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index ranges [start, end) covered by each of `size` output cells (never empty)."""
    edges = np.arange(size + 1) * n / size
    start = np.floor(edges[:-1]).astype(np.intp)
    end = np.maximum(np.ceil(edges[1:]).astype(np.intp), start + 1)
    return start, end


@lru_cache(maxsize=256)
def _pooling_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) float32: row i averages the source positions under output cell i."""
    start, end = _boxes(n, size)
    idx = np.arange(n)
    m = ((idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])).astype(np.float32)
    return m / m.sum(1, keepdims=True)


def fractions(grid: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """(3, size, size) float32: per cell, the fraction of source positions that are no die / pass / fail."""
    rows, cols = grid.shape
    onehot = (grid[None] == np.arange(3, dtype=grid.dtype)[:, None, None]).astype(np.float32)  # (3, rows, cols)
    return _pooling_matrix(rows, size) @ onehot @ _pooling_matrix(cols, size).T


def batch_input(grids: Iterable[np.ndarray], size: int = DEFAULT_SIZE) -> np.ndarray:
    """(B, 3, size, size) float32 model input from maps of any sizes."""
    return np.stack([fractions(g, size) for g in grids])


def multi_hot(labels: Sequence[str]) -> np.ndarray:
    """(8,) float32 over PATTERNS; `()` or `('none',)` is all zeros."""
    vec = np.zeros(len(PATTERNS), dtype=np.float32)
    for name in labels:
        if name == "none":
            continue
        if name not in PATTERNS:
            raise WaferError(f"label {name!r}: expected one of {', '.join(CLASSES)}")
        vec[PATTERNS.index(name)] = 1.0
    return vec


@dataclass
class WaferSet:
    """Maps as model input: inputs (N, 3, S, S) float16 fractions, targets (N, K) multi-hot, label names per map."""

    inputs: np.ndarray
    targets: np.ndarray
    labels: list[tuple[str, ...]]
    wafer_ids: list[str]

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def single(self) -> np.ndarray:
        """Mask of maps with at most one pattern (the 9-class task)."""
        return self.targets.sum(1) <= 1

    def class_index(self) -> np.ndarray:
        """9-class index per map (CLASSES order); mixtures get -1."""
        out = np.full(len(self), -1, dtype=np.int64)
        n_pat = self.targets.sum(1)
        out[n_pat == 0] = CLASSES.index("none")
        single = n_pat == 1
        out[single] = self.targets[single].argmax(1)
        return out


def from_wafers(wafers: Iterable[WaferMap], size: int = DEFAULT_SIZE, classes: Sequence[str] = PATTERNS) -> WaferSet:
    """A WaferSet from labelled maps; `classes` orders the target columns (extra few-shot classes go last)."""
    inputs, targets, labels, ids = [], [], [], []
    for w in wafers:
        if w.labels is None:
            raise WaferError(f"{w.source}: wafer {w.wafer_id} has no label")
        unknown = [name for name in w.labels if name not in classes]
        if unknown:
            raise WaferError(f"{w.source}: label {unknown[0]!r} not among {', '.join(classes)}")
        vec = np.zeros(len(classes), dtype=np.float32)
        vec[[classes.index(name) for name in w.labels]] = 1.0
        inputs.append(fractions(w.grid, size).astype(np.float16))
        targets.append(vec)
        labels.append(tuple(w.labels))
        ids.append(w.wafer_id)
    if not inputs:
        return WaferSet(np.zeros((0, 3, size, size), np.float16), np.zeros((0, len(classes)), np.float32), [], [])
    return WaferSet(np.stack(inputs), np.stack(targets), labels, ids)


def synthetic_set(n: int, seed: int, size: int = DEFAULT_SIZE, classes: Sequence[str] = PATTERNS,
                  **kwargs) -> WaferSet:
    return from_wafers(generate(n, seed, **kwargs), size, classes)


def parse_label_field(text: str, where: str) -> tuple[str, ...]:
    text = (text or "").strip()
    if not text:
        raise WaferError(f"{where}: empty label; expected a class name, names joined by '+', or 'none'")
    return () if text == "none" else tuple(p.strip() for p in text.split("+"))


def load_labelled(path: str | Path) -> list[WaferMap]:
    """Labelled maps: a folder with labels.csv (`file,labels`), a WM-811K pickle or a MixedWM38 .npz
    (unlabelled rows are skipped; unreadable wafers raise, since training data must be clean)."""
    path = Path(path)
    if path.is_dir():
        table = path / LABELS_FILE
        if not table.is_file():
            raise WaferError(f"{path}: expected a {LABELS_FILE} (columns file,labels) in the folder")
        out = []
        with open(table, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "labels"} <= set(reader.fieldnames):
                raise WaferError(f"{table}: expected columns file,labels, found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                labels = parse_label_field(row["labels"], f"{table}:{line}")
                for item in read_file(path / row["file"]):
                    if isinstance(item, WaferReadError):
                        raise WaferError(item.error)
                    item.labels = labels
                    out.append(item)
        return out
    if not path.exists():
        raise WaferError(f"{path}: no such file or folder")
    out = []
    for item in iter_wafers([path]):
        if isinstance(item, WaferReadError):
            raise WaferError(item.error)
        if item.labels is not None:
            out.append(item)
    if not out:
        raise WaferError(f"{path}: holds no labelled wafer maps")
    return out
