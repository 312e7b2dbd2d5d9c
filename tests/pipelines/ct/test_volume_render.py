import numpy as np
import pytest
from PIL import Image

from pipelines.ct.render import render_slice_png, slice_rgb
from pipelines.ct.volume import WINDOWS, Volume, resample, window_to_uint8


def ramp_volume():
    hu = np.tile(np.arange(-1000, 1000, 125, dtype=np.int16), (4, 16, 1))  # (4, 16, 16), x ramps in HU
    return Volume(hu=hu, spacing_zyx=(2.0, 1.0, 0.5), origin_lps=(-4.0, -8.0, 10.0))


def test_window_presets_map_level_to_mid_grey():
    assert (WINDOWS["lung"].width, WINDOWS["lung"].level) == (1500, -600)
    assert (WINDOWS["mediastinum"].width, WINDOWS["mediastinum"].level) == (350, 50)
    assert (WINDOWS["soft_tissue"].width, WINDOWS["soft_tissue"].level) == (400, 40)
    assert (WINDOWS["bone"].width, WINDOWS["bone"].level) == (2500, 480)
    hu = np.array([-1350, -600, 150, 2000], dtype=np.int16)
    assert window_to_uint8(hu, "lung").tolist() == [0, 127, 255, 255]
    with pytest.raises(ValueError, match="window: expected one of"):
        window_to_uint8(hu, "brain-ish")


def test_geometry_helpers():
    v = ramp_volume()
    assert v.voxel_to_mm((1, 2, 4)) == (2.0, 2.0, 2.0)
    assert v.voxel_to_lps((1, 2, 4)) == pytest.approx((-2.0, -6.0, 12.0))  # x axis, y axis, z normal (LPS)
    assert v.positions_mm == pytest.approx([10.0, 12.0, 14.0, 16.0])
    with pytest.raises(ValueError, match="spacing_zyx"):
        Volume(hu=v.hu, spacing_zyx=(0, 1, 1))


def test_resample_keeps_values_on_shared_grid_points():
    v = ramp_volume()
    r = resample(v, (1.0, 1.0, 1.0))
    assert r.shape == (7, 16, 8) and r.spacing_zyx == (1.0, 1.0, 1.0)
    assert np.array_equal(r.hu[::2, :, :], v.hu[:, :, ::2])  # coincident samples are unchanged
    assert r.hu[1, 0, 0] == v.hu[0, 0, 0]  # z interpolation between equal slices


def test_png_with_overlay_and_box(tmp_path):
    v = ramp_volume()
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    rgb = slice_rgb(v, 1, "soft_tissue", mask=mask, boxes=[(10, 10, 14, 14)])
    assert rgb.shape == (16, 16, 3)
    assert rgb[5, 5, 0] > rgb[5, 5, 1]  # red overlay inside the mask
    assert tuple(rgb[10, 12]) == (255, 215, 0)  # box edge
    path = render_slice_png(v, 1, tmp_path / "slice.png", window="bone", mask=mask)
    assert Image.open(path).size == (16, 16)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    with pytest.raises(ValueError, match="z: expected a slice index in 0..3"):
        slice_rgb(v, 4)
