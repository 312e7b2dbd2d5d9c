"""The REST API against a live server: auth, roles, every endpoint, bad input at every entry point."""

from __future__ import annotations

import io
import zipfile

import pytest

from pipelines.ct.report_model import DEFAULT_CHECKPOINT, ReportModel


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


@pytest.fixture(scope="module")
def uploaded(live, phantom_zip, voice_note):
    files = [("files", ("series.zip", phantom_zip.read_bytes(), "application/zip"))]
    if voice_note is not None:
        files.append(("voice", ("note.wav", voice_note.read_bytes(), "audio/wav")))
    r = live.post("/api/v1/ct/studies", "clin", files=files)
    assert r.status_code == 201, r.text
    return r.json()


def count_studies(live) -> int:
    from apps.store import Actor, list_studies

    return len(list_studies(live.store, Actor.system(), limit=1000))


# ------------------------------------------------------------------------------------------------------ service

def test_health_metrics_and_openapi(live):
    assert live.get("/healthz").json()["status"] == "ok"
    live.get("/api/v1/me", "clin")
    text = live.get("/metrics").text
    for name in ("mmcore_http_requests_total", "mmcore_http_request_seconds_bucket", "mmcore_queue_depth",
                 "mmcore_model_seconds", "mmcore_http_errors_total"):
        assert name in text
    assert 'route="/api/v1/me"' in text
    spec = live.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/ct/studies", "/api/v1/reports/{report_ref}", "/api/v1/reports/{report_id}/sign",
                 "/api/v1/wafers/score", "/api/v1/lots/{lot}"):
        assert path in spec["paths"]


def test_tokens_are_required_and_checked(live):
    e = error_of(live.get("/api/v1/me"))
    assert e["code"] == "unauthenticated" and "Bearer" in e["message"]
    r = live.get("/api/v1/me", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert error_of(r)["code"] == "unauthenticated"
    assert live.get("/api/v1/me", "eng").json() == {"username": "eng", "role": "engineer", "site": "main",
                                                     "must_change_password": False}


# ----------------------------------------------------------------------------------------------------------- CT

def test_upload_gives_study_and_grounded_draft(live, uploaded, voice_note):
    study, report = uploaded["study"], uploaded["report"]
    assert study["owner"] == "clin" and study["series"][0]["slice_count"] == 40
    assert len(study["series"][0]["blobs"]) == 40 and study["patient_pseudonym"].startswith("ANON-")
    # the shipped report model drafts the narrative (the template writer only when no checkpoint loads)
    shipped = ReportModel.load(DEFAULT_CHECKPOINT).model_id
    assert report["status"] == "draft" and report["model_id"] == shipped
    content = report["content"]
    assert content["model"]["id"] == shipped and content["model"]["checkpoint_sha256"] and content["measurements"]
    assert not [f for f in content["flags"] if f["kind"] == "model"]
    assert all(m["id"].startswith("M") for m in content["measurements"])
    if voice_note is not None:
        assert "smoking" in content["indication"]["transcript"].lower() or \
            any(f["kind"] == "voice_note" for f in content["flags"])
    detail = live.get(f"/api/v1/ct/studies/{study['id']}", "clin").json()
    assert [r["id"] for r in detail["reports"]] == [report["id"]]
    assert len(detail["voice_notes"]) == (1 if voice_note is not None else 0)


def test_report_formats_by_suffix_and_accept(live, uploaded):
    rid = uploaded["report"]["id"]
    as_json = live.get(f"/api/v1/reports/{rid}", "clin").json()
    assert as_json["content"]["schema_version"] == "1.0"
    pdf = live.get(f"/api/v1/reports/{rid}.pdf", "clin")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    sr = live.get(f"/api/v1/reports/{rid}", "clin", headers={"Accept": "application/dicom"})
    assert sr.headers["content-type"] == "application/dicom" and sr.content[128:132] == b"DICM"
    fhir = live.get(f"/api/v1/reports/{rid}.fhir", "clin").json()
    assert fhir["resourceType"] == "DiagnosticReport" and fhir["status"] == "preliminary"
    assert live.get(f"/api/v1/reports/{rid}", "clin", headers={"Accept": "image/gif"}).status_code == 406
    assert live.get(f"/api/v1/reports/{rid}.exe", "clin").status_code == 404


def test_deidentified_export_drops_identity(live, uploaded):
    rid = uploaded["report"]["id"]
    plain = live.get(f"/api/v1/reports/{rid}.json", "clin").json()
    deid = live.get(f"/api/v1/reports/{rid}.json?deidentified=true", "clin").json()
    assert plain["patient"]["name"] and plain["patient"]["name"] != deid["patient"]["name"]
    assert deid["deidentified"] is True and deid["patient"]["id"].startswith("ANON-")
    assert deid["study"]["study_uid"].startswith("2.25.")


def test_roles_and_ownership(live, uploaded, phantom_zip):
    sid, rid = uploaded["study"]["id"], uploaded["report"]["id"]
    r = live.post("/api/v1/ct/studies", "eng", files=[("files", ("s.zip", phantom_zip.read_bytes()))])
    assert r.status_code == 403 and error_of(r)["code"] == "forbidden"
    assert live.get(f"/api/v1/ct/studies/{sid}", "clin2").status_code == 403
    assert live.get(f"/api/v1/reports/{rid}.pdf", "clin2").status_code == 403
    assert live.get(f"/api/v1/reports/{rid}", "eng").status_code == 403
    assert live.get(f"/api/v1/ct/studies/{sid}", "boss").status_code == 200  # admins see everything
    assert error_of(live.post(f"/api/v1/reports/{rid}/sign", "boss"))["code"] == "forbidden"  # and sign nothing
    assert live.get("/api/v1/reports/999999", "clin").status_code == 404


def test_edit_regrounds_then_sign_once(live, uploaded):
    rid = uploaded["report"]["id"]
    content = uploaded["report"]["content"]
    # The narrative cites a nodule's long axis and an effusion's volume: change that number.
    m = next(x for x in content["measurements"] if x.get("long_axis_mm") or x.get("volume_ml"))
    field = "long_axis_mm" if m.get("long_axis_mm") else "volume_ml"
    new = round(m[field] * 3 + 40, 1)
    r = live.patch(f"/api/v1/reports/{rid}", "clin", json={"measurements": {m["id"]: {field: new}}})
    assert r.status_code == 200, r.text
    saved = r.json()["report"]["content"]
    edited = next(x for x in saved["measurements"] if x["id"] == m["id"])
    assert edited["edited"] is True and edited[field] == new and edited["measured"][field] == m[field]
    # The narrative still cites the measured size, so grounding now flags the edited row.
    assert any(f["measurement_id"] == m["id"] for f in r.json()["flags"]), (m, field, new, r.json()["flags"])
    if field == "long_axis_mm":  # a nodule corrected to >= 30 mm is a mass: the critical rules ran again
        assert any(c["measurement_id"] == m["id"] for c in saved["critical"])
    bad = live.patch(f"/api/v1/reports/{rid}", "clin", json={"measurements": {"M99": {field: 1.0}}})
    assert bad.status_code == 400 and "M99" in error_of(bad)["message"]
    assert live.patch(f"/api/v1/reports/{rid}", "clin", json={"colour": "red"}).status_code == 400
    assert live.patch(f"/api/v1/reports/{rid}", "clin2", json={"impression": "x"}).status_code == 403
    signed = live.post(f"/api/v1/reports/{rid}/sign", "clin")
    assert signed.status_code == 200 and signed.json()["report"]["status"] == "final"
    again = live.post(f"/api/v1/reports/{rid}/sign", "clin")
    assert again.status_code == 409 and "already final" in error_of(again)["message"]
    assert live.patch(f"/api/v1/reports/{rid}", "clin", json={"impression": "x"}).status_code == 409
    fhir = live.get(f"/api/v1/reports/{rid}.fhir", "clin").json()
    assert fhir["status"] == "final"


def test_amend_a_signed_report_then_sign_it(live, uploaded):
    rid, sid = uploaded["report"]["id"], uploaded["study"]["id"]
    if live.get(f"/api/v1/reports/{rid}", "clin").json()["report"]["status"] == "draft":
        assert live.post(f"/api/v1/reports/{rid}/sign", "clin").status_code == 200
    signed = live.get(f"/api/v1/reports/{rid}", "clin").json()
    m = next(x for x in signed["content"]["measurements"] if x.get("long_axis_mm") or x.get("volume_ml"))
    field = "long_axis_mm" if m.get("long_axis_mm") else "volume_ml"
    amend = f"/api/v1/reports/{rid}/amend"
    no_reason = live.post(amend, "clin", json={"impression": "x"})
    assert no_reason.status_code == 400 and error_of(no_reason)["message"].startswith("reason: expected why")
    unknown = live.post(amend, "clin", json={"reason": "r", "colour": "red"})
    assert unknown.status_code == 400 and "colour" in error_of(unknown)["message"]
    assert error_of(live.post(amend, "eng", json={"reason": "r"}))["code"] == "forbidden"
    assert error_of(live.post(amend, "boss", json={"reason": "r"}))["code"] == "forbidden"  # admins sign nothing
    assert live.post(amend, "clin2", json={"reason": "r"}).status_code == 403  # not their study
    assert live.post("/api/v1/reports/999999/amend", "clin", json={"reason": "r"}).status_code == 404

    new = round(m[field] + 5.5, 1)
    r = live.post(amend, "clin", json={"reason": "re-measured on the thin slices", "impression": "Amended: see M-rows.",
                                       "measurements": {m["id"]: {field: new}}})
    assert r.status_code == 201, r.text
    version = r.json()["report"]
    assert (version["version"], version["status"], version["amends_id"], version["signer"]) == (2, "amended", rid,
                                                                                                  None)
    assert version["amend_reason"] == "re-measured on the thin slices" and version["author"] == "clin"
    content = version["content"]
    assert content["status"] == "amended" and content["signature"] is None
    assert content["impression"] == "Amended: see M-rows."
    edited = next(x for x in content["measurements"] if x["id"] == m["id"])
    measured = (m.get("measured") or {}).get(field, m[field])  # the scanner's value, kept through every edit
    assert edited["edited"] is True and edited[field] == new and edited["measured"][field] == measured
    # The findings still cite the measured size: grounding ran again on the amendment and flags the row.
    assert any(f["measurement_id"] == m["id"] for f in r.json()["flags"]), r.json()["flags"]
    # The signed version is untouched, and only the newest signed version can be amended.
    assert live.get(f"/api/v1/reports/{rid}", "clin").json()["content"]["impression"] == signed["content"]["impression"]
    again = live.post(amend, "clin", json={"reason": "twice"})
    assert again.status_code == 409 and "amend the newest version" in error_of(again)["message"]
    open_one = live.post(f"/api/v1/reports/{version['id']}/amend", "clin", json={"reason": "x"})
    assert open_one.status_code == 409 and "unsigned amendment" in error_of(open_one)["message"]

    # The open amendment is edited by its author like a draft, then signed; after that it is final too.
    patched = live.patch(f"/api/v1/reports/{version['id']}", "clin",
                         json={"recommendation": "Follow-up CT in 3 months."})
    assert patched.status_code == 200 and patched.json()["report"]["content"]["recommendation"].startswith("Follow")
    assert live.patch(f"/api/v1/reports/{version['id']}", "clin2", json={"impression": "x"}).status_code == 403
    fhir = live.get(f"/api/v1/reports/{version['id']}.fhir", "clin").json()
    assert fhir["status"] == "amended"
    done = live.post(f"/api/v1/reports/{version['id']}/sign", "clin")
    assert done.status_code == 200, done.text
    assert (done.json()["report"]["status"], done.json()["report"]["signer"]) == ("amended", "clin")
    twice = live.post(f"/api/v1/reports/{version['id']}/sign", "clin")
    assert twice.status_code == 409 and "already amended and signed" in error_of(twice)["message"]
    assert live.patch(f"/api/v1/reports/{version['id']}", "clin", json={"impression": "x"}).status_code == 409
    shown = live.get(f"/api/v1/reports/{version['id']}", "clin").json()["content"]
    assert shown["signature"]["signer"] == "clin" and shown["status"] == "amended"
    detail = live.get(f"/api/v1/ct/studies/{sid}", "clin").json()
    assert [(x["version"], x["status"]) for x in detail["reports"]] == [(1, "final"), (2, "amended")]

    from apps.store import Actor, audit_events

    trail = [(e.action, e.outcome) for e in audit_events(live.store, Actor.system(), object_type="report",
                                                          object_id=version["id"], limit=100)]
    assert ("report.amend", "ok") in trail and ("report.sign", "ok") in trail and ("report.edit", "ok") in trail


def test_one_time_password_blocks_the_api_until_changed(live):
    from apps.store import Actor, audit_events, create_api_token, create_user

    create_user(live.store, Actor.system(), "first", "one-time pw 42", "admin", must_change_password=True)
    auth = {"Authorization": f"Bearer {create_api_token(live.store, Actor.system(), 'first')[0]}"}
    assert live.get("/api/v1/me", headers=auth).json() == {"username": "first", "role": "admin", "site": "main",
                                                         "must_change_password": True}
    for blocked in (live.get("/api/v1/lots", headers=auth), live.get("/api/v1/ct/studies", headers=auth),
                    live.post("/api/v1/wafers/score", headers=auth, json={"maps": [{"wafer_id": "A", "grid": [[1]]}]})):
        assert blocked.status_code == 403, blocked.text
        e = error_of(blocked)
        assert e["code"] == "password_change_required" and "POST /api/v1/me/password" in e["message"]
    url = "/api/v1/me/password"
    wrong = live.post(url, headers=auth, json={"current_password": "not it", "new_password": "a long new secret"})
    assert wrong.status_code == 403 and error_of(wrong) == {
        "code": "wrong_password", "message": "password change failed: the current password is wrong"}
    short = live.post(url, headers=auth, json={"current_password": "one-time pw 42", "new_password": "short"})
    assert short.status_code == 400 and error_of(short)["message"].startswith("new_password: expected at least 8")
    missing = live.post(url, headers=auth, json={"new_password": "a long new secret"})
    assert missing.status_code == 400
    assert error_of(missing)["message"] == "current_password: expected text, found nothing"
    assert live.post(url, json={"current_password": "x", "new_password": "y"}).status_code == 401
    ok = live.post(url, headers=auth, json={"current_password": "one-time pw 42", "new_password": "a long new secret"})
    assert ok.status_code == 200 and ok.json() == {"username": "first", "must_change_password": False}
    assert live.get("/api/v1/lots", headers=auth).status_code == 200  # the same token works now
    assert live.get("/api/v1/me", headers=auth).json()["must_change_password"] is False
    events = [(e.action, e.outcome) for e in audit_events(live.store, Actor.system(), username="first", limit=100)]
    assert ("user.password", "failed") in events and ("user.password", "ok") in events
    assert events.count(("api.request", "denied")) == 3  # the refused calls are in the trail


# ---------------------------------------------------------------------------------------------------- bad input

def zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("IM0001.dcm", b"\0" * (64 * 2**20))  # 64 MiB of zeros in ~64 KiB
    return buf.getvalue()


def test_bad_uploads_are_refused_cleanly(live):
    before = count_studies(live)
    blobs_before = sum(1 for _ in (live.data_dir / "blobs").rglob("*") if _.is_file())
    cases = {
        "bomb": ("bomb.zip", zip_bomb(), 400, "zip"),
        "not dicom": ("notes.zip", _zip({"readme.txt": b"hello", "data.csv": b"1,2,3"}), 400, ""),
        "garbage": ("x.dcm", b"not a dicom file at all", 400, ""),
    }
    for name, (fname, data, status, word) in cases.items():
        r = live.post("/api/v1/ct/studies", "clin", files=[("files", (fname, data))])
        assert r.status_code == status, (name, r.text)
        assert word in error_of(r)["message"].lower(), (name, r.text)
    big = live.post("/api/v1/ct/studies", "clin", files=[("files", ("big.dcm", b"\0" * (33 * 2**20)))])
    assert big.status_code == 413 and error_of(big)["code"] == "too_large"
    assert live.post("/api/v1/ct/studies", "clin", files=[("other", ("a.dcm", b"x"))]).status_code == 400
    assert live.post("/api/v1/ct/studies", "clin", data={"x": "1"}).status_code == 415
    assert live.post("/api/v1/ct/studies", "clin", json={"files": []}).status_code == 415
    assert count_studies(live) == before  # nothing partial stored
    assert sum(1 for _ in (live.data_dir / "blobs").rglob("*") if _.is_file()) == blobs_before
    assert live.get("/healthz").status_code == 200  # and the server keeps serving
    assert not any((live.data_dir / "uploads").iterdir())  # scratch folders are gone


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- wafers

def test_score_wafer_zip_and_lot_report(live, wafer_model, helpers):
    r = live.post("/api/v1/wafers/score", "eng", data={"lot": "LOT-API-1", "product": "P1"},
                  files=[("files", ("maps.zip", helpers.wafer_zip(5), "application/zip")),
                         ("files", ("broken.npy", b"garbage"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lot"] == "LOT-API-1" and body["model_id"].startswith("wafer@")
    rows = body["results"]
    assert [row["wafer_id"] for row in rows] == ["W01", "W02", "W03", "W04", "W05", "broken"]
    assert set(rows[0]) == {"wafer_id", "source", "status", "error", "predicted_class", "class_probs",
                            "defect_score", "anomaly_score"}
    assert rows[0]["source"] == "maps.zip::W01.npy" and rows[-1]["status"] == "error"
    assert all(0 <= row["defect_score"] <= 1 for row in rows[:5])
    lot = live.get("/api/v1/lots/LOT-API-1", "eng").json()
    assert lot["lot"]["wafers"] == 6 and lot["lot"]["errors"] == 1 and lot["lot"]["maps_read"] == 5
    assert 80 < lot["lot"]["mean_yield_pct"] < 100
    pdf = live.get("/api/v1/lots/LOT-API-1?format=pdf", "eng")
    assert pdf.content.startswith(b"%PDF")
    assert live.get("/api/v1/lots/LOT-API-1?format=csv", "eng").text.startswith("wafer_id")


def test_score_json_maps_and_wafer_roles(live, wafer_model):
    grid = [[0, 1, 1, 0], [1, 2, 1, 1], [1, 1, 2, 1], [0, 1, 1, 0]]
    r = live.post("/api/v1/wafers/score", "eng", json={"lot": "LOT-API-2", "maps": [
        {"wafer_id": "A1", "grid": grid, "slot": 1}, {"wafer_id": "A2", "grid": grid, "slot": 2}]})
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["ok", "ok"]
    assert live.post("/api/v1/wafers/score", "clin", json={"maps": [{"wafer_id": "A", "grid": grid}]}
                     ).status_code == 403
    other_site = live.post("/api/v1/wafers/score", "eng2", json={"lot": "LOT-API-2", "maps": [
        {"wafer_id": "B", "grid": grid}]})
    assert other_site.status_code in (403, 409), other_site.text
    assert live.get("/api/v1/lots/LOT-API-2", "eng2").status_code == 403
    assert live.get("/api/v1/lots/NO-SUCH-LOT", "eng").status_code == 404


def test_bad_wafer_input(live):
    cases = [
        ({"maps": [{"wafer_id": "A", "grid": [[0, 7]]}]}, "grid"),
        ({"maps": [{"wafer_id": "A", "grid": [[0, 1], [1]]}]}, "rectangular"),
        ({"maps": []}, "maps"),
        ({"lot": "../etc", "maps": [{"wafer_id": "A", "grid": [[1]]}]}, "lot"),
    ]
    for body, word in cases:
        r = live.post("/api/v1/wafers/score", "eng", json=body)
        assert r.status_code in (400, 503), r.text
        if r.status_code == 400:
            assert word in error_of(r)["message"]
    r = live.post("/api/v1/wafers/score", "eng", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "bad_json"
    bomb = live.post("/api/v1/wafers/score", "eng", files=[("files", ("bomb.zip", zip_bomb()))])
    assert bomb.status_code == 400 and "zip bomb" in error_of(bomb)["message"]
    assert live.get("/healthz").status_code == 200


def test_every_call_is_audited(live, uploaded):
    from apps.store import Actor, audit_events

    actions = {e.action for e in audit_events(live.store, Actor.system(), limit=5000)}
    assert {"study.add", "report.draft", "report.view", "token.check"} <= actions
    denied = audit_events(live.store, Actor.system(), username="clin2", limit=100)
    assert any(e.outcome == "denied" for e in denied)
