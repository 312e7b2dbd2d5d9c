"""The micro-batcher merges requests that arrive together, keeps each caller's rows in order, survives a failing
batch; the UI's file URLs are only served to the user they belong to; log-in, lockout message and log-out."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

from apps.server.inference import ModelQueue, WaferBatcher
from apps.server.metrics import Metrics
from pipelines.wafer.maps import CLASSES, WaferMap


class FakeScorer:
    """Scores a map by its fail fraction, so each row can be traced back to its map; records call sizes."""

    size = 8
    classes = CLASSES[:-1]

    def __init__(self, fail_on: int | None = None):
        self.calls: list[int] = []
        self.fail_on = fail_on

    def score_inputs(self, x):
        from pipelines.wafer.scoring import Scores

        self.calls.append(len(x))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("model exploded")
        time.sleep(0.05)  # a model call takes time, so later requests queue up behind it
        fail = x[:, 2].mean(axis=(1, 2))  # channel 2 = fail fraction per cell
        probs = np.tile(fail[:, None], (1, len(self.classes)))
        return Scores(self.classes, probs, fail, fail)


def grid(fails: int) -> np.ndarray:
    g = np.ones((8, 8), np.uint8)
    g.flat[:fails] = 2
    return g


def test_concurrent_requests_share_model_calls():
    scorer = FakeScorer()
    batcher = WaferBatcher(lambda: scorer, Metrics(), window_ms=20, max_batch=64)
    out: dict[int, list] = {}

    def client(k: int):
        maps = [WaferMap(grid(k * 3 + j), wafer_id=f"c{k}-{j}", source="t") for j in range(3)]
        out[k] = batcher.score(maps)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert sum(scorer.calls) == 36 and len(scorer.calls) < 12  # merged: fewer model calls than requests
    for k, rows in out.items():
        assert [r.wafer_id for r in rows] == [f"c{k}-{j}" for j in range(3)]
        expected = [(k * 3 + j) / 64 for j in range(3)]
        assert np.allclose([r.defect_score for r in rows], expected, atol=1e-6)


def test_oversized_request_runs_in_bounded_chunks():
    scorer = FakeScorer()
    batcher = WaferBatcher(lambda: scorer, Metrics(), window_ms=1, max_batch=16)
    rows = batcher.score([WaferMap(grid(i % 60), wafer_id=f"w{i}", source="t") for i in range(40)])
    batcher.close()
    assert scorer.calls == [16, 16, 8]
    assert [r.wafer_id for r in rows] == [f"w{i}" for i in range(40)]
    assert np.allclose([r.defect_score for r in rows], [(i % 60) / 64 for i in range(40)], atol=1e-6)


def test_a_failing_batch_fails_its_callers_and_the_next_one_works():
    batcher = WaferBatcher(lambda: FakeScorer(fail_on=1), Metrics(), window_ms=1)
    with pytest.raises(RuntimeError, match="model exploded"):
        batcher.score([WaferMap(grid(1), wafer_id="a", source="t")])
    rows = batcher.score([WaferMap(grid(2), wafer_id="b", source="t")])
    batcher.close()
    assert rows[0].wafer_id == "b" and rows[0].status == "ok"


def test_model_queue_limits_concurrency_and_reports_depth():
    metrics = Metrics()
    queue = ModelQueue("ct", 1, metrics)
    running, peak = [0], [0]
    lock = threading.Lock()

    def work():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return 7

    threads = [threading.Thread(target=lambda: queue.run(work, stage="draft")) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1
    text = metrics.render().decode()
    assert 'mmcore_model_seconds_count{model="ct",stage="draft"} 5.0' in text
    assert 'mmcore_queue_depth{model="ct"} 0.0' in text


# ------------------------------------------------------------------------------------------- sessions and files

def session(live, user: str, password: str = "correct horse 1") -> requests.Session:
    s = requests.Session()
    r = s.post(live.url + "/login", data={"username": user, "password": password}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    return s


def test_login_pages_and_redirect(live):
    anonymous = requests.get(live.url + "/", allow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login"
    bad = requests.post(live.url + "/login", data={"username": "clin", "password": "nope"})
    assert bad.status_code == 401 and "wrong password" in bad.text
    s = session(live, "clin")
    assert s.get(live.url + "/", allow_redirects=False).status_code == 200
    s.get(live.url + "/logout")
    assert s.get(live.url + "/", allow_redirects=False).status_code == 303


def test_ui_files_are_private_to_their_user(live):
    first, second = session(live, "clin"), session(live, "clin2")
    up = first.post(live.url + "/gradio_api/upload", files=[("files", ("note.txt", b"private bytes"))])
    assert up.status_code == 200, up.text
    path = up.json()[0]
    assert path.startswith(str(live.data_dir / "gradio"))  # GRADIO_TEMP_DIR is under the data folder
    assert first.get(f"{live.url}/gradio_api/file={path}").content == b"private bytes"
    refused = second.get(f"{live.url}/gradio_api/file={path}")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert requests.get(f"{live.url}/gradio_api/file={path}").status_code == 404  # nor without a session
    db = live.data_dir / "mmcore.db"
    assert first.get(f"{live.url}/gradio_api/file={db}").status_code == 404  # nothing outside the cache


def test_first_start_admin_gets_a_one_time_password(tmp_path):
    import io

    from apps.server.auth import bootstrap_admin
    from apps.store import Actor, authenticate, list_users, open_store

    with open_store(None, tmp_path) as store:
        out = io.StringIO()
        password = bootstrap_admin(store, out=out)
        assert password and f"one-time password: {password}" in out.getvalue()
        assert "choose a new password" in out.getvalue()
        assert [(u.username, u.role, u.must_change_password) for u in list_users(store, Actor.system())] == [
            ("admin", "admin", True)]
        assert authenticate(store, "admin", password).must_change_password is True
        assert bootstrap_admin(store, out=out) is None  # users exist: nothing is created or printed again


def test_one_time_password_page_comes_first(live):
    from apps.store import Actor, create_user

    create_user(live.store, Actor.system(), "first-ui", "one-time pw 77", "admin", must_change_password=True)
    s = requests.Session()
    r = s.post(live.url + "/login", data={"username": "first-ui", "password": "one-time pw 77"},
               allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/password"
    home = s.get(live.url + "/", allow_redirects=False)
    assert home.status_code == 303 and home.headers["location"] == "/password"  # the UI waits for a new password
    form = s.get(live.url + "/password")
    assert form.status_code == 200 and "one-time password" in form.text and 'id="new_password"' in form.text
    differ = s.post(live.url + "/password", data={"current_password": "one-time pw 77", "new_password": "new secret 1",
                                                  "repeat_password": "new secret 2"})
    assert differ.status_code == 400 and "differ" in differ.text
    wrong = s.post(live.url + "/password", data={"current_password": "nope", "new_password": "new secret 1",
                                                 "repeat_password": "new secret 1"})
    assert wrong.status_code == 403 and "current password is wrong" in wrong.text
    short = s.post(live.url + "/password", data={"current_password": "one-time pw 77", "new_password": "short",
                                                 "repeat_password": "short"})
    assert short.status_code == 400 and "New password: expected at least 8 characters" in short.text
    done = s.post(live.url + "/password", data={"current_password": "one-time pw 77", "new_password": "new secret 1",
                                                "repeat_password": "new secret 1"}, allow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/"
    assert s.get(live.url + "/", allow_redirects=False).status_code == 200  # at once, despite the session cache
    assert requests.get(live.url + "/password", allow_redirects=False).headers["location"] == "/login"
