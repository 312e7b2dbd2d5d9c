import numpy as np

from pipelines.wafer.batch import RESULT_KEYS, WaferResult, score_local
from pipelines.wafer.maps import CLASSES, WaferMap, WaferReadError
from pipelines.wafer.scoring import WaferScorer
from pipelines.wafer.synth import generate


def stream(n_good, bad_every):
    for i, w in enumerate(generate(n_good, seed=7)):
        if i % bad_every == 0:
            yield WaferReadError(f"bad{i}", f"file{i}.npy", f"file{i}.npy: broken")
        yield w


def test_every_input_once_in_order_with_errors(wafer_checkpoint):
    scorer = WaferScorer(wafer_checkpoint)
    items = list(stream(23, 5))
    results = list(score_local(iter(items), scorer, batch_size=4))
    assert [r.wafer_id for r in results] == [i.wafer_id for i in items]
    assert [r.status for r in results] == ["error" if isinstance(i, WaferReadError) else "ok" for i in items]
    ok = [r for r in results if r.status == "ok"]
    assert all(set(r.class_probs) == set(CLASSES) and r.predicted_class in CLASSES for r in ok)
    assert all(r.to_json().keys() == set(RESULT_KEYS) for r in results)
    bad = next(r for r in results if r.status == "error")
    assert bad.error == "file0.npy: broken" and bad.class_probs is None
    # Batch size does not change the numbers.
    again = list(score_local(iter(items), scorer, batch_size=64))
    np.testing.assert_allclose([r.defect_score or 0 for r in again], [r.defect_score or 0 for r in results],
                               atol=1e-5)


def test_skip_returns_stored_results_without_scoring(wafer_checkpoint):
    scorer = WaferScorer(wafer_checkpoint)
    wafers = list(generate(6, seed=8))
    stored = WaferResult(wafer_id=wafers[2].wafer_id, source=wafers[2].source, status="ok", predicted_class="Loc",
                         class_probs={c: 0.0 for c in CLASSES}, defect_score=0.9, anomaly_score=0.1, resumed=True)
    results = list(score_local(iter(wafers), scorer, batch_size=2,
                               skip=lambda wid, src: stored if wid == wafers[2].wafer_id else None))
    assert results[2] is stored and len(results) == 6 and sum(r.resumed for r in results) == 1


def test_threshold_decides_none(wafer_checkpoint):
    scorer = WaferScorer(wafer_checkpoint)
    wafers = list(generate(8, seed=9))
    low = list(score_local(iter(wafers), scorer, defect_threshold=0.0))
    high = list(score_local(iter(wafers), scorer, defect_threshold=1.0))
    assert all(r.predicted_class != "none" for r in low) and all(r.predicted_class == "none" for r in high)


def test_a_bad_grid_inside_a_stream_does_not_stop_it(wafer_checkpoint, tmp_path):
    from pipelines.wafer.maps import iter_wafers

    np.save(tmp_path / "a.npy", np.ones((30, 30), np.uint8))
    np.save(tmp_path / "b.npy", np.full((30, 30), 7, np.uint8))
    np.save(tmp_path / "c.npy", np.ones((26, 27), np.uint8))
    results = list(score_local(iter_wafers([tmp_path]), WaferScorer(wafer_checkpoint), batch_size=2))
    assert [(r.wafer_id, r.status) for r in results] == [("a", "ok"), ("b", "error"), ("c", "ok")]
    assert "b.npy" in results[1].error and "found [7]" in results[1].error


def test_map_is_wafermap():
    assert WaferMap(grid=np.ones((2, 2), np.uint8), wafer_id="x").yield_pct == 100.0
