"""`CTReport`: the typed, schema-versioned chest CT report, and a deterministic template writer.

A report carries who and what was scanned (patient, study, accession), why (Indication, with the dictation's
transcript kept verbatim), how (Technique from the DICOM headers), what was found (narrative by organ system, a
measurement table from `pipelines.ct.measure`, Impression, Fleischner follow-up), what must be acted on now (critical
results from configurable rules, shown first), what to double-check (grounding flags, warnings) and who stands behind
it (status draft/final/amended, model id and checkpoint hash, signer and time).

The template writer drafts Findings and Impression from the measurements alone: it is the baseline the report model
is compared with and the fallback when no model is loaded. The narrative it writes is the one `pipelines.ct.grounding`
reads back, so every measured finding is mentioned with its measured size.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.ct.anatomy import LOBE_NAMES
from pipelines.ct.errors import CTError
from pipelines.ct.phantom import FINDING_TYPES  # the finding vocabulary shared with measure and ground truth
from pipelines.ct.reference_report import fleischner

SCHEMA_VERSION = "1.0"
SYSTEMS = ("lungs_airways", "pleura", "heart_pericardium", "mediastinum_lymph_nodes", "bones_chest_wall",
           "upper_abdomen")
SYSTEM_TITLES = {"lungs_airways": "Lungs and airways", "pleura": "Pleura", "heart_pericardium": "Heart and pericardium",
                 "mediastinum_lymph_nodes": "Mediastinum and lymph nodes", "bones_chest_wall": "Bones and chest wall",
                 "upper_abdomen": "Upper abdomen"}
# Size words as in the reference reports (mL): pleural small < 300 <= moderate < 1000 <= large; pericardial 100 / 500.
PLEURAL_SIZE_ML = (300.0, 1000.0)
PERICARDIAL_SIZE_ML = (100.0, 500.0)
NO_LUNGS_ML = 100.0  # less segmented lung than this (both sides, mL) means the lungs are not in the field of view
MAX_LISTED_NODULES = 8  # the template names this many nodules one by one; the rest are summarised by count
# A model-written narrative gets its sizes replaced by the measured values (each change flagged "size_corrected"):
# the measurement is the record, and a clinician sees every correction.
MODEL_SIZE_POLICY = "replace"


class ReportError(CTError):
    """A report cannot be built, parsed or changed as asked (bad JSON, unknown measurement, signing a final)."""


def size_word(volume_ml: float, thresholds: tuple[float, float]) -> str:
    small, large = thresholds
    return "small" if volume_ml < small else "moderate" if volume_ml < large else "large"


# ----------------------------------------------------------------------------------------------------------- schema

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Patient(_Model):
    id: str = ""
    name: str = ""  # DICOM PN form, e.g. "DOE^JANE"
    sex: str = ""
    age: str = ""  # DICOM AS form, e.g. "063Y"
    birth_date: str = ""  # YYYYMMDD


class Study(_Model):
    study_uid: str = ""
    series_uid: str = ""
    accession_number: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS
    description: str = ""
    series_description: str = ""
    referring_physician: str = ""
    institution: str = ""


class Indication(_Model):
    text: str = ""
    transcript: str | None = None  # the dictation exactly as transcribed
    source: Literal["dictation", "request", "none"] = "none"


class Technique(_Model):
    kvp: float | None = None
    slice_thickness_mm: float | None = None
    kernel: str = ""
    contrast: bool | None = None  # None: the headers do not say
    contrast_agent: str = ""
    ctdi_vol_mgy: float | None = None  # (0018,9345) CTDIvol
    dlp_mgy_cm: float | None = None
    dlp_estimated: bool = False  # True: CTDIvol x scanned length, not read from a dose report

    def text(self) -> str:
        if self.contrast is None:
            route = "CT of the chest"
        elif self.contrast:
            agent = f" ({self.contrast_agent})" if self.contrast_agent else ""
            route = "CT of the chest with intravenous contrast" + agent
        else:
            route = "CT of the chest without intravenous contrast"
        parts = [route + "."]
        acq = []
        if self.kvp is not None:
            acq.append(f"{self.kvp:g} kVp")
        if self.slice_thickness_mm is not None:
            acq.append(f"{self.slice_thickness_mm:g} mm slices")
        if self.kernel:
            acq.append(f"{self.kernel} kernel")
        if acq:
            parts.append("Axial reconstructions: " + ", ".join(acq) + ".")
        dose = []
        if self.ctdi_vol_mgy is not None:
            dose.append(f"CTDIvol {self.ctdi_vol_mgy:.1f} mGy")
        if self.dlp_mgy_cm is not None:
            dose.append(f"DLP {self.dlp_mgy_cm:.0f} mGy·cm" + (" (estimated)" if self.dlp_estimated else ""))
        if dose:
            parts.append("Dose: " + ", ".join(dose) + ".")
        return " ".join(parts)


class Measurement(_Model):
    """One row of the measurement table: a finding measured on the images (mm, mL, HU, %)."""

    id: str  # "M1", "M2", ... stable within the report
    type: Literal["nodule", "pleural_effusion", "pericardial_effusion", "emphysema", "consolidation", "cardiomegaly",
                  "calcified_granuloma"]
    side: Literal["right", "left", "bilateral"] | None = None
    lobe: Literal["RUL", "RML", "RLL", "LUL", "LLL"] | None = None
    diameter_mm: float | None = None  # mean of long and short axis
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    volume_ml: float | None = None
    mean_hu: float | None = None
    composition: str | None = None  # solid, part-solid, ground-glass, calcified
    laa950_percent: float | None = None
    cardiothoracic_ratio: float | None = None
    thickness_mm: float | None = None
    center_zyx_mm: list[float] | None = None  # from the centre of voxel (0, 0, 0)
    center_voxel: list[int] | None = None  # (z, y, x) indices into the measured volume
    tracking_uid: str = ""  # DICOM UID that follows this finding into SR and FHIR
    image_sop_instance_uid: str = ""  # the source slice through the centre (for SR image references)
    image_sop_class_uid: str = ""
    edited: bool = False  # True once a clinician changed a value
    measured: dict[str, Any] | None = None  # the values as measured, kept when edited

    @property
    def kind(self) -> str:
        """The finding as a reader names it: a calcified nodule is a granuloma."""
        if self.type == "nodule" and (self.composition or "").lower() == "calcified":
            return "calcified_granuloma"
        return self.type

    def location(self) -> str:
        if self.lobe:
            return LOBE_NAMES[self.lobe]
        return {"bilateral": "both lungs", None: ""}.get(self.side, f"{self.side} side")

    def label(self) -> str:
        """Short description for tables and flag messages, e.g. '7 mm solid nodule, right upper lobe (M1)'."""
        kind = self.kind.replace("_", " ")
        if self.kind in ("nodule", "calcified_granuloma") and self.diameter_mm is not None:
            comp = f"{self.composition} " if self.composition and self.kind == "nodule" else ""
            text = f"{self.diameter_mm:.0f} mm {comp}{kind}"
        elif self.volume_ml is not None and self.kind != "nodule":
            text = f"{kind}, {self.volume_ml:.0f} mL"
        elif self.laa950_percent is not None:
            text = f"{kind}, LAA-950 {self.laa950_percent:.0f}%"
        elif self.cardiothoracic_ratio is not None:
            text = f"{kind}, CTR {self.cardiothoracic_ratio:.2f}"
        else:
            text = kind
        where = self.location()
        if where and self.kind != "pleural_effusion":
            text += f", {where}"
        elif self.side and self.kind == "pleural_effusion":
            text = f"{self.side} {text}"
        return f"{text} ({self.id})"


class Flag(_Model):
    kind: str  # measured_not_mentioned, not_confirmed, size_mismatch, size_corrected, no_lungs, voice_note, ...
    message: str
    measurement_id: str | None = None


class CriticalResult(_Model):
    rule: str
    message: str
    measurement_id: str | None = None


class ModelInfo(_Model):
    id: str = "template"  # "template" = the deterministic writer in this module
    version: str = SCHEMA_VERSION
    checkpoint_sha256: str = ""
    device_uid: str = ""  # DICOM UID of the model as a device observer; changes with every retrain
    demo: bool = True  # trained on synthetic phantoms only: not for diagnostic use


class Signature(_Model):
    signer: str  # DICOM PN form, "FAMILY^GIVEN"
    organization: str = ""
    signed_at: datetime


class Findings(_Model):
    lungs_airways: str = ""
    pleura: str = ""
    heart_pericardium: str = ""
    mediastinum_lymph_nodes: str = ""
    bones_chest_wall: str = ""
    upper_abdomen: str = ""

    def text(self) -> str:
        return "\n".join(f"{SYSTEM_TITLES[s]}: {getattr(self, s)}" for s in SYSTEMS if getattr(self, s))


class CTReport(_Model):
    schema_version: Literal["1.0"] = SCHEMA_VERSION
    report_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    status: Literal["draft", "final", "amended"] = "draft"
    patient: Patient = Field(default_factory=Patient)
    study: Study = Field(default_factory=Study)
    indication: Indication = Field(default_factory=Indication)
    comparison: str = "None."
    technique: Technique = Field(default_factory=Technique)
    critical: list[CriticalResult] = Field(default_factory=list)
    findings: Findings = Field(default_factory=Findings)
    measurements: list[Measurement] = Field(default_factory=list)
    impression: str = ""
    recommendation: str = ""  # Fleischner-style follow-up for nodules
    flags: list[Flag] = Field(default_factory=list)
    model: ModelInfo = Field(default_factory=ModelInfo)
    signature: Signature | None = None
    deidentified: bool = False

    # ---- serialisation
    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "report JSON") -> "CTReport":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, dict):
            raise ReportError(f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReportError(f"{source}: schema_version expected {SCHEMA_VERSION!r}, found {version!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ReportError(f"{source}: field {where}: {first['msg']} (found {first.get('input')!r})") from exc

    # ---- lookups
    def measurement(self, measurement_id: str) -> Measurement:
        for m in self.measurements:
            if m.id == measurement_id:
                return m
        raise ReportError(f"measurement {measurement_id!r}: not in this report "
                          f"(have {', '.join(m.id for m in self.measurements) or 'none'})")

    def narrative(self) -> str:
        return self.findings.text() + ("\nImpression: " + self.impression if self.impression else "")

    # ---- editing and signing
    def edit_measurement(self, measurement_id: str, **values) -> Measurement:
        """Change measured values (a clinician's correction); the original values are kept in `measured`."""
        m = self.measurement(measurement_id)
        editable = {"diameter_mm", "long_axis_mm", "short_axis_mm", "volume_ml", "composition", "side", "lobe",
                    "laa950_percent", "cardiothoracic_ratio", "thickness_mm"}
        bad = sorted(set(values) - editable)
        if bad:
            raise ReportError(f"measurement {measurement_id}: fields {bad} cannot be edited; "
                              f"editable: {sorted(editable)}")
        if self.status != "draft":
            self._reopen()
        original = m.measured or {k: getattr(m, k) for k in editable}
        updated = Measurement.model_validate({**m.model_dump(), **values, "edited": True, "measured": original})
        self.measurements = [updated if x.id == measurement_id else x for x in self.measurements]
        return updated

    def _reopen(self) -> None:
        """Changing a signed report makes it an amendment that needs a new signature."""
        self.status = "amended"
        self.signature = None

    def sign(self, signer: str, organization: str = "", when: datetime | None = None) -> "CTReport":
        if not signer.strip():
            raise ReportError("signer: expected the signing clinician's name, found an empty string")
        if self.status == "final":
            raise ReportError("status: the report is already final; edit it (making an amendment) before signing again")
        if self.status == "amended" and self.signature is not None:
            raise ReportError("status: this amendment is already signed")
        self.signature = Signature(signer=signer, organization=organization,
                                   signed_at=when or datetime.now(timezone.utc))
        if self.status == "draft":
            self.status = "final"
        return self

    def amend(self, **sections) -> "CTReport":
        """Change narrative sections of a signed report (findings=dict, impression=str, ...); it must be re-signed."""
        allowed = {"findings", "impression", "recommendation", "comparison"}
        bad = sorted(set(sections) - allowed)
        if bad:
            raise ReportError(f"amend: sections {bad} cannot be amended; allowed: {sorted(allowed)}")
        if self.status == "draft":
            raise ReportError("status: a draft is edited directly; amendments apply to signed reports")
        self._reopen()
        for key, value in sections.items():
            setattr(self, key, Findings.model_validate({**self.findings.model_dump(), **value})
                    if key == "findings" else value)
        return self


# ----------------------------------------------------------------------------------------------------------- rules

class CriticalRule(_Model):
    """Raise a critical result when a measured `finding` has `field` >= `at_least` (units of that field)."""

    name: str
    finding: Literal["nodule", "pleural_effusion", "pericardial_effusion", "emphysema", "consolidation",
                     "cardiomegaly", "calcified_granuloma"]
    field: Literal["diameter_mm", "long_axis_mm", "volume_ml", "laa950_percent", "cardiothoracic_ratio",
                   "thickness_mm"]
    at_least: float
    message: str  # may use {value} and {where}


DEFAULT_CRITICAL_RULES = [
    CriticalRule(name="large_pericardial_effusion", finding="pericardial_effusion", field="volume_ml",
                 at_least=PERICARDIAL_SIZE_ML[1],
                 message="Large pericardial effusion ({value:.0f} mL): assess for tamponade and notify the referring "
                         "clinician now."),
    CriticalRule(name="large_pleural_effusion", finding="pleural_effusion", field="volume_ml",
                 at_least=PLEURAL_SIZE_ML[1],
                 message="Large {where} pleural effusion ({value:.0f} mL): notify the referring clinician now."),
    CriticalRule(name="lung_mass", finding="nodule", field="long_axis_mm", at_least=30.0,
                 message="Lung mass {value:.0f} mm in the {where} (over 3 cm): suspicious for malignancy; "
                         "communicate directly."),
]


def load_critical_rules(path: str | Path) -> list[CriticalRule]:
    """A JSON list of rule objects (the fields of `CriticalRule`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: critical rules must be a readable JSON list ({exc})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rules, found {type(data).__name__}")
    rules = []
    for i, item in enumerate(data):
        try:
            rules.append(CriticalRule.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{path}: rule {i} field {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    return rules


def critical_results(measurements: list[Measurement], rules: list[CriticalRule]) -> list[CriticalResult]:
    out = []
    for rule in rules:
        for m in measurements:
            value = getattr(m, rule.field)
            if m.kind == rule.finding and value is not None and value >= rule.at_least:
                where = LOBE_NAMES[m.lobe] if m.lobe else (m.side or "")
                out.append(CriticalResult(rule=rule.name, message=rule.message.format(value=value, where=where),
                                          measurement_id=m.id))
    return out


# ----------------------------------------------------------------------------------------------------- measurements

def _as_dict(finding) -> dict:
    if isinstance(finding, dict):
        return finding
    if hasattr(finding, "to_dict"):
        return finding.to_dict()
    raise ReportError(f"measurement: expected a dict or a measure.Finding, found {type(finding).__name__}")


def measurements_from_findings(findings, spacing_zyx: tuple[float, float, float] | None = None,
                               slice_refs: list[tuple[str, str]] | None = None) -> list[Measurement]:
    """Measurement table rows from `measure.Findings`, a list of `measure.Finding`, or ground-truth dicts.

    `spacing_zyx` (mm) turns `center_zyx_mm` into voxel indices when the finding has none; `slice_refs` lists
    (SOPClassUID, SOPInstanceUID) per slice of the measured volume so each row points at its source image.
    """
    from pydicom.uid import generate_uid

    items = findings.findings if hasattr(findings, "findings") else list(findings or [])
    rows = []
    fields = set(Measurement.model_fields) - {"id", "tracking_uid", "image_sop_instance_uid", "image_sop_class_uid",
                                              "edited", "measured"}
    for i, raw in enumerate(items):
        d = _as_dict(raw)
        kind = d.get("type")
        if kind not in FINDING_TYPES:
            raise ReportError(f"measurement {i}: type expected one of {', '.join(FINDING_TYPES)}, found {kind!r}")
        values = {k: d[k] for k in fields if d.get(k) is not None}
        for key in ("diameter_mm", "long_axis_mm", "short_axis_mm", "volume_ml", "mean_hu", "laa950_percent",
                    "cardiothoracic_ratio", "thickness_mm"):
            if key in values:
                value = float(values[key])
                if not math.isfinite(value) or value < 0 and key != "mean_hu":
                    raise ReportError(f"measurement {i} ({kind}): {key} expected a finite value >= 0, found {value}")
                values[key] = value
        if values.get("center_voxel") is None and values.get("center_zyx_mm") is not None and spacing_zyx:
            values["center_voxel"] = [int(round(c / s)) for c, s in zip(values["center_zyx_mm"], spacing_zyx)]
        m = Measurement(id=f"M{i + 1}", tracking_uid=generate_uid(), **values)
        if slice_refs and m.center_voxel is not None and 0 <= m.center_voxel[0] < len(slice_refs):
            m.image_sop_class_uid, m.image_sop_instance_uid = slice_refs[m.center_voxel[0]]
        rows.append(m)
    return rows


# -------------------------------------------------------------------------------------------------- template writer

def _join(lines: list[str]) -> str:
    return " ".join(lines)


def write_narrative(measurements: list[Measurement], lungs_in_view: bool = True,
                    measured: bool = True) -> tuple[Findings, str, str]:
    """Findings by system, Impression (numbered) and follow-up, worded from the measurements alone (deterministic).

    `measured=False` (the measurement step failed) says so instead of calling anything normal.
    """
    if not measured:
        missing = "Not assessed: automated measurement was unavailable for this series."
        findings = Findings(lungs_airways=missing, pleura=missing, heart_pericardium=missing,
                            mediastinum_lymph_nodes=missing, bones_chest_wall=missing, upper_abdomen=missing)
        return findings, "1. No automated assessment; the images need a full read.", ""
    by_kind: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_kind.setdefault(m.kind, []).append(m)
    lungs, pleura, heart, impression = [], [], [], []

    nodules = sorted(by_kind.get("nodule", []), key=lambda m: -(m.diameter_mm or 0))
    for m in nodules[:MAX_LISTED_NODULES]:
        comp = m.composition or "solid"
        axes = (f"{m.long_axis_mm:.0f} x {m.short_axis_mm:.0f} mm, mean " if m.long_axis_mm and m.short_axis_mm else "")
        lungs.append(f"{comp.capitalize()} nodule in the {m.location() or 'lung'} measuring {axes}"
                     f"{m.diameter_mm or 0:.0f} mm ({m.id}).")
    if len(nodules) > MAX_LISTED_NODULES:
        rest = nodules[MAX_LISTED_NODULES:]
        lungs.append(f"{len(rest)} additional smaller nodules, up to {rest[0].diameter_mm or 0:.0f} mm, are listed in "
                     "the measurement table.")
    if nodules:
        n = nodules[0]
        more = f" and {len(nodules) - 1} smaller nodule{'s' if len(nodules) > 2 else ''}" if len(nodules) > 1 else ""
        impression.append(f"{n.diameter_mm or 0:.0f} mm {n.composition or 'solid'} nodule in the "
                          f"{n.location() or 'lung'}{more}.")
    for m in by_kind.get("calcified_granuloma", []):
        lungs.append(f"Calcified granuloma in the {m.location() or 'lung'} ({m.diameter_mm or 0:.0f} mm, {m.id}).")
    for m in by_kind.get("consolidation", []):
        where = m.location() or "lung"
        size = f", about {m.volume_ml:.0f} mL" if m.volume_ml is not None else ""
        lungs.append(f"Consolidation in the {where}{size} ({m.id}).")
        impression.append(f"Consolidation in the {where}, compatible with pneumonia in the appropriate "
                          "clinical setting.")
    for m in by_kind.get("emphysema", []):
        laa = m.laa950_percent or 0.0
        severity = "mild" if laa < 10 else "moderate" if laa < 25 else "severe"
        lungs.append(f"{severity.capitalize()} emphysema, LAA-950 {laa:.0f}% of lung volume ({m.id}).")
        impression.append(f"{severity.capitalize()} emphysema (LAA-950 {laa:.0f}%).")
    if not lungs_in_view:
        lungs = ["The lungs are not included in the field of view; lung findings cannot be assessed."]
    elif not lungs:
        lungs = ["The lungs are clear. No pulmonary nodules are identified."]
    elif not nodules:
        lungs.append("No pulmonary nodules are identified.")

    for m in sorted(by_kind.get("pleural_effusion", []), key=lambda m: m.side or ""):
        size = size_word(m.volume_ml or 0.0, PLEURAL_SIZE_ML)
        lungs_side = m.side or "unspecified side"
        pleura.append(f"{size.capitalize()} {lungs_side} pleural effusion, about {m.volume_ml or 0:.0f} mL ({m.id}).")
        impression.append(f"{size.capitalize()} {lungs_side} pleural effusion (about {m.volume_ml or 0:.0f} mL).")
    if not pleura:
        pleura = ["No pleural effusion."]
    for m in by_kind.get("cardiomegaly", []):
        ctr = f" (cardiothoracic ratio {m.cardiothoracic_ratio:.2f})" if m.cardiothoracic_ratio is not None else ""
        heart.append(f"The heart is enlarged{ctr} ({m.id}).")
        impression.append("Cardiomegaly.")
    peri = by_kind.get("pericardial_effusion", [])
    for m in peri:
        size = size_word(m.volume_ml or 0.0, PERICARDIAL_SIZE_ML)
        heart.append(f"{size.capitalize()} pericardial effusion, about {m.volume_ml or 0:.0f} mL ({m.id}).")
        impression.append(f"{size.capitalize()} pericardial effusion (about {m.volume_ml or 0:.0f} mL).")
    if not heart:
        heart = ["Heart size is normal. No pericardial effusion."]
    elif not peri:
        heart.append("No pericardial effusion.")
    if not impression:
        impression = ["No acute cardiopulmonary abnormality." if lungs_in_view else
                      "Lungs not in the field of view; no other measured abnormality."]

    findings = Findings(
        lungs_airways=_join(lungs), pleura=_join(pleura), heart_pericardium=_join(heart),
        # The measurement module does not assess these systems: say so rather than call them normal.
        mediastinum_lymph_nodes="Not assessed by automated measurement.",
        bones_chest_wall="Not assessed by automated measurement.",
        upper_abdomen="Not assessed by automated measurement.")
    nodule_facts = [{"diameter_mm": m.diameter_mm or 0.0, "composition": m.composition or "solid"} for m in nodules]
    return findings, " ".join(f"{i + 1}. {line}" for i, line in enumerate(impression)), fleischner(nodule_facts)


# ----------------------------------------------------------------------------------------------------------- inputs

def _text(ds, keyword: str) -> str:
    value = getattr(ds, keyword, "") if ds is not None else ""
    return str(value or "").strip()


def _number(ds, keyword: str) -> float | None:
    try:
        value = getattr(ds, keyword, None) if ds is not None else None
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def identity_from(metadata=None, header=None) -> tuple[Patient, Study]:
    """Patient and Study from a `SeriesMetadata` (or its dict) and, when given, a slice header (pydicom Dataset)."""
    meta = metadata if isinstance(metadata, dict) or metadata is None else vars(metadata)
    meta = meta or {}
    patient = Patient(id=_text(header, "PatientID") or meta.get("patient_id", ""),
                      name=_text(header, "PatientName") or meta.get("patient_name", ""),
                      sex=_text(header, "PatientSex") or meta.get("patient_sex", ""),
                      age=_text(header, "PatientAge") or meta.get("patient_age", ""),
                      birth_date=_text(header, "PatientBirthDate"))
    study = Study(study_uid=_text(header, "StudyInstanceUID") or meta.get("study_uid", ""),
                  series_uid=_text(header, "SeriesInstanceUID") or meta.get("series_uid", ""),
                  accession_number=_text(header, "AccessionNumber"),
                  study_date=_text(header, "StudyDate") or meta.get("study_date", ""),
                  study_time=_text(header, "StudyTime"),
                  description=_text(header, "StudyDescription") or meta.get("study_description", ""),
                  series_description=_text(header, "SeriesDescription") or meta.get("series_description", ""),
                  referring_physician=_text(header, "ReferringPhysicianName"),
                  institution=_text(header, "InstitutionName"))
    return patient, study


def technique_from(metadata=None, header=None, scan_length_mm: float | None = None) -> Technique:
    """Technique from DICOM tags: kVp, slice thickness, kernel, contrast agent, CTDIvol; DLP when present.

    CT image headers carry CTDIvol but no DLP; when a scan length is given, DLP is estimated as CTDIvol x length (cm)
    and marked as an estimate.
    """
    meta = metadata if isinstance(metadata, dict) or metadata is None else vars(metadata)
    meta = meta or {}
    kernel = getattr(header, "ConvolutionKernel", None) if header is not None else None
    if kernel is not None and not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    agent = _text(header, "ContrastBolusAgent")
    has_contrast_tag = header is not None and "ContrastBolusAgent" in header
    ctdi = _number(header, "CTDIvol")
    dlp, estimated = None, False
    if ctdi is not None and scan_length_mm:
        dlp, estimated = ctdi * scan_length_mm / 10.0, True
    contrast = bool(agent) if has_contrast_tag else _contrast_from_description(
        _text(header, "StudyDescription") or meta.get("study_description", ""))
    if header is None and contrast is None:
        contrast = meta.get("contrast")
    return Technique(kvp=_number(header, "KVP") if header is not None else meta.get("kvp"),
                     slice_thickness_mm=_number(header, "SliceThickness") if header is not None
                     else meta.get("slice_thickness_mm"),
                     kernel=str(kernel or meta.get("kernel", "") or ""),
                     contrast=contrast,
                     contrast_agent=agent, ctdi_vol_mgy=ctdi, dlp_mgy_cm=dlp, dlp_estimated=estimated)


def _contrast_from_description(description: str) -> bool | None:
    """Contrast from a study description when no Contrast/Bolus tag is present ("CT CHEST WO CONTRAST")."""
    d = description.upper()
    if re.search(r"\b(?:WO|W/O|WITHOUT|NON[- ]?CON(?:TRAST)?|NO CONTRAST)\b", d):
        return False
    if re.search(r"\b(?:W|WITH|W/)\s*(?:IV\s*)?CONTRAST\b|\bCONTRAST[- ]ENHANCED\b|\bCE\b", d):
        return True
    return None


INDICATION_CUES = ("clinical question", "indication", "history of", "reason for", "evaluate", "rule out", "follow-up",
                   "follow up", "looking for", "known", "smoker", "cough", "dyspn", "shortness of breath", "pain")
COMPARISON_CUES = ("compare", "comparison", "prior", "previous")


def indication_from_transcript(transcript: str | None) -> tuple[Indication, str]:
    """Indication (cue sentences of the dictation, transcript kept verbatim) and a Comparison line."""
    if transcript is None or not transcript.strip():
        return Indication(), "None."
    # Split after . ! ? unless the dot ends a title or abbreviation ("Mr. Smith", "e.g. cough").
    abbreviations = "".join(rf"(?<!\b{a})" for a in (r"Mr\.", r"Mrs\.", r"Ms\.", r"Dr\.", r"Prof\.", r"e\.g\.",
                                                       r"i\.e\.", r"vs\.", r"St\."))
    sentences = [s.strip() for s in re.split(abbreviations + r"(?<=[.!?])\s+", transcript.strip()) if s.strip()]
    comparison = [s for s in sentences if any(c in s.lower() for c in COMPARISON_CUES)]
    cues = [s for s in sentences if s not in comparison and any(c in s.lower() for c in INDICATION_CUES)]
    text = " ".join(cues) if cues else " ".join(s for s in sentences if s not in comparison)
    return (Indication(text=text, transcript=transcript, source="dictation"),
            " ".join(comparison) if comparison else "None.")


def transcribe_voice_note(path, transcriber=None, features: bool = False):
    """Decode and transcribe a voice note; a note that cannot be used gives a warning flag, never an exception.

    Returns (transcript text or None, flags, Whisper encoder features (T, d_model) or None); features are computed
    only when asked and the transcriber can encode (they become the report model's audio tokens)."""
    from pipelines.speech.audio import decode_audio
    from pipelines.speech.errors import SpeechError

    name = Path(path).name if isinstance(path, (str, Path)) else "voice note"
    try:
        audio = decode_audio(path)
    except SpeechError as exc:
        return None, [Flag(kind="voice_note", message=f"Voice note not used: {exc}. The indication is empty; "
                                                      "dictate again or type it.")], None
    if transcriber is None:
        return None, [Flag(kind="voice_note", message=f"Voice note {name} ({audio.duration_s:.1f} s) not transcribed: "
                                                      "no speech model is loaded. Type the indication.")], None
    try:
        transcript = transcriber.transcribe(audio)
        encoded = transcriber.encode(audio) if features and hasattr(transcriber, "encode") else None
    except SpeechError as exc:
        return None, [Flag(kind="voice_note", message=f"Voice note not transcribed: {exc}.")], None
    if not transcript.text.strip():
        return None, [Flag(kind="voice_note", message=f"Voice note {name}: no speech recognised in "
                                                      f"{audio.duration_s:.1f} s of audio. Type the indication.")], None
    return transcript.text, [], encoded


# ----------------------------------------------------------------------------------------------------------- assembly

def build_report(findings=None, *, metadata=None, header=None, lung_volume_ml: float | None = None,
                 spacing_zyx: tuple[float, float, float] | None = None, scan_length_mm: float | None = None,
                 slice_refs: list[tuple[str, str]] | None = None, transcript: str | None = None,
                 warnings: list[Flag] | None = None, model: ModelInfo | None = None,
                 narrative: tuple[Findings, str] | None = None, measured: bool = True,
                 critical_rules: list[CriticalRule] | None = None, ground: bool = True,
                 size_policy: Literal["check", "replace"] = "check") -> CTReport:
    """Assemble a draft report; with no `narrative` the template writer drafts it from the measurements.

    `lung_volume_ml` (both lungs) below NO_LUNGS_ML raises a no_lungs warning and the lung section says the lungs were
    not assessed. Grounding (`pipelines.ct.grounding`) then checks the narrative against the measurements.
    """
    measurements = measurements_from_findings(findings, spacing_zyx, slice_refs)
    patient, study = identity_from(metadata, header)
    indication, comparison = indication_from_transcript(transcript)
    flags = list(warnings or [])
    lungs_in_view = lung_volume_ml is None or lung_volume_ml >= NO_LUNGS_ML
    if not lungs_in_view:
        flags.append(Flag(kind="no_lungs", message=f"No lungs in the field of view ({lung_volume_ml:.0f} mL of lung "
                                                   "segmented): lung findings are not assessed. Check that this is "
                                                   "the chest series."))
    drafted, impression, recommendation = write_narrative(measurements, lungs_in_view, measured)
    if narrative is not None:
        lungs_statement = drafted.lungs_airways
        drafted, impression = narrative
        if not lungs_in_view:  # whatever a writer says about lungs that are not in the images is not a finding
            drafted = drafted.model_copy(update={"lungs_airways": lungs_statement})
    report = CTReport(patient=patient, study=study, indication=indication, comparison=comparison,
                      technique=technique_from(metadata, header, scan_length_mm), findings=drafted,
                      measurements=measurements, impression=impression, recommendation=recommendation,
                      critical=critical_results(measurements, DEFAULT_CRITICAL_RULES if critical_rules is None
                                                else critical_rules),
                      flags=flags, model=model or ModelInfo())
    if ground:
        from pipelines.ct.grounding import apply_grounding

        apply_grounding(report, size_policy=size_policy)
    return report


def draft_report(source, *, series_uid: str | None = None, voice=None, transcriber=None,
                 model: ModelInfo | None = None, writer=None, critical_rules: list[CriticalRule] | None = None,
                 stages: dict | None = None):
    """DICOM folder/zip (+ optional voice note) -> (CTReport, IngestResult): ingest, measure, narrative, grounding.

    `writer` (a `pipelines.ct.report_model.ReportModel`) writes the narrative from the volume, the measurements and
    the voice note; without one (or if it fails) the template writer does, and a model failure is flagged. The voice
    note is transcribed on a second thread while the series is ingested and measured. Input errors in the series
    raise (there is nothing to report on); a failed measurement or voice note gives a report with a warning flag.
    `stages`, when given, receives the seconds spent per stage (ingest, measure, voice, encode, generate, ground).
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.ct.dicom import ingest
    from pipelines.ct.measure import measure

    stages = {} if stages is None else stages
    started = time.perf_counter()

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - t0, 4)

    with ThreadPoolExecutor(max_workers=1) as pool:
        voice_job = (pool.submit(timed, "voice", transcribe_voice_note, voice, transcriber, writer is not None)
                     if voice is not None else None)
        result = timed("ingest", ingest, source, series_uid=series_uid)
        volume = result.volume
        warnings = [Flag(kind="ingest", message=w) for w in result.warnings]
        try:
            measured = timed("measure", measure, volume)
            findings, lung_ml, ok = measured.findings, sum(measured.lung_volume_ml.values()), True
        except Exception as exc:  # a measurement failure must not cost the clinician the whole draft
            warnings.append(Flag(kind="measurement", message=f"Automated measurement failed ({type(exc).__name__}: "
                                                             f"{exc}); the report has no measurements."))
            findings, lung_ml, ok = [], None, False
        transcript, features = None, None
        if voice_job is not None:
            transcript, voice_flags, features = voice_job.result()
            warnings += voice_flags
    instances = result.scan.picked.instances
    header = instances[0].header if instances else None
    refs = [(str(getattr(i.header, "SOPClassUID", "")), str(getattr(i.header, "SOPInstanceUID", "")))
            for i in instances] if not result.scan.picked.needs_resampling else None
    length = volume.shape[0] * volume.spacing_zyx[0]
    narrative = None
    if writer is not None:
        narrative, model, model_flags = _model_narrative(writer, volume, findings if ok else None, transcript,
                                                         features, stages, timed)
        warnings += model_flags
    report = timed("ground", build_report, findings, metadata=volume.metadata, header=header, lung_volume_ml=lung_ml,
                   spacing_zyx=volume.spacing_zyx, scan_length_mm=length, slice_refs=refs, transcript=transcript,
                   warnings=warnings, model=model, measured=ok, critical_rules=critical_rules, narrative=narrative,
                   size_policy=MODEL_SIZE_POLICY if narrative is not None else "check")
    stages["total"] = round(time.perf_counter() - started, 4)
    return report, result


def _model_narrative(writer, volume, findings, transcript, features, stages, timed):
    """(narrative or None, ModelInfo, flags): the report model's Findings and Impression. Sections the model left
    out are taken from the template writer and flagged; a model error falls back to the template, flagged."""
    from pipelines.ct.report_model import measurement_dicts, volume_grid

    info = writer.info()
    try:
        grid = timed("encode", volume_grid, volume.hu)
        rows = measurement_dicts(measurements_from_findings(findings, volume.spacing_zyx)) if findings is not None \
            else None
        draft = timed("generate", writer.write_one, grid, rows, transcript, features)
    except Exception as exc:  # the clinician still gets a draft; the flag says which writer produced it
        return None, ModelInfo(), [Flag(kind="model", message=f"Report model {info.id} failed ({type(exc).__name__}: "
                                                              f"{exc}); the template writer drafted this report.")]
    flags = []
    drafted = draft.findings
    if draft.missing_sections:
        template, impression, _ = write_narrative(measurements_from_findings(findings or [], volume.spacing_zyx),
                                                  measured=findings is not None)
        for key in draft.missing_sections:
            field = "impression" if key == "impression" else {"lungs": "lungs_airways", "pleura": "pleura",
                                                                "heart": "heart_pericardium"}[key]
            if field == "impression":
                draft.impression = impression
            else:
                setattr(drafted, field, getattr(template, field))
        flags.append(Flag(kind="model", message=f"The report model left out {', '.join(draft.missing_sections)}; "
                                                "the template writer filled them from the measurements."))
    return (drafted, draft.impression), info, flags
