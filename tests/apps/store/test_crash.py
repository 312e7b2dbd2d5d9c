"""A process killed in the middle of bulk inserts and blob writes leaves a consistent store behind."""

import hashlib
import signal
import subprocess
import sys
import textwrap
import time

from sqlalchemy import func, select, text

from apps.store import open_store
from apps.store.models import AuditEvent, WaferScore

BATCH = 200

# The child writes 4 MB blobs in a thread and score batches in the main thread. After the rows of each batch are
# inserted it lingers 20 ms before the transaction commits, so a kill often lands inside an open transaction.
CHILD = textwrap.dedent(f"""
    import os, sys, threading, time
    from sqlalchemy import event
    from apps.store import Actor, NewWaferScore, add_wafer_scores, create_user, get_or_create_lot, open_store

    store = open_store(sys.argv[1], sys.argv[2])
    eng = create_user(store, Actor.system(), "eng", "long enough password", "engineer", "fab")
    get_or_create_lot(store, eng, "LOT-K")

    @event.listens_for(store.engine, "after_cursor_execute")
    def linger(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT_EVENTS"):
            time.sleep(0.02)

    def blobs():
        while True:
            store.put_blob(os.urandom(4 << 20))

    store.put_blob(os.urandom(4 << 20))  # at least one finished blob, however slow the disk is today
    threading.Thread(target=blobs, daemon=True).start()
    rows = (NewWaferScore(f"W{{i:06d}}", "crash.npz", "m@1", {{"none": 1.0}}, "none", 0.0, 0.0)
            for i in range(10**7))
    for n in range(10**6):
        add_wafer_scores(store, eng, "LOT-K", (next(rows) for _ in range({BATCH})), batch_size={BATCH})
        print("committed", n + 1, flush=True)
""")


def test_kill_during_bulk_insert_leaves_whole_batches_and_whole_blobs(store_url, tmp_path):
    data_dir = tmp_path / "data"
    child = subprocess.Popen([sys.executable, "-c", CHILD, store_url, str(data_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        committed = 0
        deadline = time.monotonic() + 90
        while committed < 3 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            committed = int(line.split()[1])
        assert committed >= 3, child.stderr.read()
        time.sleep(0.013)  # land somewhere inside the next batch or blob
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    store = open_store(store_url, data_dir)
    try:
        with store.session() as session:
            if store.dialect == "sqlite":
                assert session.execute(text("PRAGMA integrity_check")).scalar() == "ok"
                assert session.execute(text("PRAGMA foreign_key_check")).all() == []
            rows = session.scalar(select(func.count()).select_from(WaferScore))
            batches = session.scalar(select(func.count()).select_from(AuditEvent)
                                     .where(AuditEvent.action == "wafer.scores.add"))
        # All or nothing per batch: every stored batch is whole and has its audit event, nothing more.
        assert rows == batches * BATCH and batches >= committed
        finals = [p for p in (data_dir / "blobs").glob("??/*") if p.is_file()]
        assert finals, "the child's first blob is missing"
        for path in finals:  # a blob under its final name is always complete
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.parent.name + path.name
    finally:
        store.close()
