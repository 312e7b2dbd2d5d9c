import base64
import copy
import json
import shutil
import subprocess
from datetime import datetime, timezone

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from pipelines.ct import exports
from pipelines.ct.deid import Deidentifier
from pipelines.ct.report import ModelInfo

SIGNED_AT = datetime(2026, 2, 3, 9, 30, tzinfo=timezone.utc)


def _read_sr(path):
    ds = pydicom.dcmread(path)
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    return ds, hd.sr.MeasurementReport.from_sequence([sr])


def test_json_file_round_trip(study, tmp_path):
    report = study.report()
    path = exports.write_json(report, tmp_path / "r.json")
    assert exports.read_json(path) == report
    assert not list(tmp_path.glob(".r.json-*"))  # no temp file left behind


def test_sr_draft_holds_tid1500_measurements_and_reads_back(study, tmp_path):
    report = study.report(model=ModelInfo(id="ct-report-demo", version="0.1", checkpoint_sha256="ab" * 32))
    path = exports.write_sr(report, tmp_path / "draft.dcm", study.headers)
    ds, mr = _read_sr(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and ds.Modality == "SR"
    assert ds.VerificationFlag == "UNVERIFIED" and ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.StudyInstanceUID == study.volume.metadata.study_uid and ds.PatientID == study.volume.metadata.patient_id
    planar = mr.get_planar_roi_measurement_groups()
    nodules = [m for m in report.measurements if m.kind in ("nodule", "calcified_granuloma")]
    assert len(planar) == len(nodules) == 4
    by_uid = {m.tracking_uid: m for m in report.measurements}
    for group in planar:
        m = by_uid[group.tracking_uid]
        values = {x.name.meaning: (x.value, x.unit.value) for x in group.get_measurements()}
        assert values["Diameter"] == (pytest.approx(m.diameter_mm), "mm")
        assert values["Long axis"] == (pytest.approx(m.long_axis_mm), "mm")
        assert values["Short axis"] == (pytest.approx(m.short_axis_mm), "mm")
        assert values["Volume"] == (pytest.approx(m.volume_ml * 1000), "mm3")
        region = group.roi
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == m.image_sop_instance_uid
        assert m.image_sop_instance_uid in {str(h.SOPInstanceUID) for h in study.headers}
    others = mr.get_image_measurement_groups()
    assert len(others) == len(report.measurements) - len(nodules)
    effusion = next(g for g in others if g.tracking_uid == report.measurements[4].tracking_uid)
    assert effusion.get_measurements()[0].value == pytest.approx(report.measurements[4].volume_ml)
    [device] = mr.get_observer_contexts(observer_type=pydicom.sr.codedict.codes.DCM.Device)
    attrs = device.observer_identifying_attributes
    assert (attrs.name, attrs.manufacturer_name, attrs.model_name) == ("ct-report-demo", "mmcore", "ct-report-demo 0.1")
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in ds.ContentSequence
             if item.ValueType == "TEXT"}
    assert texts["Finding"] == report.findings.text() and texts["Impression"] == report.impression
    assert ds.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == study.volume.metadata.study_uid


def test_signed_sr_is_verified_with_the_signer(study, tmp_path):
    report = study.report().sign("WATSON^JOAN", "General Hospital", SIGNED_AT)
    ds, _ = _read_sr(exports.write_sr(report, tmp_path / "final.dcm", study.headers))
    assert ds.VerificationFlag == "VERIFIED" and ds.PreliminaryFlag == "FINAL" and ds.CompletionFlag == "COMPLETE"
    observer = ds.VerifyingObserverSequence[0]
    assert observer.VerifyingObserverName == "WATSON^JOAN" and observer.VerifyingOrganization == "General Hospital"
    assert observer.VerificationDateTime == "20260203093000"


def test_fhir_diagnostic_report_validates_and_round_trips(study, tmp_path):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    report = study.report()
    draft = exports.read_fhir(exports.write_fhir(report, tmp_path / "draft.json"))
    assert isinstance(draft, DiagnosticReport) and draft.status == "preliminary"
    assert draft.conclusion == report.impression
    assert len(draft.contained) == len(draft.result) == len(report.measurements)
    for obs, m in zip(draft.contained, report.measurements):
        assert obs.status == "preliminary" and obs.identifier[0].value == f"urn:oid:{m.tracking_uid}"
        values = {c.code.text: (float(c.valueQuantity.value), c.valueQuantity.code) for c in obs.component}
        if m.diameter_mm is not None:
            assert values["Diameter"] == (pytest.approx(m.diameter_mm), "mm")
        if m.volume_ml is not None:
            assert values["Volume"] == (pytest.approx(m.volume_ml, abs=1e-4), "mL")
    text = draft.presentedForm[0].data.decode()  # fhir.resources decodes base64Binary on parse
    assert "Impression: " + report.impression in text
    raw = json.loads((tmp_path / "draft.json").read_text())
    assert base64.b64decode(raw["presentedForm"][0]["data"]).decode() == text
    report.sign("WATSON^JOAN", when=SIGNED_AT)
    final = exports.read_fhir(exports.write_fhir(report, tmp_path / "final.json"))
    assert final.status == "final" and final.resultsInterpreter[0].display == "WATSON JOAN"
    assert {o.status for o in final.contained} == {"final"}
    report.amend(impression="1. Amended impression.")
    report.sign("WATSON^JOAN", when=SIGNED_AT)
    amended = exports.build_fhir(report)
    assert amended.status == "amended" and amended.conclusion == "1. Amended impression."


def test_critical_results_lead_the_fhir_conclusion():
    from pipelines.ct.report import build_report

    report = build_report([{"type": "pericardial_effusion", "volume_ml": 700.0}])
    assert exports.build_fhir(report).conclusion.startswith("CRITICAL: Large pericardial effusion (700 mL)")


@pytest.mark.skipif(shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None,
                    reason="poppler-utils (pdftoppm, pdftotext) not installed")
def test_pdf_renders_with_text_marking_and_key_images(study, tmp_path):
    report = study.report(transcript="Clinical question: chronic cough.")
    report.edit_measurement("M1", diameter_mm=5.0)
    pdf = exports.write_pdf(report, tmp_path / "report.pdf", volume=study.volume)
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for needle in ("CT CHEST REPORT", "DRAFT", "NOT FOR DIAGNOSTIC USE", study.volume.metadata.patient_id,
                   "Lungs and airways", "Impression", "Measurements", "M1 *", "Key images", "Not signed",
                   "chronic cough"):
        assert needle in text, needle
    subprocess.run(["pdftoppm", "-r", "50", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) >= 1
    pixels = np.asarray(Image.open(pages[0]).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 500 and pixels.std() > 10  # a rendered page, not a blank one
    # Key images: a nodule outline drawn in the overlay colour on a page somewhere.
    red = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in pages]
    assert any(((im[..., 0] > 180) & (im[..., 1] < 120) & (im[..., 2] < 120)).sum() > 20 for im in red)
    signed = report.sign("WATSON^JOAN", "General Hospital", SIGNED_AT)
    text = subprocess.run(["pdftotext", "-", "-"], input=exports.render_pdf(signed), capture_output=True,
                          check=True).stdout.decode()
    assert "FINAL" in text and "Signed by WATSON JOAN, General Hospital on 2026-02-03 09:30" in text


def test_deidentified_exports_carry_no_identity(study, tmp_path):
    report = study.report(transcript=f"Patient {study.volume.metadata.patient_name.split('^')[0]} has a cough.")
    report.sign("WATSON^JOAN", "General Hospital", SIGNED_AT)
    deid = Deidentifier(key=b"z" * 32)
    written = exports.export_all(report, json_path=tmp_path / "r.json", pdf_path=tmp_path / "r.pdf",
                                 sr_path=tmp_path / "r.dcm", fhir_path=tmp_path / "r.fhir.json",
                                 volume=study.volume, evidence=study.headers, deidentifier=deid)
    meta = study.volume.metadata
    secrets = [meta.patient_id, meta.patient_name.split("^")[0], meta.study_uid, meta.series_uid, "WATSON"]
    secrets += [str(h.SOPInstanceUID) for h in study.headers[:3]]
    pdf_text = subprocess.run(["pdftotext", str(written["pdf"]), "-"], capture_output=True, text=True).stdout \
        if shutil.which("pdftotext") else ""
    sr = pydicom.dcmread(written["sr"])
    sr_values = " ".join(str(e.value) for e in sr.iterall() if e.VR not in ("SQ", "OB", "OW"))
    for name, blob in (("json", written["json"].read_text()), ("fhir", written["fhir"].read_text()),
                       ("pdf", pdf_text), ("sr", sr_values)):
        for secret in secrets:
            assert secret not in blob, (name, secret)
    assert sr.PatientIdentityRemoved == "YES" and sr.PatientID == deid.pseudonym(meta.patient_id)
    assert sr.StudyInstanceUID == deid.uid(meta.study_uid)
    _, mr = _read_sr(written["sr"])
    refs = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for g in mr.get_planar_roi_measurement_groups()}
    assert refs <= {deid.uid(h.SOPInstanceUID) for h in study.headers} and refs
    assert exports.read_json(written["json"]).deidentified


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk (dsrdump) not installed")
def test_dcmtk_reads_the_sr_without_errors(study, tmp_path):
    report = study.report().sign("WATSON^JOAN", "General Hospital", SIGNED_AT)
    path = exports.write_sr(report, tmp_path / "sr.dcm", study.headers)
    run = subprocess.run(["dsrdump", "-Ee", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and "E:" not in run.stderr and "W:" not in run.stderr, run.stderr
    assert "Comprehensive 3D SR Document" in run.stdout and "Verification Flag   : VERIFIED" in run.stdout
    assert run.stdout.count('"Measurement Group"') == len(report.measurements)


def test_sr_refuses_evidence_from_another_study(study):
    other = copy.deepcopy(study.headers[0])
    other.StudyInstanceUID = "1.2.3.999"
    with pytest.raises(exports.ReportError, match="evidence expected the report's study"):
        exports.build_sr(study.report(), [other])
    with pytest.raises(exports.ReportError, match="found none"):
        exports.build_sr(study.report(), [])
