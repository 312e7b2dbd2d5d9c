import copy
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from pipelines.ct.grounding import finding_labels, label_report
from pipelines.ct.report import (DEFAULT_CRITICAL_RULES, CTReport, ReportError, build_report, draft_report,
                                 load_critical_rules, transcribe_voice_note)


def test_template_report_names_the_phantom_findings(study):
    report = study.report()
    truth = {f["type"] for f in study.findings}
    labels = finding_labels(report.narrative())
    assert {t for t, present in labels.items() if present} == truth
    # Every measured finding is matched in the narrative: no grounding flags at all on the template's own text.
    assert report.flags == []
    # Nodule locations and sizes come through the labeller: lobe and mean diameter of each measured nodule.
    nodules = [x for x in label_report(report) if x.type == "nodule" and not x.negated and x.section != "impression"]
    said = sorted((x.lobe, max(v for v, _, _ in x.sizes_mm if abs(v - round(v)) < 1e-9)) for x in nodules)
    truth_nodules = sorted((f["lobe"], round(f["long_axis_mm"])) for f in study.findings if f["type"] == "nodule")
    assert said == truth_nodules
    assert len(report.measurements) == len(study.findings)
    assert report.status == "draft" and report.model.id == "template"


def test_report_identity_technique_and_references_come_from_the_headers(study):
    report = study.report()
    meta = study.volume.metadata
    assert report.patient.id == meta.patient_id and report.patient.name == meta.patient_name
    assert report.study.study_uid == meta.study_uid and report.study.series_uid == meta.series_uid
    t = report.technique
    assert (t.kvp, t.slice_thickness_mm, t.kernel, t.contrast) == (120.0, 6.0, "STANDARD", False)  # "WO CONTRAST"
    assert t.ctdi_vol_mgy is None and t.dlp_mgy_cm is None  # the phantom headers carry no dose
    assert "without intravenous contrast" in t.text() and "120 kVp" in t.text() and "6 mm slices" in t.text()
    sops = [str(h.SOPInstanceUID) for h in study.headers]
    for m in report.measurements:
        if m.center_zyx_mm is not None:
            k = round(m.center_zyx_mm[0] / study.volume.spacing_zyx[0])
            assert m.image_sop_instance_uid == sops[k]
        assert m.tracking_uid.count(".") > 3


def test_technique_reads_ctdivol_and_estimates_dlp(study):
    header = copy.deepcopy(study.headers[0])  # the session study stays untouched
    header.CTDIvol = 8.0  # mGy
    header.ContrastBolusAgent = "Iohexol"
    report = build_report([], metadata=study.volume.metadata, header=header, scan_length_mm=300.0)
    t = report.technique
    assert t.ctdi_vol_mgy == 8.0 and t.dlp_mgy_cm == pytest.approx(240.0) and t.dlp_estimated
    assert t.contrast is True and "with intravenous contrast (Iohexol)" in t.text()


def test_json_round_trip_is_exact(study, tmp_path):
    report = study.report(transcript="Clinical question: chronic cough. Compare with the prior CT from last year.")
    report.sign("WATSON^JOAN", "General Hospital", datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    again = CTReport.from_json(report.to_json())
    assert again == report
    assert again.indication.transcript.startswith("Clinical question")
    assert again.comparison == "Compare with the prior CT from last year."
    data = json.loads(report.to_json())
    for key in ("findings", "impression", "measurements", "flags", "status", "model"):
        assert key in data
    assert set(data["findings"]) == {"lungs_airways", "pleura", "heart_pericardium", "mediastinum_lymph_nodes",
                                     "bones_chest_wall", "upper_abdomen"}


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"schema_version": "0.1"}', "schema_version expected '1.0'"),
    ('{"schema_version": "1.0", "status": "sent"}', "field status"),
])
def test_bad_report_json_names_the_problem(text, message):
    with pytest.raises(ReportError, match=message):
        CTReport.from_json(text, source="upload.json")


def test_sign_amend_and_edit_follow_the_report_lifecycle(study):
    report = study.report()
    with pytest.raises(ReportError, match="signer"):
        report.sign("  ")
    report.sign("WATSON^JOAN")
    assert report.status == "final" and report.signature.signer == "WATSON^JOAN"
    with pytest.raises(ReportError, match="already final"):
        report.sign("WATSON^JOAN")
    report.amend(impression="1. Revised impression.")
    assert report.status == "amended" and report.signature is None
    report.sign("HOLMES^S")
    assert report.status == "amended" and report.signature.signer == "HOLMES^S"
    before = report.measurements[0].diameter_mm
    edited = report.edit_measurement("M1", diameter_mm=6.0)
    assert edited.edited and edited.diameter_mm == 6.0 and edited.measured["diameter_mm"] == before
    assert report.signature is None  # an edit to a signed report needs a new signature
    with pytest.raises(ReportError, match="cannot be edited"):
        report.edit_measurement("M1", tracking_uid="1.2.3")
    with pytest.raises(ReportError, match="'M99': not in this report"):
        report.measurement("M99")


def test_critical_rules_raise_results_shown_first(tmp_path):
    findings = [{"type": "pericardial_effusion", "volume_ml": 620.0},
                {"type": "pleural_effusion", "side": "left", "volume_ml": 400.0}]
    report = build_report(findings)
    assert [c.rule for c in report.critical] == ["large_pericardial_effusion"]
    assert "620 mL" in report.critical[0].message and report.critical[0].measurement_id == "M1"
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"name": "any_pleural", "finding": "pleural_effusion", "field": "volume_ml",
                                  "at_least": 300, "message": "Pleural effusion {value:.0f} mL on the {where}."}]))
    custom = build_report(findings, critical_rules=load_critical_rules(rules))
    assert [(c.rule, c.message) for c in custom.critical] == [("any_pleural", "Pleural effusion 400 mL on the left.")]
    rules.write_text(json.dumps([{"name": "x", "finding": "tumour", "field": "volume_ml", "at_least": 1,
                                  "message": "m"}]))
    with pytest.raises(ValueError, match="rule 0 field finding"):
        load_critical_rules(rules)
    assert {r.name for r in DEFAULT_CRITICAL_RULES} >= {"large_pericardial_effusion", "large_pleural_effusion"}


def test_fleischner_follow_up_for_the_largest_nodule():
    small = build_report([{"type": "nodule", "lobe": "RUL", "side": "right", "diameter_mm": 4.0,
                           "composition": "solid"}])
    assert small.recommendation.startswith("No routine follow-up")
    mid = build_report([{"type": "nodule", "lobe": "RUL", "side": "right", "diameter_mm": 7.0, "composition": "solid"}])
    assert "6-12 months" in mid.recommendation
    none = build_report([{"type": "pleural_effusion", "side": "right", "volume_ml": 50.0}])
    assert none.recommendation == ""


def test_bad_measurements_are_refused_with_the_field_named():
    with pytest.raises(ReportError, match="type expected one of"):
        build_report([{"type": "tumour"}])
    with pytest.raises(ReportError, match="diameter_mm expected a finite value"):
        build_report([{"type": "nodule", "diameter_mm": float("nan")}])


def test_unreadable_voice_note_gives_a_warning_not_a_crash(tmp_path):
    note = tmp_path / "note.wav"
    note.write_bytes(b"RIFF\x00\x00garbage" * 40)
    transcript, flags, _ = transcribe_voice_note(note)
    assert transcript is None and [f.kind for f in flags] == ["voice_note"]
    assert "note.wav" in flags[0].message and "not used" in flags[0].message
    empty = tmp_path / "empty.m4a"
    empty.write_bytes(b"")
    assert "empty" in transcribe_voice_note(empty)[1][0].message


def test_series_without_lungs_and_bad_voice_note_still_give_a_report(tmp_path):
    from pipelines.ct.phantom import write_series
    from pipelines.ct.volume import SeriesMetadata, Volume

    z, y, x = np.mgrid[:16, :64, :64]
    hu = np.full((16, 64, 64), -1000, np.int16)
    hu[(y - 32) ** 2 + (x - 32) ** 2 < 26 ** 2] = 40  # an abdomen-like soft-tissue cylinder: no air inside the body
    meta = SeriesMetadata(patient_id="P1", patient_name="DOE^JANE", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
                          study_date="20250101", manufacturer="test", kvp=120.0, slice_thickness_mm=5.0)
    write_series(Volume(hu=hu, spacing_zyx=(5.0, 5.0, 5.0), metadata=meta), tmp_path / "abdomen")
    note = tmp_path / "note.ogg"
    note.write_bytes(b"OggS" + bytes(300))
    report, _ = draft_report(tmp_path / "abdomen", voice=note)
    kinds = [f.kind for f in report.flags]
    assert "no_lungs" in kinds and "voice_note" in kinds
    assert "not included in the field of view" in report.findings.lungs_airways
    assert report.measurements == [] and report.patient.id == "P1"
    assert CTReport.from_json(report.to_json()) == report


def test_indication_and_comparison_from_a_dictation():
    from pipelines.ct.report import indication_from_transcript

    text = "Clinical question: cough in a former smoker, Mrs. Jones. Dr. Lee asked for this. Compare with the prior CT."
    indication, comparison = indication_from_transcript(text)
    assert indication.text == "Clinical question: cough in a former smoker, Mrs. Jones."
    assert indication.transcript == text and indication.source == "dictation"
    assert comparison == "Compare with the prior CT."
    assert indication_from_transcript("   ") == (indication_from_transcript(None)[0], "None.")


def test_measurement_table_from_measure_findings():
    from pipelines.ct.measure import Finding, Findings

    measured = Findings(findings=[
        Finding(type="nodule", side="right", lobe="RLL", diameter_mm=8.2, long_axis_mm=9.0, short_axis_mm=7.4,
                volume_ml=0.29, mean_hu=-20.0, composition="solid", center_zyx_mm=[30.0, 100.0, 80.0],
                center_voxel=[12, 40, 32], bbox_zyx=[11, 38, 30, 14, 43, 35]),
        Finding(type="pleural_effusion", side="left", volume_ml=310.0, mean_hu=4.0, extra={"thickness_mm": 21.0}),
    ], lung_volume_ml={"right": 2400.0, "left": 2100.0}, laa950_percent=1.2)
    report = build_report(measured, lung_volume_ml=4500.0,
                          slice_refs=[("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{k}") for k in range(20)])
    nodule, effusion = report.measurements
    assert (nodule.id, nodule.lobe, nodule.diameter_mm, nodule.center_voxel) == ("M1", "RLL", 8.2, [12, 40, 32])
    assert nodule.image_sop_instance_uid == "1.2.3.12" and effusion.image_sop_instance_uid == ""
    assert effusion.thickness_mm == 21.0 and effusion.label() == "left pleural effusion, 310 mL (M2)"
    assert "Moderate left pleural effusion, about 310 mL (M2)." in report.findings.pleura
    assert report.flags == []
