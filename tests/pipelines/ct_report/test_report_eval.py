import pytest

from pipelines.ct.report_eval import f1_table, location_hits


def nodule(lobe, diameter, composition="solid"):
    return {"type": "nodule", "lobe": lobe, "side": "right" if lobe[0] == "R" else "left", "diameter_mm": diameter,
            "composition": composition}


def test_location_pairs_references_and_mentions_one_to_one_by_size():
    text = ("A 7 mm solid nodule is present in the right upper lobe (8 x 7 mm). "
            "A 7 mm solid nodule is present in the right lower lobe (7 x 7 mm).")
    # Both mentions are 7 mm: each reference takes the mention whose sizes fit it best overall, once.
    assert location_hits(text, "", [nodule("RLL", 6.5), nodule("RUL", 7.25)]) == (2, 2)
    assert location_hits(text, "", [nodule("RUL", 6.5), nodule("LUL", 7.25)]) == (0, 2)


def test_location_pairing_uses_the_composition_named():
    text = ("Ground-glass nodule in the right upper lobe measuring 30 x 23 mm (mean 26 mm). "
            "Solid nodule in the left upper lobe measuring 28 x 23 mm (mean 26 mm).")
    truth = [nodule("LUL", 25.4, "solid"), nodule("RUL", 25.0, "ground-glass")]  # sizes alone: swapped
    assert location_hits(text, "", truth) == (2, 2)


def test_location_counts_only_mentioned_references_of_at_least_5_mm():
    text = "A 12 mm nodule in the left lower lobe. No other nodule."
    truth = [nodule("LLL", 12.4), nodule("RUL", 4.0), nodule("RML", 25.0)]  # 4 mm: too small; 25 mm: not mentioned
    assert location_hits(text, "", truth) == (1, 1)
    assert location_hits("No pulmonary nodule.", "", truth) == (0, 0)
    # no lobe named: the side decides
    assert location_hits("A 12 mm nodule on the right.", "", truth) == (0, 1)


def test_an_impression_restating_a_described_nodule_is_not_a_mention_of_another():
    findings = "A 15 mm solid nodule in the right lower lobe (16 x 13 mm)."
    truth = [nodule("RLL", 14.6), nodule("LUL", 11.7)]  # the LUL nodule is not described anywhere
    assert location_hits(findings, "1. 15 mm solid nodule in the right lower lobe.", truth) == (1, 1)
    # a nodule named only in the Impression still counts
    assert location_hits(findings, "1. 12 mm nodule in the left upper lobe.", truth) == (2, 2)


def test_f1_table_leaves_out_types_with_no_positive_anywhere():
    pairs = [({"a": True, "b": False}, {"a": True, "b": False}), ({"a": False, "b": False}, {"a": True, "b": False})]
    table, macro = f1_table(pairs, types=("a", "b"))
    assert table["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(0.6667, abs=1e-4), "support": 2}
    assert table["b"]["support"] == 0 and macro == pytest.approx(0.6667, abs=1e-4)
