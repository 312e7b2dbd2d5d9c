import pytest

from pipelines.ct.report_eval import f1_table, location_hits


def nodule(lobe, diameter):
    return {"type": "nodule", "lobe": lobe, "side": "right" if lobe[0] == "R" else "left", "diameter_mm": diameter}


def test_location_pairs_references_and_mentions_one_to_one_by_size():
    text = ("A 7 mm solid nodule is present in the right upper lobe (8 x 7 mm). "
            "A 7 mm solid nodule is present in the right lower lobe (7 x 7 mm).")
    # Both mentions are 7 mm: each reference takes the mention whose sizes fit it best overall, once.
    assert location_hits(text, [nodule("RLL", 6.5), nodule("RUL", 7.25)]) == (2, 2)
    assert location_hits(text, [nodule("RUL", 6.5), nodule("LUL", 7.25)]) == (0, 2)


def test_location_counts_only_mentioned_references_of_at_least_5_mm():
    text = "A 12 mm nodule in the left lower lobe. No other nodule."
    truth = [nodule("LLL", 12.4), nodule("RUL", 4.0), nodule("RML", 25.0)]  # 4 mm: too small; 25 mm: not mentioned
    assert location_hits(text, truth) == (1, 1)
    assert location_hits("No pulmonary nodule.", truth) == (0, 0)
    # no lobe named: the side decides
    assert location_hits("A 12 mm nodule on the right.", truth) == (0, 1)


def test_f1_table_leaves_out_types_with_no_positive_anywhere():
    pairs = [({"a": True, "b": False}, {"a": True, "b": False}), ({"a": False, "b": False}, {"a": True, "b": False})]
    table, macro = f1_table(pairs, types=("a", "b"))
    assert table["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(0.6667, abs=1e-4), "support": 2}
    assert table["b"]["support"] == 0 and macro == pytest.approx(0.6667, abs=1e-4)
