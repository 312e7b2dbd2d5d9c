import numpy as np
import pytest

from pipelines.ct.grounding import apply_grounding, finding_labels, ground, label_text
from pipelines.ct.reference_report import reference_report
from pipelines.ct.report import FINDING_TYPES, Findings, build_report

MEASURED = [
    {"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 7.0, "long_axis_mm": 7.6, "short_axis_mm": 6.4,
     "composition": "solid"},
    {"type": "nodule", "side": "left", "lobe": "LLL", "diameter_mm": 5.0, "long_axis_mm": 5.4, "short_axis_mm": 4.6,
     "composition": "solid"},
]


def planted():
    narrative = (Findings(lungs_airways="There is a 12 mm solid nodule in the right upper lobe.",
                          pleura="Small left pleural effusion.", heart_pericardium="No pericardial effusion."),
                 "1. 12 mm nodule in the right upper lobe. 2. Left pleural effusion.")
    return build_report(MEASURED, narrative=narrative)


def test_grounding_flags_each_planted_problem():
    report = planted()
    kinds = [f.kind for f in report.flags]
    assert sorted(kinds) == ["measured_not_mentioned", "not_confirmed", "not_confirmed", "size_mismatch",
                             "size_mismatch"]
    missing = next(f for f in report.flags if f.kind == "measured_not_mentioned")
    assert missing.measurement_id == "M2" and "left lower lobe" in missing.message
    sizes = [f for f in report.flags if f.kind == "size_mismatch"]
    assert all(f.measurement_id == "M1" and "says 12 mm" in f.message and "measured 7 mm" in f.message for f in sizes)
    assert {f.message.split(" says")[0] for f in sizes} == {"Size mismatch: Lungs and airways",
                                                            "Size mismatch: Impression"}
    effusions = [f for f in report.flags if f.kind == "not_confirmed"]
    assert all("left pleural effusion" in f.message for f in effusions)


def test_replace_policy_rewrites_sizes_and_still_flags_them():
    narrative = (Findings(lungs_airways="There is a 1.2 cm solid nodule in the right upper lobe and a 5 mm nodule in "
                                        "the LLL."),
                 "1. 12 mm right upper lobe nodule.")
    report = build_report(MEASURED, narrative=narrative, size_policy="replace")
    assert report.findings.lungs_airways == ("There is a 0.7 cm solid nodule in the right upper lobe and a 5 mm nodule "
                                             "in the LLL.")
    assert report.impression == "1. 7 mm right upper lobe nodule."
    assert [f.kind for f in report.flags] == ["size_corrected", "size_corrected"]
    # After replacement the narrative agrees with the measurements: grounding again finds nothing to flag.
    corrections = list(report.flags)
    assert apply_grounding(report).flags == [] and report.flags == corrections  # the record of the change stays


def test_replace_policy_moves_a_nodule_to_its_measured_lobe_only_when_the_numbers_say_which():
    def narrative():
        return (Findings(lungs_airways="Solid nodule in the right lower lobe measuring 8 x 6 mm (mean 7 mm). "
                                       "A 5 mm nodule in the LLL."),
                "1. 7 mm solid nodule in the right middle lobe.")

    report = build_report(MEASURED, narrative=narrative(), size_policy="replace")
    assert report.findings.lungs_airways.startswith("Solid nodule in the right upper lobe measuring 8 x 6 mm")
    assert report.impression == "1. 7 mm solid nodule in the right upper lobe."
    moved = [f for f in report.flags if f.kind == "location_corrected"]
    assert [f.measurement_id for f in moved] == ["M1", "M1"]
    assert "in the right lower lobe; replaced with the measured right upper lobe" in moved[0].message
    assert {f.kind for f in report.flags} == {"location_corrected"}  # nothing left unmatched afterwards
    # check mode leaves the text alone and flags the disagreement instead
    checked = build_report(MEASURED, narrative=narrative())
    assert "right lower lobe" in checked.findings.lungs_airways
    assert {f.kind for f in checked.flags} == {"not_confirmed", "measured_not_mentioned"}
    # a size that fits no measured nodule is not moved anywhere
    odd = (Findings(lungs_airways="A 15 mm solid nodule in the right lower lobe. A 7 mm nodule in the RUL. "
                                  "A 5 mm nodule in the LLL."), "1. Nodules.")
    report = build_report(MEASURED, narrative=odd, size_policy="replace")
    assert "15 mm solid nodule in the right lower lobe" in report.findings.lungs_airways
    assert not [f for f in report.flags if f.kind == "location_corrected"]


def test_a_nodule_is_moved_to_a_lobe_whose_other_nodule_is_already_described():
    """Another mention in the measured lobe (of a different size) does not stop the move: it describes the other
    nodule there, not this one."""
    measured = MEASURED + [{"type": "nodule", "side": "left", "lobe": "LLL", "diameter_mm": 12.0,
                            "long_axis_mm": 13.0, "short_axis_mm": 11.0, "composition": "solid"}]
    narrative = (Findings(lungs_airways="A 12 mm nodule in the left lower lobe. A 7 mm nodule in the RUL. "
                                        "A 5 mm nodule in the right upper lobe."), "1. 12 mm nodule.")
    report = build_report(measured, narrative=narrative, size_policy="replace")
    assert report.findings.lungs_airways.endswith("A 5 mm nodule in the left lower lobe.")
    moved = [f for f in report.flags if f.kind == "location_corrected"]
    assert len(moved) == 1 and "5 mm solid nodule, left lower lobe" in moved[0].message
    assert "placed" in moved[0].message and "in the right upper lobe; replaced with the measured left lower lobe" \
        in moved[0].message
    assert not [f for f in report.flags if f.kind in ("not_confirmed", "measured_not_mentioned")]


def test_swapped_numbers_are_not_moved_when_a_measured_nodule_would_lose_its_only_mention():
    measured = [{"type": "nodule", "side": "left", "lobe": "LLL", "diameter_mm": 27.8, "long_axis_mm": 30.7,
                 "short_axis_mm": 24.9, "composition": "part-solid"},
                {"type": "nodule", "side": "right", "lobe": "RLL", "diameter_mm": 13.1, "long_axis_mm": 16.1,
                 "short_axis_mm": 10.2, "composition": "part-solid"}]
    narrative = (Findings(lungs_airways="Part-solid nodule in the left lower lobe measuring 13 x 13 mm. "
                                        "A 29 mm nodule is present in the right lower lobe (29 x 25 mm)."),
                 "1. 13 mm part-solid nodule in the left lower lobe.")
    report = build_report(measured, narrative=narrative, size_policy="replace")
    assert not [f for f in report.flags if f.kind == "location_corrected"]
    assert not [f for f in report.flags if f.kind == "measured_not_mentioned"]
    assert "left lower lobe" in report.findings.lungs_airways and "right lower lobe" in report.findings.lungs_airways


def test_two_nodules_in_one_lobe_are_told_apart_by_all_their_numbers():
    measured = [{"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 7.0, "long_axis_mm": 9.0,
                 "short_axis_mm": 5.0, "composition": "solid"},
                {"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 5.5, "long_axis_mm": 7.0,
                 "short_axis_mm": 4.0, "composition": "ground-glass"}]
    text = ("There is a solid nodule in the right upper lobe, 9 x 6 mm. "
            "A ground-glass nodule in the right upper lobe, 7 x 4 mm.")
    report = build_report(measured, narrative=(Findings(lungs_airways=text), "1. Two nodules."),
                          size_policy="replace")
    assert report.findings.lungs_airways == text  # each sentence fits its own nodule: nothing to rewrite
    assert report.flags == []


def test_grounding_replaces_its_own_flags_but_keeps_warnings():
    report = planted()
    report.flags.append(report.flags[0].model_copy(update={"kind": "voice_note", "message": "note unreadable"}))
    report.findings.lungs_airways = "A 7 mm nodule in the right upper lobe. A 5 mm nodule in the left lower lobe."
    report.findings.pleura, report.impression = "No pleural effusion.", "1. Two small nodules."
    apply_grounding(report)
    assert [f.kind for f in report.flags] == ["voice_note"]


@pytest.mark.parametrize("seed", range(6))
def test_every_wrong_size_is_flagged(seed):
    """Perturb random sizes in a correct narrative: the number of size flags equals the number of changed sizes."""
    rng = np.random.default_rng(seed)
    measured = [{"type": "nodule", "side": s, "lobe": lobe, "diameter_mm": d, "long_axis_mm": d + 0.6,
                 "short_axis_mm": d - 0.6, "composition": "solid"}
                for s, lobe, d in (("right", "RUL", 6.0), ("left", "LLL", 9.0), ("right", "RLL", 14.0))]
    report = build_report(measured)
    assert report.flags == []
    text = report.findings.lungs_airways
    numbers = [(m.start(), m.end()) for m in __import__("re").finditer(r"\d+(?= mm)", text)]
    changed = sorted(rng.choice(len(numbers), size=int(rng.integers(1, len(numbers) + 1)), replace=False))
    for i in reversed(changed):
        a, b = numbers[i]
        text = text[:a] + str(int(text[a:b]) + int(rng.integers(4, 9))) + text[b:]
    report.findings.lungs_airways = text
    flags = ground(report).flags
    assert [f.kind for f in flags] == ["size_mismatch"] * len(changed)


@pytest.mark.parametrize("text, expected", [
    ("No pleural effusion.", {}),
    ("No pleural or pericardial effusion.", {}),
    ("The heart is not enlarged; no pericardial effusion.", {}),
    ("Small right pleural effusion, about 120 mL.", {"pleural_effusion": ("right", None)}),
    ("Bilateral pleural effusions.", {"pleural_effusion": ("bilateral", None)}),
    ("Cardiomegaly. No pericardial effusion.", {"cardiomegaly": (None, None)}),
    ("There is no consolidation, but a 6 mm nodule in the left lower lobe.", {"nodule": ("left", "LLL")}),
    ("The previously seen nodule in the RUL is not seen.", {}),
    ("Calcified granuloma in the lingula.", {"calcified_granuloma": ("left", "LUL")}),
    ("A 1.2 cm mass in the right upper lobe.", {"nodule": ("right", "RUL")}),
    ("Moderate centrilobular emphysema.", {"emphysema": (None, None)}),
    ("Lungs are clear without focal airspace disease.", {}),
    ("Patchy consolidation in the right middle lobe.", {"consolidation": ("right", "RML")}),
])
def test_labeller_handles_negation_side_and_lobe(text, expected):
    positive = {m.type: (m.side, m.lobe) for m in label_text(text) if not m.negated}
    assert positive == expected


def test_labeller_sizes_and_volumes():
    [nodule] = label_text("A 1.2 x 0.8 cm part-solid nodule in the right upper lobe.")
    assert [v for v, _, _ in nodule.sizes_mm] == [12.0, 8.0]
    effusion, nodule = label_text("Small right pleural effusion (about 140 mL) and a 6 mm nodule in the RLL.")
    assert effusion.type == "pleural_effusion" and [v for v, _, _ in effusion.volumes_ml] == [140.0]
    assert nodule.sizes_mm[0][0] == 6.0 and effusion.sizes_mm == [] and nodule.volumes_ml == []


def test_labeller_agrees_with_independent_reference_wording():
    """Reference reports from the phantom's own grammar (other phrasings than the template): labels equal the truth."""
    rng = np.random.default_rng(7)
    lobes = ["RUL", "RML", "RLL", "LUL", "LLL"]

    class Cfg:
        thickness_mm = 2.5

    wrong = []
    for case in range(120):
        truth = [t for t in FINDING_TYPES if rng.random() < 0.35]
        findings = []
        for t in truth:
            lobe = str(rng.choice(lobes))
            side = "right" if lobe.startswith("R") else "left"
            d = float(rng.uniform(3, 25))
            findings.append({"type": t, "side": side, "lobe": lobe, "diameter_mm": d, "long_axis_mm": d * 1.1,
                             "short_axis_mm": d * 0.9, "composition": str(rng.choice(["solid", "ground-glass"])),
                             "volume_ml": float(rng.uniform(20, 900)), "laa950_percent": float(rng.uniform(6, 35)),
                             "predominance": "diffuse", "cardiothoracic_ratio": 0.58})
        text = reference_report(findings, None, Cfg, rng)["text"]
        labels = finding_labels(text)
        if {t for t, v in labels.items() if v} != set(truth):
            wrong.append((truth, labels, text))
    assert wrong == []


def test_many_similar_nodules_ground_cleanly_through_cited_ids():
    """Identical nodules in one lobe, more than the template lists one by one: cited ids and the count summary keep
    every measurement matched, and an Impression restatement attaches to the largest nodule."""
    measured = [{"type": "nodule", "side": "left", "lobe": "LLL", "diameter_mm": 6.0 + (i % 3), "long_axis_mm": 7.0,
                 "short_axis_mm": 5.0 + (i % 3), "composition": "solid"} for i in range(14)]
    measured.append({"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 19.0, "long_axis_mm": 20.0,
                     "short_axis_mm": 18.0, "composition": "solid"})
    report = build_report(measured)
    assert "additional smaller nodules" in report.findings.lungs_airways
    assert report.flags == []
    result = ground(report)
    assert all(result.matches[m.id] for m in report.measurements)
    impression_nodule = next(x for x in result.mentions if x.section == "impression" and x.type == "nodule")
    assert impression_nodule in result.matches["M15"]


def test_one_sentence_two_effusions_and_a_restated_granuloma():
    mentions = label_text("Small right pleural effusion and moderate left pleural effusion.")
    assert sorted(m.side for m in mentions) == ["left", "right"]
    [granuloma] = label_text("4 mm calcified nodule in the right middle lobe, consistent with a granuloma.")
    assert (granuloma.type, granuloma.lobe, granuloma.sizes_mm[0][0]) == ("calcified_granuloma", "RML", 4.0)


def _random_findings(rng, lobes=("RUL", "RML", "RLL", "LUL", "LLL")):
    findings = []
    for t in FINDING_TYPES:
        if rng.random() > 0.4:
            continue
        n = int(rng.integers(1, 3)) if t in ("nodule", "calcified_granuloma") else \
            (2 if t == "pleural_effusion" and rng.random() < 0.3 else 1)
        for k in range(n):
            lobe = str(rng.choice(lobes))
            f = {"type": t, "side": "right" if lobe.startswith("R") else "left", "lobe": None}
            if t in ("nodule", "calcified_granuloma", "consolidation"):
                f["lobe"] = lobe
            if t in ("nodule", "calcified_granuloma"):
                d = float(rng.uniform(3, 25))
                f.update(diameter_mm=round(d, 2), long_axis_mm=round(1.1 * d, 2), short_axis_mm=round(0.9 * d, 2),
                         composition="calcified" if t == "calcified_granuloma" else
                         str(rng.choice(["solid", "ground-glass", "part-solid"])))
            if t == "pleural_effusion":
                f["side"] = ["right", "left"][k] if n == 2 else str(rng.choice(["right", "left"]))
            if t in ("pleural_effusion", "pericardial_effusion", "consolidation"):
                f["volume_ml"] = round(float(rng.uniform(20, 1500)), 1)
            if t in ("emphysema", "cardiomegaly", "pericardial_effusion"):
                f["side"] = "bilateral" if t == "emphysema" else None
            if t == "emphysema":
                f.update(laa950_percent=round(float(rng.uniform(6, 35)), 2), predominance="diffuse")
            if t == "cardiomegaly":
                f["cardiothoracic_ratio"] = round(float(rng.uniform(0.5, 0.65)), 3)
            findings.append(f)
    return findings


def test_a_correct_narrative_in_other_wording_grounds_without_flags():
    """Reference reports (the wording the report model learns) against their own measurements: nothing to flag."""
    rng = np.random.default_rng(11)

    class Cfg:
        thickness_mm = 2.5

    flagged = []
    for _ in range(100):
        findings = _random_findings(rng)
        ref = reference_report(findings, None, Cfg, rng)
        report = build_report(findings, narrative=(Findings(lungs_airways=ref["findings"]), ref["impression"]))
        assert len(report.measurements) == len(findings)
        flagged += [(f.kind, f.message) for f in report.flags]
    assert flagged == []
