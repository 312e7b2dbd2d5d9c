"""Shared helpers for the wafer tests: small grids and files of each format, built here (no dataset is shipped)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.wafer.synth import synth_grid


def disc_grid(rows: int = 26, cols: int = 27, fail_center: bool = True) -> np.ndarray:
    """A circular wafer of passing dies with a failing centre block: small, deterministic."""
    y, x = np.mgrid[:rows, :cols]
    r = np.hypot((y + 0.5) / rows * 2 - 1, (x + 0.5) / cols * 2 - 1)
    grid = np.where(r <= 1, 1, 0).astype(np.uint8)
    if fail_center:
        grid[(r < 0.25)] = 2
    return grid


@pytest.fixture
def grid() -> np.ndarray:
    return disc_grid()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def pattern_grid(name: str, seed: int = 0, size: int = 40) -> np.ndarray:
    return synth_grid((name,) if name != "none" else (), size, size, np.random.default_rng(seed))


@pytest.fixture
def make_disc():
    return disc_grid


@pytest.fixture
def make_pattern():
    return pattern_grid


@pytest.fixture(scope="session")
def wafer_checkpoint(tmp_path_factory):
    """A wafer checkpoint from a very short run of the real recipe (tiny pool, a few steps): right format,
    untrained weights. Made once per test session."""
    import torch

    from mmcore.train import run_recipe
    from pipelines.wafer.train import WaferRecipe

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wafer-ckpt")
    run_recipe(WaferRecipe(n_train=120, n_holdout=90), out, steps=2, batch_size=8, warmup_steps=1, progress=False)
    (out / "train_state.pt").unlink()
    return out
