import pytest

from apps.store import (InvalidTransition, NewSeries, NotFoundError, PermissionDenied, StoreError, add_study,
                        add_voice_note, amend_report, create_draft_report, edit_draft, get_report, get_study,
                        list_reports, list_studies, list_voice_notes, share_study, sign_report)

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
CHECKPOINT = "ab" * 32


@pytest.fixture
def study(store, people):
    files = [store.put_blob(f"dicom slice {i}".encode()) for i in range(3)]
    return add_study(store, people["dr_a"], STUDY_UID, [NewSeries(STUDY_UID + ".1", 3, files, "axial 1 mm")],
                     description="CT chest", patient_pseudonym="P-0001", study_date="20261101", client="10.0.0.1")


def draft_content(text="No nodules."):
    return {"findings": text, "impression": "Normal chest CT.", "measurements": [{"name": "aorta", "mm": 31.5}]}


def test_add_and_get_study(store, people, study, audit_log):
    assert study.owner == "dr_a" and study.site == "north" and study.study_date == "20261101"
    assert [(s.series_uid, s.slice_count, s.description) for s in study.series] == [
        (STUDY_UID + ".1", 3, "axial 1 mm")]
    got = get_study(store, people["dr_a"], study.id, client="10.0.0.2")
    assert got == study
    assert get_study(store, people["dr_a"], STUDY_UID) == study  # by StudyInstanceUID
    with store.open_blob(got.series[0].blobs[2]) as f:
        assert f.read() == b"dicom slice 2"
    trail = [(e.action, e.object_id, e.client) for e in audit_log(object_type="study")]
    assert trail == [("study.add", str(study.id), "10.0.0.1"), ("study.view", str(study.id), "10.0.0.2"),
                     ("study.view", str(study.id), None)]


def test_add_study_validates(store, people, study):
    with pytest.raises(StoreError, match="study_uid: expected a DICOM UID"):
        add_study(store, people["dr_a"], "../../etc", [NewSeries("1.2.3", 1)])
    with pytest.raises(StoreError, match=r"series\[0\].blobs\[0\]: expected a sha256"):
        add_study(store, people["dr_a"], "1.2.3", [NewSeries("1.2.3.4", 1, ["nope"])])
    with pytest.raises(NotFoundError, match="is not in the store"):
        add_study(store, people["dr_a"], "1.2.3", [NewSeries("1.2.3.4", 1, ["0" * 64])])
    with pytest.raises(StoreError, match="already stored"):
        add_study(store, people["dr_b"], STUDY_UID, [NewSeries("1.2.3.4", 1)])
    with pytest.raises(StoreError, match=r"series_uid 1.2.826.0.1.3680043.8.498.1.1: a series .* already stored"):
        add_study(store, people["dr_b"], "1.2.3", [NewSeries(STUDY_UID + ".1", 1)])
    with pytest.raises(PermissionDenied, match="needs the role clinician"):
        add_study(store, people["admin"], "1.2.3", [NewSeries("1.2.3.4", 1)])
    with pytest.raises(StoreError, match="study_date: expected a DICOM date YYYYMMDD"):
        add_study(store, people["dr_a"], "1.2.3", [NewSeries("1.2.3.4", 1)], study_date="2026-11-01")


def test_visibility_and_sharing(store, people, study, audit_log):
    assert [s.id for s in list_studies(store, people["dr_a"])] == [study.id]
    assert list_studies(store, people["dr_b"]) == []  # same site, but nothing shared yet
    assert [s.id for s in list_studies(store, people["admin"])] == [study.id]
    with pytest.raises(PermissionDenied, match="neither theirs nor shared"):
        get_study(store, people["dr_b"], study.id)
    with pytest.raises(PermissionDenied, match="needs the role clinician or admin"):
        get_study(store, people["eng_north"], study.id)
    share_study(store, people["dr_a"], study.id, site="north")
    assert get_study(store, people["dr_b"], study.id).id == study.id
    with pytest.raises(PermissionDenied, match="only its owner or an admin"):
        share_study(store, people["dr_b"], study.id, site="south")
    with pytest.raises(PermissionDenied):
        get_study(store, people["dr_south"], study.id)
    share_study(store, people["dr_a"], study.id, username="dr_south")
    share_study(store, people["dr_a"], study.id, username="dr_south")  # sharing twice is harmless
    assert [s.id for s in list_studies(store, people["dr_south"])] == [study.id]
    with pytest.raises(StoreError, match="is an engineer; studies are shared with clinicians only"):
        share_study(store, people["dr_a"], study.id, username="eng_north")
    with pytest.raises(NotFoundError):
        get_study(store, people["dr_a"], 9999)
    denied = [(e.username, e.action, e.object_id) for e in audit_log() if e.outcome == "denied"]
    assert denied == [("dr_b", "study.view", str(study.id)), ("eng_north", "study.view", str(study.id)),
                      ("dr_b", "study.share", str(study.id)), ("dr_south", "study.view", str(study.id))]


def test_report_life_cycle(store, people, study, audit_log):
    draft = create_draft_report(store, people["dr_a"], study.id, draft_content(), model_id="ct-tiny@1",
                                checkpoint_sha256=CHECKPOINT)
    assert (draft.version, draft.status, draft.author, draft.signer) == (1, "draft", "dr_a", None)
    edited = edit_draft(store, people["dr_a"], draft.id, draft_content("2 mm nodule, right upper lobe."))
    assert edited.content["findings"] == "2 mm nodule, right upper lobe."
    assert edited.model_draft == draft_content()  # the model's text stays beside the edit
    share_study(store, people["dr_a"], study.id, site="north")
    with pytest.raises(PermissionDenied, match="only its author dr_a"):
        edit_draft(store, people["dr_b"], draft.id, draft_content("changed"))
    with pytest.raises(PermissionDenied, match="needs the role clinician"):
        sign_report(store, people["admin"], draft.id)
    final = sign_report(store, people["dr_b"], draft.id)  # any clinician who can see the study may sign
    assert (final.status, final.signer, final.author) == ("final", "dr_b", "dr_a") and final.signed_at
    with pytest.raises(InvalidTransition, match="a signed report is immutable; amend it"):
        edit_draft(store, people["dr_a"], draft.id, draft_content("too late"))
    with pytest.raises(InvalidTransition, match="already final and signed; only a draft or an unsigned amendment"):
        sign_report(store, people["dr_a"], draft.id)
    with pytest.raises(InvalidTransition, match="already has a signed report"):
        create_draft_report(store, people["dr_a"], study.id, draft_content(), model_id=None, checkpoint_sha256=None)
    amended = amend_report(store, people["dr_b"], final.id, draft_content("3 mm nodule."), reason="size corrected")
    assert (amended.version, amended.status, amended.amends_id, amended.amend_reason) == (
        2, "amended", final.id, "size corrected")
    assert (amended.author, amended.signer, amended.signed_at) == ("dr_b", None, None)  # open until signed
    assert amended.model_draft == draft_content() and amended.checkpoint_sha256 == CHECKPOINT
    with pytest.raises(InvalidTransition, match="already amended by report .* amend the newest version"):
        amend_report(store, people["dr_a"], final.id, draft_content(), reason="again")
    with pytest.raises(InvalidTransition, match="is an unsigned amendment; edit or sign it"):
        amend_report(store, people["dr_b"], amended.id, draft_content(), reason="again")
    with pytest.raises(InvalidTransition, match="already has an open amended"):
        create_draft_report(store, people["dr_a"], study.id, draft_content(), model_id=None, checkpoint_sha256=None)
    with pytest.raises(PermissionDenied, match="only its author dr_b"):
        edit_draft(store, people["dr_a"], amended.id, draft_content("4 mm nodule."))
    assert edit_draft(store, people["dr_b"], amended.id, draft_content("4 mm nodule.")).content["findings"] == \
        "4 mm nodule."
    signed = sign_report(store, people["dr_a"], amended.id)  # any clinician who can see the study may sign it
    assert (signed.status, signed.signer, signed.author) == ("amended", "dr_a", "dr_b") and signed.signed_at
    with pytest.raises(InvalidTransition, match="already amended and signed"):
        sign_report(store, people["dr_a"], amended.id)
    with pytest.raises(InvalidTransition, match="a signed report is immutable"):
        edit_draft(store, people["dr_b"], amended.id, draft_content("5 mm nodule."))
    third = amend_report(store, people["dr_a"], amended.id, draft_content("5 mm nodule."), reason="re-measured")
    assert (third.version, third.amends_id) == (3, amended.id)
    assert get_report(store, people["dr_a"], final.id).content["findings"] == "2 mm nodule, right upper lobe."
    assert [(r.version, r.status, r.signer) for r in list_reports(store, people["dr_b"], study.id)] == [
        (1, "final", "dr_b"), (2, "amended", "dr_a"), (3, "amended", None)]
    trail = [(e.username, e.action, e.object_id) for e in audit_log(object_type="report") if e.outcome == "ok"]
    assert trail == [("dr_a", "report.draft", str(draft.id)), ("dr_a", "report.edit", str(draft.id)),
                     ("dr_b", "report.sign", str(draft.id)), ("dr_b", "report.amend", str(amended.id)),
                     ("dr_b", "report.edit", str(amended.id)), ("dr_a", "report.sign", str(amended.id)),
                     ("dr_a", "report.amend", str(third.id)), ("dr_a", "report.view", str(final.id))]
    assert audit_log(action="report.edit")[0].details == {"changed_fields": ["findings"]}
    signs = [e.details for e in audit_log(action="report.sign") if e.outcome == "ok"]
    assert signs[1] == {"study_id": study.id, "version": 2, "status": "amended"}


def test_drafts_cannot_be_amended_or_doubled(store, people, study):
    draft = create_draft_report(store, people["dr_a"], study.id, draft_content(), model_id="ct-tiny@1",
                                checkpoint_sha256=None)
    with pytest.raises(InvalidTransition, match="is a draft; edit or sign it"):
        amend_report(store, people["dr_a"], draft.id, draft_content(), reason="x")
    with pytest.raises(InvalidTransition, match="already has an open draft"):
        create_draft_report(store, people["dr_a"], study.id, draft_content(), model_id=None, checkpoint_sha256=None)
    with pytest.raises(PermissionDenied):  # dr_south cannot see the study at all
        sign_report(store, people["dr_south"], draft.id)
    with pytest.raises(StoreError, match="content: expected JSON-serialisable content"):
        edit_draft(store, people["dr_a"], draft.id, {"volume_ml": float("nan")})
    with pytest.raises(StoreError, match="checkpoint_sha256: expected 64 lowercase hex digits"):
        create_draft_report(store, people["dr_a"], study.id, {}, model_id=None, checkpoint_sha256="abc")
    with pytest.raises(NotFoundError, match="report 777: no such report"):
        get_report(store, people["dr_a"], 777)


def test_voice_notes(store, people, study, audit_log):
    audio = store.put_blob(b"RIFF....WAVEfmt " + bytes(100))
    transcript = {"text": "two millimetre nodule", "segments": [{"start": 0.0, "end": 1.4, "text": "two"}]}
    note = add_voice_note(store, people["dr_a"], study.id, audio, transcript, "faster-whisper", "whisper-base",
                          language="en", duration_s=1.4)
    assert (note.owner, note.site, note.transcript, note.duration_s) == ("dr_a", "north", transcript, 1.4)
    assert list_voice_notes(store, people["dr_a"], study.id) == [note]
    with pytest.raises(PermissionDenied):
        add_voice_note(store, people["dr_south"], study.id, audio, transcript, "faster-whisper", "whisper-base")
    with pytest.raises(NotFoundError, match="audio_sha256: blob .* is not in the store"):
        add_voice_note(store, people["dr_a"], study.id, "1" * 64, transcript, "faster-whisper", "whisper-base")
    assert [e.action for e in audit_log(username="dr_a") if e.action.startswith("voice")] == [
        "voice_note.add", "voice_note.list"]
