import numpy as np
import pytest

from pipelines.wafer.maps import FAIL, NO_DIE, PATTERNS
from pipelines.wafer.synth import (GENERATORS, MIN_VISIBLE, MIXTURES, NOVEL_PATTERNS, Geometry, generate, label_pool,
                                   pattern_probs, synth_grid, visible_share, write_dataset)


def fail_rate(grid, region):
    dies = (grid != NO_DIE) & region
    return float((grid[dies] == FAIL).mean())


def test_mixtures_match_mixedwm38():
    assert len(MIXTURES) == 29 and len(set(MIXTURES)) == 29
    for m in MIXTURES:
        assert 2 <= len(m) <= 4 and not {"Center", "Donut"} <= set(m) and not {"Edge-Loc", "Edge-Ring"} <= set(m)
        assert "Near-full" not in m and "Random" not in m
    assert len(label_pool()) == 8 + 1 + 29 and len(label_pool(mixed=False, novel=NOVEL_PATTERNS)) == 11


def test_layout_is_a_disc_and_sizes_in_range():
    wafers = list(generate(60, seed=3))
    for w in wafers:
        rows, cols = w.grid.shape
        assert 25 <= rows <= 64 and 25 <= cols <= 64 and w.grid.dtype == np.uint8
        assert set(np.unique(w.grid)) <= {0, 1, 2}
        # Corners hold no die; the centre row is full of dies.
        assert w.grid[0, 0] == w.grid[-1, -1] == NO_DIE and (w.grid[rows // 2] != NO_DIE).mean() > 0.9
        assert 0.70 < w.n_dies / (rows * cols) < 0.80  # pi/4 of the bounding box, minus the notch
    assert {w.labels for w in wafers} & {(p,) for p in PATTERNS}


def test_seeded_generation_is_reproducible():
    a = [w.grid for w in generate(5, seed=11)]
    b = [w.grid for w in generate(5, seed=11)]
    c = [w.grid for w in generate(5, seed=12)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("seed", range(3))
def test_each_pattern_fails_where_its_definition_says(seed):
    g = Geometry(48, 48)
    center, edge = g.r < 0.2, g.r > 0.92
    rng = np.random.default_rng(seed)
    grids = {name: synth_grid((name,), 48, 48, rng, background=0.0) for name in GENERATORS}
    none = synth_grid((), 48, 48, rng, background=0.03)
    assert fail_rate(grids["Center"], center) > 0.5 and fail_rate(grids["Center"], edge) < 0.05
    assert fail_rate(grids["Edge-Ring"], edge) > 0.6 and fail_rate(grids["Edge-Ring"], center) == 0
    assert 0 < fail_rate(grids["Edge-Loc"], edge) < 0.5 and fail_rate(grids["Edge-Loc"], center) == 0
    assert fail_rate(grids["Donut"], center) < 0.1 and fail_rate(grids["Donut"], (g.r > 0.35) & (g.r < 0.5)) > 0.15
    assert fail_rate(grids["Near-full"], g.on_wafer) > 0.75
    assert 0.1 < fail_rate(grids["Random"], g.on_wafer) < 0.4
    assert 0.005 < fail_rate(grids["Scratch"], g.on_wafer) < 0.15
    assert 0.008 < fail_rate(grids["Loc"], g.on_wafer) < 0.25 and fail_rate(grids["Loc"], edge) < 0.05
    assert fail_rate(none, g.on_wafer) < 0.08
    # Reticle repeater: failing dies sit on a lattice, so failing rows are evenly spaced.
    rows_with_fails = np.flatnonzero((grids["Reticle"] == FAIL).any(1))
    assert len(set(np.diff(rows_with_fails))) == 1
    half = grids["Half"]
    assert 0.3 < fail_rate(half, g.on_wafer) < 0.65


def test_visible_share_counts_only_uncovered_fails():
    on = np.ones((2, 2), bool)
    ring = np.array([[1.0, 1.0], [0.0, 0.0]])
    blob_on_ring, blob_apart = np.array([[0.5, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 0.5]])
    assert visible_share([ring, blob_on_ring], 1, on) == 0.0  # every fail of the blob falls where the ring fails
    assert visible_share([ring, blob_apart], 1, on) == 1.0
    assert visible_share([ring, blob_on_ring], 0, on) == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert visible_share([ring, np.zeros((2, 2))], 1, on) == 0.0


def test_every_pattern_of_a_mixture_stays_visible():
    rng = np.random.default_rng(4)
    shares = []
    for i in range(150):
        mixture = MIXTURES[i % len(MIXTURES)]
        g = Geometry(int(rng.integers(25, 65)), int(rng.integers(25, 65)))
        probs = pattern_probs(mixture, g, rng)
        shares += [visible_share(probs, k, g.on_wafer) for k in range(len(mixture))]
    assert min(shares) >= MIN_VISIBLE
    # Single patterns are drawn once: the same stream as a bare generator call.
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    np.testing.assert_array_equal(pattern_probs(("Loc",), Geometry(30, 30), a)[0], GENERATORS["Loc"](Geometry(30, 30), b))


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown \\['Blob'\\]"):
        synth_grid(("Blob",), 30, 30, rng)
    with pytest.raises(ValueError, match="rows/cols: expected 25..64, found 10x30"):
        synth_grid((), 10, 30, rng)
    with pytest.raises(ValueError, match="n: expected >= 0"):
        list(generate(-1, 0))


def test_write_dataset_and_cli(tmp_path):
    from apps.cli import main
    from pipelines.wafer.dataset import load_labelled

    assert main(["wafer", "synth", str(tmp_path / "a"), "--n", "12", "--seed", "5"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "labels.csv" in files and len([f for f in files if f.endswith(".npy")]) == 12
    wafers = load_labelled(tmp_path / "a")
    assert [w.labels for w in wafers] == [w.labels for w in generate(12, 5)]
    assert write_dataset(tmp_path / "b", 4, 1, fmt="g85", patterns=[("Center",), ()]) == 4
    back = load_labelled(tmp_path / "b")
    assert {w.labels for w in back} <= {("Center",), ()} and all(w.bins is not None for w in back)
    assert main(["wafer", "synth", str(tmp_path / "c"), "--n", "0"]) == 2
    assert main(["wafer", "synth", str(tmp_path / "c"), "--n", "3", "--patterns", "Blob"]) == 2
