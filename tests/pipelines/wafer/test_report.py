import json

import numpy as np
import pytest

from pipelines.wafer.maps import WaferMap, read_sources, source_file, write_npy
from pipelines.wafer.report import DENSITY_SIZE, LotWafer, build_report, density_rgb, export


def test_source_file_parsing():
    assert source_file("/a/b.npz#12") == "/a/b.npz"
    assert source_file("/a/lot.zip::x/y.npy") == "/a/lot.zip"
    assert source_file("/a/odd#name.npy") == "/a/odd#name.npy"


def test_report_flags_yield_density_and_exports(tmp_path, make_disc):
    grids = {"w1": make_disc(30, 30, True), "w2": make_disc(30, 30, False), "w3": make_disc(26, 27, True)}
    for name, g in grids.items():
        write_npy(WaferMap(grid=g, wafer_id=name), tmp_path / "in" / f"{name}.npy")
    wafers = [
        LotWafer("w1", str(tmp_path / "in" / "w1.npy"), "ok", slot=2, predicted_class="Center",
                 class_probs={"Center": 0.9}, defect_score=0.9, anomaly_score=0.2, model_id="wafer@abc"),
        LotWafer("w2", str(tmp_path / "in" / "w2.npy"), "ok", slot=1, predicted_class="none", defect_score=0.1,
                 anomaly_score=0.995, model_id="wafer@abc"),
        LotWafer("w3", str(tmp_path / "in" / "w3.npy"), "ok", slot=3, predicted_class="Loc", defect_score=0.4,
                 anomaly_score=0.5),
        LotWafer("gone", str(tmp_path / "in" / "gone.npy"), "error", error="gone.npy: no such file"),
    ]
    maps = read_sources((w.source, w.wafer_id) for w in wafers)
    assert set(maps) == {(w.source, w.wafer_id) for w in wafers[:3]}
    report = build_report("L7", "P1", wafers, maps, defect_threshold=0.5, anomaly_threshold=0.99)
    assert [w.wafer_id for w in report.wafers] == ["w2", "w1", "w3", "gone"]  # by slot
    assert {w.wafer_id: w.flags for w in report.excursions} == {"w2": ["anomaly"], "w1": ["defect"]}
    w2 = next(w for w in report.wafers if w.wafer_id == "w2")
    assert w2.yield_pct == 100.0 and report.maps_read == 3
    s = report.summary()
    assert s["class_histogram"]["Center"] == 1 and s["class_histogram"]["none"] == 1 and s["errors"] == 1
    expected_yield = np.mean([WaferMap(grid=g, wafer_id="").yield_pct for g in grids.values()])
    assert s["mean_yield_pct"] == pytest.approx(expected_yield, abs=1e-3)
    assert report.density.shape == (DENSITY_SIZE, DENSITY_SIZE)
    assert report.density[DENSITY_SIZE // 2, DENSITY_SIZE // 2] == pytest.approx(2 / 3)  # 2 of 3 maps fail there
    assert report.density[2, DENSITY_SIZE // 2] == 0.0
    files = export(report, tmp_path / "out")
    assert set(files) == {"csv", "json", "pdf", "density_png", "gallery_png"}
    doc = json.loads(files["json"].read_text())
    assert doc["summary"]["excursions"][0]["wafer_id"] == "w2" and len(doc["wafers"]) == 4
    assert files["pdf"].read_bytes().startswith(b"%PDF-") and files["pdf"].stat().st_size > 3000
    lines = files["csv"].read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("wafer_id,source,slot,status")


def test_density_colours_span_the_ramp():
    rgb = density_rgb(np.array([[0.0, 0.5], [1.0, 0.25]]), scale=1)
    assert tuple(rgb[0, 0]) == (68, 1, 84) and tuple(rgb[1, 0]) == (253, 231, 37)
