"""Cardiothoracic ratio, consolidation and pericardial effusion on phantoms with those findings forced
(256 x 256 x 96 at 2.5 mm, the size of the held-out evaluation; seeds from the development range)."""

import numpy as np
import pytest

from pipelines.ct.measure import CARDIOMEGALY_CTR, measure
from pipelines.ct.phantom import PhantomConfig, make_phantom

CFG = PhantomConfig(size=256, slices=96, thickness_mm=2.5)
CASES = {"cardiomegaly": (5052, ["cardiomegaly"]), "normal": (5064, []), "consolidation": (5045, ["consolidation"]),
         "consolidation_left": (5041, ["consolidation"]), "pericardial": (5076, ["pericardial_effusion"])}


@pytest.fixture(scope="module")
def cases():
    out = {}
    for name, (seed, findings) in CASES.items():
        phantom = make_phantom(seed, findings, CFG)
        out[name] = (phantom, measure(phantom.volume))
    return out


def truth_of(phantom, kind):
    return [f for f in phantom.ground_truth["findings"] if f["type"] == kind]


def test_cardiomegaly_is_reported_with_its_ratio(cases):
    phantom, found = cases["cardiomegaly"]
    truth = phantom.ground_truth["cardiothoracic_ratio"]
    assert truth >= 0.53
    enlarged = found.of_type("cardiomegaly")
    assert len(enlarged) == 1
    ratio = enlarged[0].extra["cardiothoracic_ratio"]
    assert ratio > CARDIOMEGALY_CTR and ratio == pytest.approx(truth, abs=0.02)
    assert found.heart["cardiothoracic_ratio"] == ratio
    # The heart fills 45-60 % of the chest: its diameter is in the range of an enlarged adult heart (mm).
    assert 120 < found.heart["heart_diameter_mm"] < 180 and 220 < found.heart["thoracic_diameter_mm"] < 330
    row = enlarged[0].to_dict()
    assert row["type"] == "cardiomegaly" and row["cardiothoracic_ratio"] == ratio
    z0, y0, x0, z1, y1, x1 = row["bbox_zyx"]
    cz, cy, cx = row["center_voxel"]
    assert z0 <= cz < z1 and y0 <= cy < y1 and x0 <= cx < x1


def test_normal_heart_has_a_normal_ratio_and_no_finding(cases):
    phantom, found = cases["normal"]
    truth = phantom.ground_truth["cardiothoracic_ratio"]
    assert found.heart["cardiothoracic_ratio"] == pytest.approx(truth, abs=0.02)
    assert found.heart["cardiothoracic_ratio"] < CARDIOMEGALY_CTR
    kinds = [f.type for f in found.findings]
    assert "cardiomegaly" not in kinds and "consolidation" not in kinds and "pericardial_effusion" not in kinds
    heart = found.to_dict()["heart"]
    assert set(heart) == {"cardiothoracic_ratio", "heart_diameter_mm", "thoracic_diameter_mm"}
    assert heart["cardiothoracic_ratio"] == pytest.approx(heart["heart_diameter_mm"] / heart["thoracic_diameter_mm"],
                                                          abs=1e-3)


def test_large_heart_is_not_a_pericardial_effusion(cases):
    """The partial-volume cap where an enlarged heart meets the fat below it has fluid density; it is no effusion."""
    for name in ("cardiomegaly", "normal"):
        _, found = cases[name]
        assert not found.of_type("pericardial_effusion"), name


def test_pericardial_effusion_is_found_and_left_out_of_the_heart_diameter(cases):
    phantom, found = cases["pericardial"]
    truth = truth_of(phantom, "pericardial_effusion")[0]
    measured = found.of_type("pericardial_effusion")
    assert len(measured) == 1 and measured[0].volume_ml == pytest.approx(truth["volume_ml"], rel=0.2)
    # The fluid lies outside the epicardial fat: the ratio is the heart's, not the heart's plus the fluid's.
    assert found.heart["cardiothoracic_ratio"] == pytest.approx(phantom.ground_truth["cardiothoracic_ratio"], abs=0.02)
    assert not found.of_type("cardiomegaly")


@pytest.mark.parametrize("name", ["consolidation", "consolidation_left"])
def test_consolidation_found_on_its_side_and_lobe(cases, name):
    phantom, found = cases[name]
    truth = truth_of(phantom, "consolidation")[0]
    measured = found.of_type("consolidation")
    assert len(measured) == 1, [f.to_dict() for f in measured]
    c = measured[0]
    assert c.side == truth["side"] and c.lobe == truth["lobe"]
    assert c.volume_ml == pytest.approx(truth["volume_ml"], rel=0.2)
    assert -150 < c.mean_hu < 60  # soft-tissue density with some air in its bronchograms
    assert float(np.linalg.norm(np.subtract(c.center_zyx_mm, truth["center_zyx_mm"]))) < 12
    # The dense region is no nodule.
    assert not [n for n in found.of_type("nodule")
                if float(np.linalg.norm(np.subtract(n.center_zyx_mm, c.center_zyx_mm))) < 25]
    assert {"side", "lobe", "volume_ml", "mean_hu", "center_zyx_mm", "center_voxel", "bbox_zyx"} <= set(c.to_dict())


def test_eval_scores_whole_finding_detection():
    from pipelines.ct.evaluate import CaseResult, score

    truth = {"findings": [{"type": "consolidation", "side": "right", "volume_ml": 40.0},
                          {"type": "cardiomegaly", "cardiothoracic_ratio": 0.56}],
             "lungs": {"laa950_percent": 1.0}, "cardiothoracic_ratio": 0.56}
    measured = {"findings": [{"type": "consolidation", "side": "right", "volume_ml": 42.0},
                             {"type": "consolidation", "side": "left", "volume_ml": 9.0},
                             {"type": "pericardial_effusion", "volume_ml": 80.0}],
                "lungs": {"laa950_percent": 1.0}, "heart": {"cardiothoracic_ratio": 0.49}}
    m = score([CaseResult(1, truth, measured, 1.0)])
    assert m["consolidation_precision"] == 0.5 and m["consolidation_recall"] == 1.0 and m["n_consolidation"] == 1
    assert m["cardiomegaly_precision"] is None and m["cardiomegaly_recall"] == 0.0
    assert m["pericardial_effusion_precision"] == 0.0 and m["pericardial_effusion_recall"] is None
    assert m["cardiothoracic_ratio_abs_error"] == pytest.approx(0.07)
