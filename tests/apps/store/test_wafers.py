import threading
import time

import numpy as np
import pytest
from sqlalchemy import func, select

from apps.store import (Actor, ConflictError, NewWafer, NewWaferScore, NotFoundError, PermissionDenied, StoreError,
                        WaferMapRef, add_wafer_scores, add_wafers, get_or_create_lot, list_lots, lot_summary,
                        scores_for_lot, wafer_map_refs)
from apps.store.models import Wafer, WaferScore

CLASSES = ("Center", "Donut", "Edge-Ring", "none")


def score(i: int, source: str = "lot.npz", model: str = "wafer-tiny@1", status: str = "ok") -> NewWaferScore:
    probs = {c: (i + k) % 4 / 6 for k, c in enumerate(CLASSES)}
    if status == "error":
        return NewWaferScore(f"W{i:03d}", source, model, {}, status="error", error="map has 0 dies")
    return NewWaferScore(f"W{i:03d}", source, model, probs, max(probs, key=probs.get), defect_score=i / 100,
                         anomaly_score=1 - i / 100, slot=i % 25 + 1)


def test_lots_belong_to_a_site(store, people, audit_log):
    lot = get_or_create_lot(store, people["eng_north"], "LOT-A1", "P100")
    assert (lot.lot_id, lot.product, lot.site) == ("LOT-A1", "P100", "north")
    assert get_or_create_lot(store, people["eng_north"], "LOT-A1", "P100") == lot  # idempotent
    with pytest.raises(PermissionDenied, match="may not create lots for site south"):
        get_or_create_lot(store, people["eng_north"], "LOT-B1", site="south")
    with pytest.raises(ConflictError, match="already exists at site north, not south"):
        get_or_create_lot(store, people["eng_south"], "LOT-A1")
    with pytest.raises(PermissionDenied, match="needs the role engineer or admin"):
        get_or_create_lot(store, people["dr_a"], "LOT-C1")
    assert get_or_create_lot(store, Actor.system(), "LOT-D1").site == "main"  # the command line's default
    get_or_create_lot(store, Actor.system(), "LOT-S1", site="south")
    with pytest.raises(StoreError, match="lot_id 'bad lot'"):
        get_or_create_lot(store, people["eng_north"], "bad lot")
    assert [x.lot_id for x in list_lots(store, people["eng_south"])] == ["LOT-S1"]
    assert [x.lot_id for x in list_lots(store, people["admin"])] == ["LOT-A1", "LOT-D1", "LOT-S1"]
    with pytest.raises(PermissionDenied, match="is not allowed lot.view on lot LOT-S1: it belongs to site south"):
        scores_for_lot(store, people["eng_north"], "LOT-S1")
    with pytest.raises(NotFoundError, match="no such lot"):
        lot_summary(store, people["eng_north"], "LOT-ZZ")
    assert [(e.username, e.object_id, e.outcome) for e in audit_log(action="lot.create")] == [
        ("eng_north", "LOT-A1", "ok"), ("eng_north", "LOT-B1", "denied"), ("dr_a", "LOT-C1", "denied"),
        ("system", "LOT-D1", "ok"), ("system", "LOT-S1", "ok")]
    assert [(e.username, e.outcome) for e in audit_log(action="lot.view")] == [("eng_north", "denied")]


def test_scores_round_trip_and_resume(store, people):
    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-A1", "P100")
    rows = [score(i) for i in range(10)] + [score(10, status="error")]
    assert add_wafer_scores(store, eng, "LOT-A1", rows, batch_size=4) == 11
    got = scores_for_lot(store, eng, "LOT-A1")
    assert len(got) == 11
    first = got[("lot.npz", "W001")]
    assert first.probabilities == rows[1].probabilities  # floats come back exactly
    assert (first.predicted_class, first.defect_score, first.anomaly_score, first.slot) == (
        rows[1].predicted_class, 0.01, 0.99, 2)
    assert got[("lot.npz", "W010")].status == "error" and got[("lot.npz", "W010")].error == "map has 0 dies"
    # A resumed run rescored the failed wafer: the newest score wins, the wafer is not duplicated.
    add_wafer_scores(store, eng, "LOT-A1", [score(10)])
    resumed = scores_for_lot(store, eng, "LOT-A1")
    assert resumed[("lot.npz", "W010")].status == "ok" and len(resumed) == 11
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Wafer)) == 11
        assert session.scalar(select(func.count()).select_from(WaferScore)) == 12
    assert scores_for_lot(store, eng, "LOT-A1", model_id="other@2") == {}


def test_lot_summary(store, people, audit_log):
    eng = people["eng_south"]
    get_or_create_lot(store, eng, "LOT-S9", "P7")
    add_wafers(store, eng, "LOT-S9", [NewWafer("W099", "lot.npz", slot=25)])  # registered, never scored
    rows = [score(i) for i in range(6)] + [score(6, status="error")]
    add_wafer_scores(store, eng, "LOT-S9", rows, client="10.9.9.9")
    summary = lot_summary(store, eng, "LOT-S9")
    ok = rows[:6]
    expected_classes: dict[str, int] = {}
    for r in ok:
        expected_classes[r.predicted_class] = expected_classes.get(r.predicted_class, 0) + 1
    assert (summary.wafers, summary.scored, summary.errors) == (8, 7, 1)
    assert summary.class_counts == dict(sorted(expected_classes.items()))
    assert summary.mean_defect_score == pytest.approx(sum(r.defect_score for r in ok) / 6)
    assert summary.max_anomaly_score == 1.0 and summary.model_ids == ["wafer-tiny@1"]
    batch = audit_log(action="wafer.scores.add")
    assert [(e.client, e.details["rows"], e.details["errors"]) for e in batch] == [("10.9.9.9", 7, 1)]
    assert audit_log(action="lot.view")[-1].username == "eng_south"


def test_numpy_numbers_are_accepted(store, people):
    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-NP")
    probs = {"Center": np.float32(0.25), "none": np.float64(0.75)}
    add_wafer_scores(store, eng, "LOT-NP", [NewWaferScore("W1", "a.npy", "m@1", probs, "none", np.float64(0.25),
                                                          np.float32(0.5))])
    got = scores_for_lot(store, eng, "LOT-NP")[("a.npy", "W1")]
    assert got.probabilities == {"Center": 0.25, "none": 0.75} and got.anomaly_score == 0.5


def test_bad_score_names_the_row_and_keeps_earlier_batches(store, people):
    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-A1")
    rows = [score(i) for i in range(5)]
    rows.append(NewWaferScore("W005", "lot.npz", "wafer-tiny@1", {"Center": float("nan")}))
    with pytest.raises(StoreError, match=r"scores\[5\].probabilities: expected a dict of class name -> probability"):
        add_wafer_scores(store, eng, "LOT-A1", rows, batch_size=3)
    assert sorted(k[1] for k in scores_for_lot(store, eng, "LOT-A1")) == ["W000", "W001", "W002"]
    for bad, message in [(NewWaferScore("W1", "x", "m", {}, status="error"), r"scores\[0\].error"),
                         (NewWaferScore("W1", "x", "m", {}, status="maybe"), r"scores\[0\].status"),
                         (NewWaferScore("", "x", "m", {}), r"scores\[0\].wafer_id"),
                         (NewWaferScore("W1", "x", "m", {"a": 1.5}), r"scores\[0\].probabilities"),
                         (NewWaferScore("W1", "x", "m", {}, defect_score=float("inf")), r"scores\[0\].defect_score")]:
        with pytest.raises(StoreError, match=message):
            add_wafer_scores(store, eng, "LOT-A1", [bad])
    with pytest.raises(PermissionDenied):
        add_wafer_scores(store, people["eng_south"], "LOT-A1", [score(1)])


def test_add_wafers_with_maps(store, people):
    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-M")
    grid = store.put_blob(np.arange(16, dtype=np.uint8).tobytes())
    assert add_wafers(store, eng, "LOT-M", [NewWafer("W01", "a.npy", 1, grid), NewWafer("W02", "b.npy", 2)]) == 2
    assert add_wafers(store, eng, "LOT-M", [NewWafer("W01", "a.npy", 1, grid), NewWafer("W03", "c.npy")]) == 1
    with store.session() as session:
        assert session.scalars(select(Wafer.map_sha256).where(Wafer.wafer_id == "W01")).one() == grid
    with pytest.raises(NotFoundError, match=r"wafers\[0\].map_sha256: blob .* is not in the store"):
        add_wafers(store, eng, "LOT-M", [NewWafer("W04", "d.npy", map_sha256="f" * 64)])


def test_wafer_map_refs(store, people, audit_log):
    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-R")
    bundle = store.put_blob(b"two maps in one blob")
    add_wafers(store, eng, "LOT-R", [NewWafer("W02", "req1.zip::W02.npy", 2, bundle),
                                     NewWafer("W01", "req1.zip::W01.npy", 1, bundle), NewWafer("W09", "x.npy")])
    add_wafer_scores(store, eng, "LOT-R", [score(7, "late.npy")])  # a wafer first seen with its score: no map
    # Sorted by (source, wafer_id) on insert, so the ids follow that order within a call.
    assert wafer_map_refs(store, eng, "LOT-R") == [
        WaferMapRef("W01", "req1.zip::W01.npy", 1, bundle), WaferMapRef("W02", "req1.zip::W02.npy", 2, bundle),
        WaferMapRef("W09", "x.npy", None, None), WaferMapRef("W007", "late.npy", 8, None)]
    assert [r.wafer_id for r in wafer_map_refs(store, people["admin"], "LOT-R")] == ["W01", "W02", "W09", "W007"]
    get_or_create_lot(store, people["eng_south"], "LOT-EMPTY")
    assert wafer_map_refs(store, people["eng_south"], "LOT-EMPTY") == []
    with pytest.raises(PermissionDenied, match="lot.view on lot LOT-R: it belongs to site north"):
        wafer_map_refs(store, people["eng_south"], "LOT-R")
    with pytest.raises(PermissionDenied, match="needs the role engineer or admin"):
        wafer_map_refs(store, people["dr_a"], "LOT-R")
    with pytest.raises(NotFoundError, match="lot 'LOT-NONE': no such lot"):
        wafer_map_refs(store, eng, "LOT-NONE")
    with pytest.raises(StoreError, match="lot_id '../x'"):
        wafer_map_refs(store, eng, "../x")
    denied = [(e.username, e.action, e.object_id) for e in audit_log() if e.outcome == "denied"]
    assert denied == [("eng_south", "lot.view", "LOT-R"), ("dr_a", "lot.view", "LOT-R")]
    assert not [e for e in audit_log(action="lot.view") if e.outcome == "ok"]  # a read: not audited


def test_concurrent_writers_and_readers(store, people):
    """8 threads write scores while 4 read: every row arrives exactly once, no lock error reaches a caller."""
    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-C")
    writers, per_writer, batch = 8, 60, 10
    errors: list[BaseException] = []
    done = threading.Event()
    reads = [0] * 4

    def write(w: int):
        try:
            rows = [NewWaferScore(f"W{i:04d}", f"writer-{w}", "m@1", {"none": 1.0}, "none", 0.0, 0.0)
                    for i in range(per_writer)]
            assert add_wafer_scores(store, eng, "LOT-C", rows, batch_size=batch) == per_writer
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def read(r: int):
        try:
            while not done.is_set():
                seen = scores_for_lot(store, eng, "LOT-C")
                assert len(seen) % batch == 0  # whole batches only: never half a transaction
                lot_summary(store, eng, "LOT-C")
                reads[r] += 1
                time.sleep(0.01)  # a reader polls; it does not spin
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    readers = [threading.Thread(target=read, args=(r,)) for r in range(4)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    for t in readers:
        t.join(timeout=60)
    assert errors == []
    assert min(reads) >= 1
    with store.session() as session:
        total = session.scalar(select(func.count()).select_from(WaferScore))
        per_wafer = session.execute(select(WaferScore.wafer_pk, func.count()).group_by(WaferScore.wafer_pk)).all()
    assert total == writers * per_writer
    assert len(per_wafer) == writers * per_writer and {n for _, n in per_wafer} == {1}
    assert len(scores_for_lot(store, eng, "LOT-C")) == writers * per_writer


def test_a_failing_batch_stops_the_run_after_the_committed_ones(store, people, monkeypatch):
    """The writer thread's failure reaches the caller; batches before it stay, nothing after it is written."""
    from apps.store import wafers

    eng = people["eng_north"]
    get_or_create_lot(store, eng, "LOT-F")
    real, calls = wafers._upsert_wafers, []

    def failing_second(session, lot_pk, missing):
        calls.append(len(missing))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(session, lot_pk, missing)

    monkeypatch.setattr(wafers, "_upsert_wafers", failing_second)
    with pytest.raises(OSError, match="disk full"):
        add_wafer_scores(store, eng, "LOT-F", [score(i) for i in range(10)], batch_size=3)
    assert calls == [3, 3]
    assert sorted(k[1] for k in scores_for_lot(store, eng, "LOT-F")) == ["W000", "W001", "W002"]
