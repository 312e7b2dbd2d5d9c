import csv
import json
import zipfile

import numpy as np
import pytest

from apps.cli import main
from pipelines.wafer.batch import RESULT_KEYS
from pipelines.wafer.maps import CLASSES, WaferMap, g85_xml


@pytest.fixture
def lot_inputs(tmp_path):
    """A folder of 12 synthetic .npy maps + a broken one, a zip with two G85 maps, and a missing file."""
    assert main(["wafer", "synth", str(tmp_path / "maps"), "--n", "12", "--seed", "4"]) == 0
    (tmp_path / "maps" / "broken.npy").write_bytes(b"not an array")
    grid = np.load(tmp_path / "maps" / "syn4_000000.npy")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as z:
        z.writestr("g1.xml", g85_xml(WaferMap(grid=grid, wafer_id="g1")))
        z.writestr("g2.xml", b"<Map><oops")
    return [str(tmp_path / "maps"), str(tmp_path / "more.zip"), str(tmp_path / "gone.npy")]


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCORE_DATA_DIR", str(tmp_path / "data"))
    return f"sqlite:///{tmp_path / 'wafers.db'}"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_writes_every_input_once_then_resumes(tmp_path, lot_inputs, db, wafer_checkpoint, capsys):
    out = tmp_path / "results.jsonl"
    args = ["wafer", "score", *lot_inputs, "--lot", "LOT-A", "--db", db, "--checkpoint", str(wafer_checkpoint),
            "--batch-size", "5", "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 16 and all(list(r) == list(RESULT_KEYS) for r in rows)
    assert len({(r["source"], r["wafer_id"]) for r in rows}) == 16
    status = {r["wafer_id"]: r["status"] for r in rows}
    assert [k for k, v in status.items() if v == "error"] == ["broken", "g2", "gone"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(list(r["class_probs"]) == list(CLASSES) and r["error"] is None for r in ok)
    assert all(abs(r["class_probs"]["none"] - (1 - r["defect_score"])) < 1e-5 for r in ok)
    assert "lot LOT-A: 16 wafers (13 ok, 3 errors, 0 already scored)" in capsys.readouterr().out

    # Resume: the 13 scored wafers come back from the store, unchanged; only the 3 errors are tried again.
    out_csv = tmp_path / "again.csv"
    assert main([*args, "--out", str(out_csv)]) == 0
    assert "16 wafers (13 ok, 3 errors, 13 already scored)" in capsys.readouterr().out
    with open(out_csv, newline="") as f:
        again = list(csv.DictReader(f))
    assert [r["wafer_id"] for r in again] == [r["wafer_id"] for r in rows]
    first = {r["wafer_id"]: r for r in ok}
    for r in again:
        if r["status"] == "ok":
            assert float(r["defect_score"]) == pytest.approx(first[r["wafer_id"]]["defect_score"], abs=1e-5)

    # Lot report from the store, maps read back from their files.
    rep = tmp_path / "report"
    assert main(["wafer", "report", "LOT-A", "--db", db, "--out", str(rep)]) == 0
    summary = json.loads((rep / "LOT-A.json").read_text())["summary"]
    assert summary["wafers"] == 16 and summary["errors"] == 3 and summary["maps_read"] == 13
    assert sum(summary["class_histogram"].values()) == 13
    assert 50 < summary["mean_yield_pct"] < 100
    assert (rep / "LOT-A.pdf").read_bytes()[:5] == b"%PDF-" and (rep / "LOT-A-density.png").stat().st_size > 500
    with open(rep / "LOT-A.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 16


def test_new_lot_id_and_thresholds_file(tmp_path, lot_inputs, db, wafer_checkpoint, capsys):
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"P9": {"defect": 1.0, "anomaly": 1.0}}))
    out = tmp_path / "r.jsonl"
    assert main(["wafer", "score", lot_inputs[0], "--product", "P9", "--thresholds", str(thresholds), "--db", db,
                 "--checkpoint", str(wafer_checkpoint), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("lot LOT-") and "0 over defect threshold 1.0" in text
    assert {r["predicted_class"] for r in read_jsonl(out) if r["status"] == "ok"} == {"none"}


@pytest.mark.parametrize("extra, message", [
    (["--out", "results.txt"], "--out: expected a .csv or .jsonl"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--checkpoint", "/nonexistent"], "/nonexistent/config.json"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, lot_inputs, db, wafer_checkpoint, extra, message, capsys):
    assert main(["wafer", "score", lot_inputs[0], "--db", db, "--no-progress", "--checkpoint", str(wafer_checkpoint),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_report_of_unknown_lot(db, capsys):
    assert main(["wafer", "report", "NOPE", "--db", db]) == 2
    assert "NOPE" in capsys.readouterr().err
