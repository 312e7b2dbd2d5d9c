"""Exports of a `CTReport`: JSON, PDF (ReportLab), DICOM SR (highdicom, TID 1500 in a Comprehensive 3D SR) and a
FHIR R4B DiagnosticReport with Observations. Every writer is atomic (temp file + rename), and every writer takes a
`Deidentifier` that, when given, applies the PS3.15 Annex E profile (`pipelines.ct.deid`) to what it writes.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from datetime import timezone
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from pipelines.ct.anatomy import LOBE_NAMES
from pipelines.ct.report import SYSTEM_TITLES, SYSTEMS, CTReport, Measurement, ReportError

NOT_FOR_DIAGNOSTIC_USE = ("NOT FOR DIAGNOSTIC USE: drafted by a demonstration model trained on synthetic phantoms; "
                          "research use only.")
MANUFACTURER = "mmcore"
SR_SERIES_NUMBER = 900  # derived series sort after the images on most viewers
REPORT_LOINC = ("18748-4", "Diagnostic imaging study")
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_UID_SYSTEM = "urn:dicom:uid"

# SNOMED CT concepts per finding type; laterality goes in a separate qualifier (lobe codes below).
FINDING_CODES = {
    "nodule": ("27925004", "Nodule"),
    "pleural_effusion": ("60046008", "Pleural effusion"),
    "pericardial_effusion": ("373945007", "Pericardial effusion"),
    "emphysema": ("49158009", "Emphysema"),
    "consolidation": ("95436008", "Lung consolidation"),
    "cardiomegaly": ("287272002", "Cardiomegaly"),
    "calcified_granuloma": ("45647009", "Granuloma"),
}
LOBE_CODES = {"RUL": ("45653009", "Upper lobe of lung"), "RML": ("72481006", "Middle lobe of right lung"),
              "RLL": ("90572001", "Lower lobe of lung"), "LUL": ("45653009", "Upper lobe of lung"),
              "LLL": ("90572001", "Lower lobe of lung")}
SITE_CODES = {"pleural_effusion": ("3120008", "Pleura"), "pericardial_effusion": ("76848001", "Pericardium"),
              "cardiomegaly": ("80891009", "Heart"), "emphysema": ("39607008", "Lung"),
              "consolidation": ("39607008", "Lung"), "nodule": ("39607008", "Lung"),
              "calcified_granuloma": ("39607008", "Lung")}
SIDE_CODES = {"right": ("24028007", "Right"), "left": ("7771000", "Left"), "bilateral": ("51440002", "Bilateral")}
# (field, SNOMED code, meaning, UCUM unit, unit meaning)
QUANTITIES = [
    ("diameter_mm", "81827009", "Diameter", "mm", "millimeter"),
    ("long_axis_mm", "103339001", "Long axis", "mm", "millimeter"),
    ("short_axis_mm", "103340004", "Short axis", "mm", "millimeter"),
    ("volume_ml", "118565006", "Volume", "mL", "milliliter"),
    ("laa950_percent", "LAA950", "Low attenuation area below -950 HU", "%", "percent"),
    ("cardiothoracic_ratio", "CTR", "Cardiothoracic ratio", "1", "ratio"),
]
PRIVATE_SCHEME = "99MMCORE"  # DICOM private coding scheme for quantities SNOMED CT has no concept for


def _atomic_write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _prepare(report: CTReport, deidentifier, header=None) -> CTReport:
    if deidentifier is None or report.deidentified:
        return report
    return deidentifier.deidentify_report(report, header)


# ----------------------------------------------------------------------------------------------------------- JSON

def write_json(report: CTReport, path: str | Path, *, deidentifier=None, header=None) -> Path:
    return _atomic_write(path, (_prepare(report, deidentifier, header).to_json() + "\n").encode())


def read_json(path: str | Path) -> CTReport:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReportError(f"{path}: cannot read the report ({exc.strerror})") from exc
    return CTReport.from_json(text, source=str(path))


# ----------------------------------------------------------------------------------------------------------- key images

def key_images(report: CTReport, volume, window: str = "lung", max_images: int = 6) -> list[tuple[str, np.ndarray]]:
    """(caption, RGB image) per measured nodule, the slice through its centre with the nodule outlined."""
    from pipelines.ct.render import slice_rgb

    out = []
    nodules = sorted((m for m in report.measurements if m.kind in ("nodule", "calcified_granuloma")
                      and m.center_voxel is not None), key=lambda m: -(m.diameter_mm or 0))
    for m in nodules[:max_images]:
        z, y, x = m.center_voxel
        if not (0 <= z < volume.shape[0] and 0 <= y < volume.shape[1] and 0 <= x < volume.shape[2]):
            continue
        _, dy, dx = volume.spacing_zyx
        r_mm = max((m.long_axis_mm or m.diameter_mm or 4.0) / 2, 2.0) + 1.5  # ring just outside the nodule edge
        yy, xx = np.ogrid[:volume.shape[1], :volume.shape[2]]
        disc = ((yy - y) * dy) ** 2 + ((xx - x) * dx) ** 2 <= r_mm ** 2
        rgb = slice_rgb(volume, int(z), window, mask=disc, alpha=0.0)
        out.append((f"{m.label()}: slice {z + 1} of {volume.shape[0]}", rgb))
    return out


# ----------------------------------------------------------------------------------------------------------- PDF

def render_pdf(report: CTReport, *, volume=None, deidentifier=None, header=None) -> bytes:
    """The report as PDF bytes: header, DRAFT/FINAL marking, demo warning, critical results first, flags, sections,
    measurement table, key images (when the volume is given), signature."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    report = _prepare(report, deidentifier, header)
    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=9.5, leading=12)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10)
    heading = ParagraphStyle("heading", parent=styles["Heading3"], spaceBefore=6, spaceAfter=2)
    marking_colour = {"draft": colors.HexColor("#b00020"), "final": colors.HexColor("#1b5e20"),
                      "amended": colors.HexColor("#e65100")}[report.status]
    marking = ParagraphStyle("marking", parent=styles["Title"], fontSize=15, textColor=marking_colour, spaceAfter=2)

    def p(text, style=body):
        return Paragraph(escape(text or "").replace("\n", "<br/>"), style)

    story = [Paragraph(f"CT CHEST REPORT &mdash; {report.status.upper()}", marking)]
    if report.status == "draft":
        story.append(p("DRAFT: not reviewed or signed by a clinician.", ParagraphStyle("d", parent=body,
                                                                                       textColor=marking_colour)))
    if report.model.demo:
        warning = ParagraphStyle("demo", parent=body, textColor=colors.HexColor("#b00020"))
        story.append(p(NOT_FOR_DIAGNOSTIC_USE, warning))
    pt, st = report.patient, report.study
    rows = [["Patient", pt.name.replace("^", " ") or "-", "Patient ID", pt.id or "-"],
            ["Sex / age", f"{pt.sex or '-'} / {pt.age or '-'}", "Accession", st.accession_number or "-"],
            ["Study date", _date(st.study_date) or "-", "Study", st.description or "-"],
            ["Study UID", st.study_uid or "-", "", ""]]
    header_table = Table([[p(c, small) for c in r] for r in rows], colWidths=[22 * mm, 63 * mm, 22 * mm, 63 * mm])
    header_table.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 0.5, colors.grey),
                                      ("SPAN", (1, 3), (3, 3)), ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    story += [Spacer(1, 3 * mm), header_table]

    if report.critical:
        story.append(Paragraph("CRITICAL RESULTS", ParagraphStyle("crit", parent=heading, textColor=colors.red)))
        story += [p("- " + c.message, ParagraphStyle("c", parent=body, textColor=colors.red)) for c in report.critical]
    if report.flags:
        story.append(Paragraph("Check before signing", heading))
        story += [p(f"[{f.kind.replace('_', ' ')}] {f.message}", small) for f in report.flags]

    story += [Paragraph("Indication", heading), p(report.indication.text or "Not given.")]
    if report.indication.transcript:
        story.append(p("Dictation (verbatim): " + report.indication.transcript, small))
    story += [Paragraph("Comparison", heading), p(report.comparison),
              Paragraph("Technique", heading), p(report.technique.text()),
              Paragraph("Findings", heading)]
    for system in SYSTEMS:
        text = getattr(report.findings, system)
        if text:
            story.append(Paragraph(f"<b>{escape(SYSTEM_TITLES[system])}:</b> {escape(text)}", body))
    if report.measurements:
        story.append(Paragraph("Measurements", heading))
        table = [["ID", "Finding", "Location", "Long x short (mm)", "Mean (mm)", "Volume", "Other"]]
        for m in report.measurements:
            axes = (f"{m.long_axis_mm:.1f} x {m.short_axis_mm:.1f}" if m.long_axis_mm is not None
                    and m.short_axis_mm is not None else "")
            other = (f"LAA-950 {m.laa950_percent:.1f}%" if m.laa950_percent is not None else
                     f"CTR {m.cardiothoracic_ratio:.2f}" if m.cardiothoracic_ratio is not None else
                     (m.composition or ""))
            table.append([m.id + (" *" if m.edited else ""), m.kind.replace("_", " "), m.location() or "-", axes,
                          f"{m.diameter_mm:.1f}" if m.diameter_mm is not None else "",
                          _volume_cell(m), other])
        t = Table([[p(c, small) for c in r] for r in table], repeatRows=1,
                  colWidths=[12 * mm, 30 * mm, 32 * mm, 26 * mm, 18 * mm, 20 * mm, 32 * mm])
        t.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
                               ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee"))]))
        story.append(t)
        if any(m.edited for m in report.measurements):
            story.append(p("* edited by the reviewing clinician", small))
    story += [Paragraph("Impression", heading), p(report.impression or "-")]
    if report.recommendation:
        story += [Paragraph("Recommendation", heading), p(report.recommendation)]
    if volume is not None:
        images = key_images(report, volume)
        if images:
            story.append(Paragraph("Key images", heading))
            cells = []
            for caption, rgb in images:
                from PIL import Image as PILImage

                buf = io.BytesIO()
                PILImage.fromarray(rgb).save(buf, format="PNG")
                buf.seek(0)
                side = 80 * mm
                cells.append([Image(buf, width=side, height=side * rgb.shape[0] / rgb.shape[1]), p(caption, small)])
            grid = [cells[i:i + 2] for i in range(0, len(cells), 2)]
            grid = [[_stack(c) for c in row] + [""] * (2 - len(row)) for row in grid]
            story.append(Table(grid, colWidths=[85 * mm, 85 * mm]))
    story.append(Paragraph("Sign-off", heading))
    if report.signature is not None:
        sig = report.signature
        story.append(p(f"Signed by {sig.signer.replace('^', ' ')}{', ' + sig.organization if sig.organization else ''}"
                       f" on {sig.signed_at.strftime('%Y-%m-%d %H:%M %Z').strip()}."))
    else:
        story.append(p("Not signed."))
    story.append(p(f"Model: {report.model.id} {report.model.version}"
                   + (f", checkpoint sha256 {report.model.checkpoint_sha256[:16]}" if report.model.checkpoint_sha256
                      else "") + f". Report {report.report_id}, schema {report.schema_version}."
                   + (" De-identified (DICOM PS3.15 Annex E basic profile)." if report.deidentified else ""), small))

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=15 * mm,
                            bottomMargin=15 * mm, title=f"CT chest report {report.status}", author=MANUFACTURER)

    def footer(canvas, doc_):
        canvas.saveState()
        canvas.setFont("Helvetica", 7.5)
        canvas.drawString(18 * mm, 8 * mm, f"{report.status.upper()} - page {doc_.page}"
                          + (" - not for diagnostic use" if report.model.demo else ""))
        canvas.restoreState()

    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()


def _volume_cell(m: Measurement) -> str:
    if m.volume_ml is None:
        return ""
    if m.kind in ("nodule", "calcified_granuloma"):
        return f"{m.volume_ml * 1000:.0f} mm3"  # nodule volumes are read in mm3
    return f"{m.volume_ml:.1f} mL"


def _stack(cell):
    from reportlab.platypus import Table

    return Table([[item] for item in cell])


def _date(yyyymmdd: str) -> str:
    s = (yyyymmdd or "").strip()
    return f"{s[:4]}-{s[4:6]}-{s[6:8]}" if len(s) >= 8 and s[:8].isdigit() else s


def write_pdf(report: CTReport, path: str | Path, *, volume=None, deidentifier=None, header=None) -> Path:
    return _atomic_write(path, render_pdf(report, volume=volume, deidentifier=deidentifier, header=header))


# ----------------------------------------------------------------------------------------------------------- DICOM SR

def _code(value: str, meaning: str, scheme: str = "SCT"):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _finding_sites(m: Measurement):
    from highdicom.sr import FindingSite

    if m.lobe:
        site = _code(*LOBE_CODES[m.lobe])
        side = SIDE_CODES["right" if m.lobe.startswith("R") else "left"]
    else:
        site = _code(*SITE_CODES[m.kind])
        side = SIDE_CODES.get(m.side or "")
    return [FindingSite(anatomic_location=site, laterality=_code(*side) if side else None)]


def _sr_measurements(m: Measurement):
    from highdicom.sr import Measurement as SRMeasurement

    out = []
    for field_name, code, meaning, unit, unit_meaning in QUANTITIES:
        value = getattr(m, field_name)
        if value is None:
            continue
        scheme = PRIVATE_SCHEME if not code.isdigit() else "SCT"
        if field_name == "volume_ml" and m.kind in ("nodule", "calcified_granuloma"):
            value, unit, unit_meaning = value * 1000.0, "mm3", "cubic millimeter"  # nodule volumes read in mm3
        out.append(SRMeasurement(name=_code(code, meaning, scheme), value=float(value),
                                 unit=_code(unit, unit_meaning, "UCUM")))
    return out


def build_sr(report: CTReport, evidence: list, *, deidentifier=None, series_uid: str | None = None,
             sop_uid: str | None = None):
    """Comprehensive 3D SR holding a TID 1500 measurement report plus the Findings and Impression text.

    `evidence`: the source series' datasets (headers are enough); each nodule references the slice through its
    centre. Drafts are UNVERIFIED; signed reports are VERIFIED with the signer as verifying observer. The model is
    the device observer.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not evidence:
        raise ReportError("SR export: evidence expected the source series' DICOM datasets, found none")
    if deidentifier is not None:
        report = _prepare(report, deidentifier, evidence[0])
        evidence = [deidentifier.deidentify_dataset(ds) for ds in evidence]
    studies = {str(getattr(ds, "StudyInstanceUID", "")) for ds in evidence}
    if len(studies) != 1 or (report.study.study_uid and report.study.study_uid not in studies):
        raise ReportError(f"SR export: evidence expected the report's study {report.study.study_uid or '(unset)'}, "
                          f"found StudyInstanceUID(s) {sorted(studies)}")
    by_sop = {str(ds.SOPInstanceUID): ds for ds in evidence}
    model = report.model
    device_uid = model.device_uid or generate_uid(entropy_srcs=[model.id, model.version, model.checkpoint_sha256])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=model.id[:64], manufacturer_name=MANUFACTURER,
            model_name=f"{model.id} {model.version}"[:64]))
    groups = []
    for m in report.measurements:
        tracking = hd.sr.TrackingIdentifier(uid=m.tracking_uid or generate_uid(), identifier=m.label()[:64])
        finding_type = _code(*FINDING_CODES[m.kind])
        source = by_sop.get(m.image_sop_instance_uid)
        if m.kind in ("nodule", "calcified_granuloma") and source is not None and m.center_voxel is not None:
            _, y, x = m.center_voxel
            spacing = [float(v) for v in getattr(source, "PixelSpacing", [1.0, 1.0])]
            radius_px = max((m.long_axis_mm or m.diameter_mm or 2.0) / 2 / spacing[1], 0.5)
            centre = (x + 0.5, y + 0.5)  # SCOORD (column, row); (0, 0) is the outer corner of the first pixel
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
                graphic_data=np.array([centre, (centre[0] + radius_px, centre[1])], dtype=float),
                source_image=hd.sr.SourceImageForRegion(referenced_sop_class_uid=str(source.SOPClassUID),
                                                        referenced_sop_instance_uid=str(source.SOPInstanceUID)))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_region=region, finding_type=finding_type,
                finding_sites=_finding_sites(m), measurements=_sr_measurements(m)))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=finding_type, finding_sites=_finding_sites(m),
                measurements=_sr_measurements(m)))
    measurement_report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("25045-6", "CT unspecified body region", "LN"),
        imaging_measurements=groups or None, title=codes.DCM.ImagingMeasurementReport)
    root = measurement_report[0]
    for name, text in ((codes.SCT.Finding, report.findings.text()), (codes.DCM.Impression, report.impression),
                       (_code("18783-1", "Study recommendation", "LN"), report.recommendation)):
        if text:
            root.ContentSequence.append(hd.sr.TextContentItem(name=name, value=text, relationship_type="CONTAINS"))
    signed = report.signature is not None and report.status in ("final", "amended")
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=root, series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid or generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=signed, is_verified=signed,
        verifying_observer_name=report.signature.signer if signed else None,
        verifying_organization=(report.signature.organization or "Unknown") if signed else None)
    sr.SeriesDescription = "CT report (TID 1500)" + (" - not for diagnostic use" if model.demo else "")
    if signed:
        sr.VerifyingObserverSequence[0].VerificationDateTime = report.signature.signed_at.strftime("%Y%m%d%H%M%S")
    if deidentifier is not None:
        from pipelines.ct.deid import mark_deidentified

        sr.remove_private_tags()
        mark_deidentified(sr, clean_structured_content=True)
    return sr


def write_sr(report: CTReport, path: str | Path, evidence: list, *, deidentifier=None) -> Path:
    sr = build_sr(report, evidence, deidentifier=deidentifier)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return _atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------- FHIR

FHIR_STATUS = {"draft": "preliminary", "final": "final", "amended": "amended"}


def _coding(system: str, code: str, display: str) -> dict:
    return {"system": system, "code": code, "display": display}


def _observation(m: Measurement, status: str) -> dict:
    code, meaning = FINDING_CODES[m.kind]
    components = []
    for field_name, q_code, q_meaning, unit, _ in QUANTITIES:
        value = getattr(m, field_name)
        if value is None:
            continue
        system = SNOMED if q_code.isdigit() else "urn:mmcore:quantity"
        components.append({"code": {"coding": [_coding(system, q_code, q_meaning)], "text": q_meaning},
                           "valueQuantity": {"value": round(float(value), 4), "unit": unit, "system": UCUM,
                                             "code": unit}})
    obs = {"resourceType": "Observation", "id": f"obs-{m.id}", "status": status,
           "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/observation-category", "imaging",
                                            "Imaging")]}],
           "code": {"coding": [_coding(SNOMED, code, meaning)], "text": m.label()},
           "component": components}
    if m.tracking_uid:
        obs["identifier"] = [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{m.tracking_uid}"}]
    if m.lobe:
        obs["bodySite"] = {"coding": [_coding(SNOMED, *LOBE_CODES[m.lobe])], "text": LOBE_NAMES[m.lobe]}
    elif m.side:
        site_code, site = SITE_CODES[m.kind]
        obs["bodySite"] = {"coding": [_coding(SNOMED, site_code, site)], "text": f"{m.side} {site}"}
    if m.edited:
        obs["note"] = [{"text": f"Edited by the reviewing clinician; measured values: {m.measured}"}]
    return obs


def build_fhir(report: CTReport, *, deidentifier=None, header=None, pdf: bytes | None = None):
    """FHIR R4B DiagnosticReport (validated by fhir.resources) with contained Observations for the measurements."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    report = _prepare(report, deidentifier, header)
    status = FHIR_STATUS[report.status]
    observations = [_observation(m, status) for m in report.measurements]
    issued = report.signature.signed_at if report.signature else report.created_at
    if issued.tzinfo is None:
        issued = issued.replace(tzinfo=timezone.utc)
    conclusion = " ".join([f"CRITICAL: {c.message}" for c in report.critical] + [report.impression]).strip()
    narrative = report.narrative() + (f"\nRecommendation: {report.recommendation}" if report.recommendation else "")
    data = {
        "resourceType": "DiagnosticReport", "id": report.report_id, "status": status,
        "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")]}],
        "code": {"coding": [_coding("http://loinc.org", *REPORT_LOINC)], "text": "CT chest report"},
        "subject": {"identifier": {"value": report.patient.id or "unknown"},
                    **({"display": report.patient.name.replace("^", " ")} if report.patient.name else {})},
        "issued": issued.isoformat(),
        "contained": observations,
        "result": [{"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations],
        "conclusion": conclusion or "No conclusion.",
        "presentedForm": [{"contentType": "text/plain", "language": "en",
                           "data": base64.b64encode(narrative.encode()).decode(), "title": "Report text"}],
    }
    if report.study.study_date and len(report.study.study_date) >= 8:
        data["effectiveDateTime"] = _date(report.study.study_date)
    if report.study.study_uid:
        data["imagingStudy"] = [{"identifier": {"system": DICOM_UID_SYSTEM,
                                                "value": f"urn:oid:{report.study.study_uid}"}}]
    if report.study.accession_number:
        data["identifier"] = [{"type": {"text": "Accession number"}, "value": report.study.accession_number}]
    if report.signature is not None:
        data["resultsInterpreter"] = [{"display": report.signature.signer.replace("^", " ")}]
    if pdf is not None:
        data["presentedForm"].append({"contentType": "application/pdf", "data": base64.b64encode(pdf).decode(),
                                      "title": "Report PDF"})
    return DiagnosticReport.model_validate(data)


def write_fhir(report: CTReport, path: str | Path, *, deidentifier=None, header=None, pdf: bytes | None = None) -> Path:
    resource = build_fhir(report, deidentifier=deidentifier, header=header, pdf=pdf)
    return _atomic_write(path, (resource.model_dump_json(indent=2) + "\n").encode())


def read_fhir(path: str | Path):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    return DiagnosticReport.model_validate_json(Path(path).read_text())


# ------------------------------------------------------------------------------------------------------ all at once

def export_all(report: CTReport, *, json_path=None, pdf_path=None, sr_path=None, fhir_path=None, volume=None,
               evidence: list | None = None, deidentifier=None) -> dict[str, Path]:
    """Write each requested export; with a `Deidentifier` every one of them is de-identified the same way."""
    header = evidence[0] if evidence else None
    if deidentifier is not None:
        report = deidentifier.deidentify_report(report, header)
    written = {}
    if json_path:
        written["json"] = write_json(report, json_path)
    if pdf_path:
        written["pdf"] = write_pdf(report, pdf_path, volume=volume)
    if sr_path:
        if not evidence:
            raise ReportError("--sr: the SR needs the source series (evidence datasets), none was given")
        written["sr"] = write_sr(report, sr_path, evidence, deidentifier=deidentifier)
    if fhir_path:
        written["fhir"] = write_fhir(report, fhir_path)
    return written
