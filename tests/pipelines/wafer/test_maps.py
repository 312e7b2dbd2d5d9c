import io
import pickle
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.wafer import maps
from pipelines.wafer.maps import (WaferFormatError, WaferMap, WaferReadError, g85_xml, iter_wafers, read_g85,
                                  read_lswmd, read_mixedwm38, read_npy, read_png, write_g85, write_npy, write_png)


def test_npy_round_trip_uses_stem_as_wafer_id(tmp_path, grid):
    path = write_npy(WaferMap(grid=grid, wafer_id="ignored"), tmp_path / "W07.npy")
    wafer = read_npy(path)
    assert wafer.wafer_id == "W07"
    assert wafer.grid.dtype == np.uint8 and np.array_equal(wafer.grid, grid)
    assert wafer.n_fail == int((grid == 2).sum()) and 0 < wafer.yield_pct < 100
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 4), 3), "found [3]"),
    (np.zeros((4, 4), dtype=np.int64), "no dies"),
    (np.zeros((0, 5), dtype=np.uint8), "non-empty 2-D grid"),
    (np.ones((2, 2, 2), dtype=np.uint8), "non-empty 2-D grid"),
    (np.array([[1.5, 1.0]]), "non-integer"),
    (np.array([[-1, 1]]), "found [-1]"),
])
def test_npy_rejects_bad_grids_naming_the_file(tmp_path, bad, message):
    path = tmp_path / "bad.npy"
    np.save(path, bad)
    with pytest.raises(WaferFormatError) as info:
        read_npy(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_npy_garbage_is_a_format_error(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"not numpy at all")
    with pytest.raises(WaferFormatError, match=r"junk.npy: not a .npy file \(expected the \\x93NUMPY header, "
                                               r"found b'not nump'\)"):
        read_npy(path)


def test_npy_truncated_after_header_is_a_format_error(tmp_path, grid):
    whole = tmp_path / "whole.npy"
    np.save(whole, grid)
    path = tmp_path / "cut.npy"
    path.write_bytes(whole.read_bytes()[:-10])
    with pytest.raises(WaferFormatError, match="cut.npy: not a readable .npy array"):
        read_npy(path)


def test_g85_round_trip_keeps_bins_and_metadata(tmp_path, grid):
    wafer = WaferMap(grid=grid, wafer_id="W01", lot_id="LOT9", product="P1", slot=3)
    path = write_g85(wafer, tmp_path / "w.xml")
    back = read_g85(path)
    assert np.array_equal(back.grid, grid)
    assert (back.wafer_id, back.lot_id, back.product, back.slot) == ("W01", "LOT9", "P1", 3)
    assert back.bin_quality == {"1": "pass", "X": "fail"} and back.null_bin == "."
    assert back.bins[grid == 2].tolist() == ["X"] * int((grid == 2).sum())
    # A second write keeps the original codes.
    again = read_g85(write_g85(back, tmp_path / "w2.xml"))
    assert np.array_equal(again.bins, back.bins)


def g85_text(rows, bins='<Bin BinCode="1" BinCount="0" BinQuality="Pass"/><Bin BinCode="7" BinCount="0" '
                       'BinQuality="Fail"/>', orientation="0", null='NullBin="."', bin_type="ASCII", columns=None):
    columns = columns if columns is not None else len(rows[0].split()) if bin_type == "Decimal" else len(rows[0])
    body = "".join(f"<Row>{r}</Row>" for r in rows)
    return (f'<?xml version="1.0"?><Map xmlns:semi="http://www.semi.org" WaferId="G1" FormatRevision="G85-1101">'
            f'<Device LotId="L1" Rows="{len(rows)}" Columns="{columns}" Orientation="{orientation}" '
            f'OriginLocation="2" BinType="{bin_type}" {null}>{bins}<Data MapName="M" Version="1">{body}</Data>'
            f"</Device></Map>").encode()


def test_g85_decimal_bins_and_orientation_normalised(tmp_path):
    rows = ["000 001 001", "001 007 001", "001 001 000"]
    path = tmp_path / "dec.xml"
    path.write_bytes(g85_text(rows, null='NullBin="0"', bin_type="Decimal",
                              bins='<Bin BinCode="001" BinCount="6" BinQuality="Pass"/>'
                                   '<Bin BinCode="007" BinCount="1" BinQuality="Fail"/>'))
    wafer = read_g85(path)
    assert wafer.grid.tolist() == [[0, 1, 1], [1, 2, 1], [1, 1, 0]]
    assert wafer.bins[1, 1] == "7" and wafer.bin_quality == {"1": "pass", "7": "fail"}
    # Notch at 90 degrees: the map is rotated so the notch ends at the bottom.
    path.write_bytes(g85_text(["..7", "111", "111"], orientation="90"))
    rotated = read_g85(path)
    assert rotated.grid.tolist() == np.rot90(np.array([[0, 0, 2], [1, 1, 1], [1, 1, 1]])).tolist()


@pytest.mark.parametrize("content, message", [
    (b"<Map><Device", "not well-formed XML"),
    (b"<Wafer/>", "expected a G85 <Map> root"),
    (g85_text(["1Z1"]), "bin codes ['Z'] have no <Bin> entry"),
    (g85_text(["111"], null=""), "no NullBin"),
    (g85_text(["111", "11"], columns=3), "row 1 holds 2 bins"),
    (g85_text(["111"], orientation="45"), "Orientation must be 0/90/180/270"),
    (g85_text(["111"], bins='<Bin BinCode="1" BinCount="3" BinQuality="Maybe"/>'), "BinQuality Pass|Fail"),
    (b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaa">]><Map/>', "DTDs and entities"),
])
def test_g85_malformed_inputs(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_bytes(content)
    with pytest.raises(WaferFormatError) as info:
        read_g85(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_png_round_trip_and_grey_rendering(tmp_path, grid):
    path = write_png(WaferMap(grid=grid, wafer_id="P5", lot_id="L2"), tmp_path / "p.png", scale=5)
    assert Image.open(path).size == (grid.shape[1] * 5, grid.shape[0] * 5)
    back = read_png(path)
    assert np.array_equal(back.grid, grid) and (back.wafer_id, back.lot_id) == ("P5", "L2")
    # A plain grey rendering, one pixel per die (0 no die, 127 pass, 255 fail).
    grey = tmp_path / "grey.png"
    Image.fromarray((grid * 127.5).astype(np.uint8), mode="L").save(grey)
    assert np.array_equal(read_png(grey).grid, grid)


def test_png_bad_inputs(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    with pytest.raises(WaferFormatError, match="junk.png: not a readable PNG"):
        read_png(junk)
    blue = tmp_path / "blue.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(blue)
    with pytest.raises(WaferFormatError, match="blue.png: pixel colours"):
        read_png(blue)


def test_mixedwm38_npz_labels_and_a_bad_map(tmp_path, make_pattern):
    good = np.stack([make_pattern("Center", 1, 52), make_pattern("Scratch", 2, 52), np.full((52, 52), 9)])
    labels = np.zeros((3, 8), dtype=np.int64)
    labels[0, 0] = 1                      # Center
    labels[1, [3, 6]] = 1                 # Edge-Ring + Scratch (MixedWM38 column 6 is Scratch)
    path = tmp_path / "mixed.npz"
    np.savez(path, good, labels)
    items = list(read_mixedwm38(path))
    assert [type(i) for i in items] == [WaferMap, WaferMap, WaferReadError]
    assert items[0].labels == ("Center",) and items[1].labels == ("Edge-Ring", "Scratch")
    assert items[2].wafer_id == "mixed_000002" and f"{path}#2" in items[2].error
    np.savez(tmp_path / "wrong.npz", maps=good)
    with pytest.raises(WaferFormatError, match="expected MixedWM38 arrays arr_0"):
        list(read_mixedwm38(tmp_path / "wrong.npz"))


def lswmd_frame(make_disc):
    """A DataFrame shaped like LSWMD.pkl: nested label arrays, empty when unlabelled, float dieSize."""
    return pd.DataFrame({
        "waferMap": [make_disc(25, 27), make_disc(30, 30, False), np.full((3, 3), 5, dtype=np.uint8)],
        "dieSize": [533.0, 700.0, 9.0],
        "lotName": ["lot1", "lot1", "lot2"],
        "waferIndex": [1.0, 2.0, 1.0],
        "trianTestLabel": [np.array([["Training"]]), np.array([], dtype=object), np.array([["Test"]])],
        "failureType": [np.array([["Center"]]), np.array([], dtype=object), np.array([["none"]])],
    }, index=[10, 11, 12])


def test_lswmd_pickle_nested_labels_and_bad_row(tmp_path, make_disc):
    path = tmp_path / "LSWMD.pkl"
    lswmd_frame(make_disc).to_pickle(path)
    items = list(read_lswmd(path))
    assert isinstance(items[0], WaferMap) and items[0].labels == ("Center",)
    assert (items[0].wafer_id, items[0].lot_id, items[0].slot, items[0].die_size) == ("lot1_01", "lot1", 1, 533.0)
    assert items[1].labels is None  # unlabelled
    assert isinstance(items[2], WaferReadError) and items[2].wafer_id == "lot2_01" and f"{path}#2" in items[2].error


def test_lswmd_old_pandas_module_paths_are_tolerated(tmp_path, make_disc):
    frame = lswmd_frame(make_disc)
    raw = pickle.dumps(frame, protocol=2)
    # Protocol 2 names classes as text; rewrite the index class the way pandas 0.x pickled it.
    renames = {b"cpandas\nIndex\n": b"cpandas.indexes.numeric\nInt64Index\n",
               b"cpandas.core.internals.managers\nBlockManager\n": b"cpandas.core.internals\nBlockManager\n",
               b"cnumpy._core.multiarray\n": b"cnumpy.core.multiarray\n"}
    old = raw
    for new_path, old_path in renames.items():
        assert new_path in old
        old = old.replace(new_path, old_path)
    path = tmp_path / "old.pkl"
    path.write_bytes(old)
    items = list(read_lswmd(path))
    assert items[0].labels == ("Center",) and np.array_equal(items[0].grid, make_disc(25, 27))


def test_pickle_naming_other_modules_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("boom",))
    raw = pickle.dumps(Evil(), protocol=2)
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    with pytest.raises(WaferFormatError, match="refusing to load builtins.print"):
        list(read_lswmd(path))
    path.write_bytes(raw.replace(b"c__builtin__\nprint", b"cos\nsystem"))
    with pytest.raises(WaferFormatError, match="refusing to load os.system"):
        list(read_lswmd(path))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WaferFormatError, match="expected a DataFrame with a waferMap column"):
        list(read_lswmd(plain))


def test_iter_wafers_folders_zips_every_wafer_once(tmp_path, grid, make_disc):
    folder = tmp_path / "in"
    write_npy(WaferMap(grid=grid, wafer_id="a"), folder / "a.npy")
    write_g85(WaferMap(grid=grid, wafer_id="b"), folder / "sub" / "b.xml")
    (folder / "c.npy").write_bytes(b"broken")
    (folder / "notes.txt").write_text("ignored: not a wafer file")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("z1.npy", _npy_bytes(grid))
        z.writestr("dir/z2.xml", g85_xml(WaferMap(grid=grid, wafer_id="z2")))
        z.writestr("z3.xml", b"<Map")
    (tmp_path / "lot.zip").write_bytes(buf.getvalue())
    items = list(iter_wafers([folder, tmp_path / "lot.zip", tmp_path / "missing.npy"]))
    ids = [i.wafer_id for i in items]
    assert ids == ["a", "c", "b", "z2", "z1", "z3", "missing"]
    errors = {i.wafer_id: i for i in items if isinstance(i, WaferReadError)}
    assert set(errors) == {"c", "z3", "missing"}
    assert str(folder / "c.npy") in errors["c"].error
    assert f"{tmp_path / 'lot.zip'}::z3.xml" in errors["z3"].error and errors["z3"].source.endswith("::z3.xml")
    assert "no such file" in errors["missing"].error
    z2 = next(i for i in items if i.wafer_id == "z2")
    assert z2.source == f"{tmp_path / 'lot.zip'}::dir/z2.xml" and np.array_equal(z2.grid, grid)


def test_unknown_suffix_and_bad_zip(tmp_path):
    (tmp_path / "x.bmp").write_bytes(b"BM")
    (tmp_path / "y.zip").write_bytes(b"nope")
    items = list(maps.read_file(tmp_path / "x.bmp")) + list(iter_wafers([tmp_path / "y.zip"]))
    assert "unknown wafer file type '.bmp'" in items[0].error
    assert "not a readable zip archive" in items[1].error


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
