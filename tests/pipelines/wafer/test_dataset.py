import numpy as np
import pytest

from pipelines.wafer.dataset import (batch_input, fractions, from_wafers, load_labelled, multi_hot, resize_nearest,
                                     synthetic_set)
from pipelines.wafer.maps import PATTERNS, WaferError, WaferMap


def test_fractions_average_the_one_hot_map():
    grid = np.array([[0, 1, 2, 2], [1, 1, 2, 0]], dtype=np.uint8)
    x = fractions(grid, 2)
    assert x.shape == (3, 2, 2)
    np.testing.assert_allclose(x.sum(0), 1.0)
    # Each output cell covers a 1 x 2 block of dies.
    np.testing.assert_allclose(x[2], [[0.0, 1.0], [0.0, 0.5]])
    np.testing.assert_allclose(x[0], [[0.5, 0.0], [0.0, 0.5]])


def test_fractions_upsample_and_keep_thin_lines():
    grid = np.ones((64, 64), dtype=np.uint8)
    grid[:, 31] = 2  # a one-die-wide vertical scratch
    x = fractions(grid, 32)
    assert x[2].max() == pytest.approx(0.5) and (x[2] > 0).sum() == 32  # every output row keeps half of it
    small = np.array([[1, 2], [2, 1]], dtype=np.uint8)
    up = fractions(small, 4)
    np.testing.assert_allclose(up[2], [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert resize_nearest(small, 4).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 1, 1], [2, 2, 1, 1]]
    assert batch_input([small, grid], 8).shape == (2, 3, 8, 8)


def test_multi_hot_and_sets():
    assert multi_hot(("Center", "Scratch")).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert multi_hot(("none",)).sum() == 0
    with pytest.raises(WaferError, match="'Blob'"):
        multi_hot(("Blob",))
    data = synthetic_set(40, seed=2, size=16)
    assert data.inputs.shape == (40, 3, 16, 16) and data.inputs.dtype == np.float16
    idx = data.class_index()
    for i, labels in enumerate(data.labels):
        assert idx[i] == (-1 if len(labels) > 1 else 8 if not labels else PATTERNS.index(labels[0]))
    with pytest.raises(WaferError, match="has no label"):
        from_wafers([WaferMap(grid=np.ones((3, 3), np.uint8), wafer_id="u", source="s")])


def test_load_labelled_errors(tmp_path):
    with pytest.raises(WaferError, match="expected a labels.csv"):
        load_labelled(tmp_path)
    (tmp_path / "labels.csv").write_text("name,label\nx.npy,Center\n")
    with pytest.raises(WaferError, match="expected columns file,labels"):
        load_labelled(tmp_path)
    (tmp_path / "labels.csv").write_text("file,labels\nx.npy,Center\n")
    with pytest.raises(WaferError, match="x.npy: no such file"):
        load_labelled(tmp_path)
    np.save(tmp_path / "x.npy", np.ones((4, 4), np.uint8))
    (tmp_path / "labels.csv").write_text("file,labels\nx.npy,\n")
    with pytest.raises(WaferError, match="labels.csv:2: empty label"):
        load_labelled(tmp_path)
