import json

import numpy as np
import pytest

from pipelines.ct.errors import PhantomError
from pipelines.ct.phantom import FINDING_TYPES, PhantomConfig, make_phantom, parse_findings, write_phantom
from pipelines.ct.reference_report import fleischner

TINY = PhantomConfig(size=96, slices=20, thickness_mm=5.0)


def test_same_seed_same_phantom_and_different_seeds_differ():
    a = make_phantom(31, None, TINY)
    b = make_phantom(31, None, TINY)
    c = make_phantom(32, None, TINY)
    assert np.array_equal(a.volume.hu, b.volume.hu) and a.ground_truth == b.ground_truth
    assert not np.array_equal(a.volume.hu, c.volume.hu)


def test_hu_of_tissues_and_noise_is_correlated(small_phantom):
    hu = small_phantom.volume.hu
    lung = hu[small_phantom.lung_mask]
    assert -900 < np.median(lung) < -800
    assert hu[:, :4, :].mean() < -990 + 20  # air above the patient
    # Noise in a flat air patch is FBP-like: a ramp spectrum, so neighbours correlate (white noise: rho ~ 0) and
    # the lowest frequencies carry almost no power.
    patch = hu[:, 2:14, 20:100].astype(float)
    patch -= patch.mean()
    rho = (patch[:, :, 1:] * patch[:, :, :-1]).mean() / patch.var()
    assert abs(rho) > 0.1
    from pipelines.ct.phantom import _noise_filter

    amp = _noise_filter(256, 0.7)  # 0.7 mm pixels: peak of the spectrum well inside the band
    radial = amp[0, :]
    assert radial[0] == 0 and 10 < int(np.argmax(radial)) < 100 and radial[-1] < radial.max() / 2


def test_forced_findings_and_normal_chest():
    normal = make_phantom(33, parse_findings("none"), TINY)
    assert normal.ground_truth["findings"] == []
    forced = make_phantom(33, parse_findings("nodule,pleural_effusion"), TINY)
    kinds = {f["type"] for f in forced.ground_truth["findings"]}
    assert kinds == {"nodule", "pleural_effusion"}
    for f in forced.ground_truth["findings"]:
        if f["type"] == "nodule":
            assert 3 <= f["diameter_mm"] <= 32 and f["side"] in ("left", "right")
            assert f["lobe"] in ("RUL", "RML", "RLL", "LUL", "LLL") and f["lobe"][0] == f["side"][0].upper()
            z, y, x = f["center_zyx_mm"]
            assert 0 <= z <= 19 * 5.0 and 0 <= x <= 95 * TINY.pixel_mm
        else:
            assert f["volume_ml"] > 0
    with pytest.raises(PhantomError, match="unknown type"):
        parse_findings("nodule,tumour")


def test_seed_mix_mostly_has_findings():
    seeds = range(40, 60)
    from pipelines.ct.phantom import draw_findings

    with_findings = sum(bool(draw_findings(np.random.default_rng(s), None)) for s in seeds)
    assert with_findings >= 14
    assert set(FINDING_TYPES) == {"nodule", "pleural_effusion", "pericardial_effusion", "emphysema", "consolidation",
                                  "cardiomegaly", "calcified_granuloma"}


def test_nodule_ground_truth_matches_the_pixels():
    ph = make_phantom(34, ["nodule"], PhantomConfig(size=160, slices=40, thickness_mm=2.5))
    dz, dy, dx = ph.volume.spacing_zyx
    for f in ph.ground_truth["findings"]:
        z, y, x = (int(round(c / s)) for c, s in zip(f["center_zyx_mm"], (dz, dy, dx)))
        centre = ph.volume.hu[z, y, x]
        if f["diameter_mm"] >= 8:
            assert centre > (-400 if f["composition"] == "ground-glass" else -150), f


def test_write_phantom_is_atomic_and_complete(tmp_path):
    ph = make_phantom(35, ["emphysema", "cardiomegaly"], TINY)
    out = write_phantom(ph, tmp_path / "case")
    truth = json.loads((out / "ground_truth.json").read_text())
    assert len(list(out.glob("IM*.dcm"))) == 20
    assert {f["type"] for f in truth["findings"]} == {"emphysema", "cardiomegaly"}
    emph = next(f for f in truth["findings"] if f["type"] == "emphysema")
    assert emph["laa950_percent"] == pytest.approx(truth["lungs"]["laa950_percent"], abs=0.01) and emph["laa950_percent"] > 3
    assert next(f for f in truth["findings"] if f["type"] == "cardiomegaly")["cardiothoracic_ratio"] > 0.5
    report = truth["report"]
    for section in ("INDICATION:", "TECHNIQUE:", "FINDINGS:", "IMPRESSION:"):
        assert section in report["text"]
    assert "emphysema" in report["impression"].lower() and "5 mm" in report["technique"]
    assert [p.name for p in tmp_path.iterdir()] == ["case"]  # no temp folder left behind
    with pytest.raises(PhantomError, match="not empty"):
        write_phantom(ph, out)


def test_report_wording_varies_and_follow_up_follows_fleischner():
    texts = {make_phantom(s, ["pleural_effusion"], TINY).ground_truth["report"]["findings"] for s in range(36, 40)}
    assert len(texts) >= 3
    solid = {"diameter_mm": 7.0, "composition": "solid"}
    assert "6-12 months" in fleischner([solid])
    assert "3-6 months" in fleischner([solid, {"diameter_mm": 6.5, "composition": "solid"}])
    assert "No routine follow-up" in fleischner([{"diameter_mm": 4.0, "composition": "solid"}])
    assert "PET/CT" in fleischner([{"diameter_mm": 12.0, "composition": "solid"}])
    assert "every 2 years" in fleischner([{"diameter_mm": 9.0, "composition": "ground-glass"}])
    assert "annual CT" in fleischner([{"diameter_mm": 9.0, "composition": "part-solid"}])
    assert fleischner([]) == ""


def test_config_is_validated():
    with pytest.raises(ValueError, match="size: expected 32..1024"):
        PhantomConfig(size=8).validate()
    with pytest.raises(ValueError, match="thickness_mm"):
        PhantomConfig(thickness_mm=20).validate()
