"""`mmcore ct ...` from the command line: JSON layouts, one-line errors, lazy imports."""

import json
import subprocess
import sys

from apps import cli


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_ct_module_imports_only_the_standard_library():
    code = ("import sys, apps.commands.ct as m, argparse; p = argparse.ArgumentParser(); "
            "m.register(p.add_subparsers()); "
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'numpy', 'pydicom', 'scipy', 'cv2', 'pipelines'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_info_json_layout(small_series_dir):
    result = run("ct", "info", str(small_series_dir), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info) >= {"series", "picked", "skipped", "warnings"}
    assert set(info["series"][0]) >= {"series_uid", "modality", "description", "n_files"}
    picked = info["picked"]
    assert picked["shape"] == [24, 128, 128]
    assert len(picked["positions_mm"]) == 24 and picked["spacing_mm"][0] == 2.5
    assert picked["series_uid"] == info["series"][0]["series_uid"]


def test_info_bad_input_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    for target in (tmp_path, tmp_path / "missing"):
        result = run("ct", "info", str(target))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmcore: error: ") and "Traceback" not in result.stderr
    bomb = tmp_path / "b.zip"
    import zipfile

    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("../x.dcm", b"x")
    result = run("ct", "info", str(bomb))
    assert result.returncode == 2 and "would be written outside" in result.stderr


def test_phantom_command_writes_series_and_truth(tmp_path):
    out = tmp_path / "case"
    result = run("ct", "phantom", str(out), "--seed", "5", "--findings", "nodule,pleural_effusion", "--size", "96",
                 "--slices", "16", "--thickness", "5")
    assert result.returncode == 0, result.stderr
    truth = json.loads((out / "ground_truth.json").read_text())
    kinds = {f["type"] for f in truth["findings"]}
    assert kinds == {"nodule", "pleural_effusion"}
    assert len(list(out.glob("*.dcm"))) == 16
    for f in truth["findings"]:
        assert {"type", "side", "lobe"} <= set(f)
    assert set(truth["report"]) >= {"indication", "technique", "findings", "impression", "text"}
    again = run("ct", "phantom", str(out), "--seed", "5")
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = run("ct", "phantom", str(tmp_path / "x"), "--seed", "1", "--findings", "tumour")
    assert bad.returncode == 2 and "unknown type(s) ['tumour']" in bad.stderr


def test_eval_is_registered():
    parser = cli.build_parser()
    text = subprocess.run([sys.executable, "-m", "apps.cli", "eval", "ct-measure", "--help"], capture_output=True,
                          text=True).stdout
    assert "--n" in text and "--size" in text and "--slices" in text and "--json" in text
    assert parser.parse_args(["eval", "ct-measure", "--n", "2", "--json"]).n == 2


def test_eval_scoring_counts_hits_misses_and_false_positives():
    from pipelines.ct.evaluate import CaseResult, score

    truth = {"findings": [{"type": "nodule", "diameter_mm": 8.0, "center_zyx_mm": [50, 50, 50]},
                          {"type": "nodule", "diameter_mm": 6.0, "center_zyx_mm": [90, 90, 90]},
                          {"type": "pleural_effusion", "side": "left", "volume_ml": 200.0}],
             "lungs": {"laa950_percent": 10.0}}
    measured = {"findings": [{"type": "nodule", "diameter_mm": 8.6, "center_zyx_mm": [51, 50, 49]},
                             {"type": "nodule", "diameter_mm": 5.0, "center_zyx_mm": [10, 10, 10]},
                             {"type": "pleural_effusion", "side": "left", "volume_ml": 230.0}],
                "lungs": {"laa950_percent": 11.5}}
    m = score([CaseResult(1, truth, measured, 1.0)])
    assert m["nodule_sensitivity"] == 0.5 and m["fp_per_scan"] == 1.0
    assert abs(m["median_diameter_error_mm"] - 0.6) < 1e-9
    assert abs(m["effusion_volume_rel_error"] - 0.15) < 1e-9 and m["effusion_detection_rate"] == 1.0
    assert abs(m["emphysema_abs_error_pp"] - 1.5) < 1e-9 and m["pericardial_volume_rel_error"] is None
