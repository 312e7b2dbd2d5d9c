"""DICOM PS3.15 Annex E de-identification: the Basic Application Level Confidentiality Profile (DCM 113100) with
the Retain Longitudinal Temporal Information with Modified Dates option (DCM 113107), for DICOM datasets and for
every report export (JSON, PDF, SR, FHIR).

What happens to each attribute is Table E.1-1, kept below as data (`TABLE_E1_1`, PS3.15 2026c: tag, action, name):
  X remove   Z empty   D non-empty dummy   U UID replaced consistently   K keep
  compound codes (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) resolve by the attribute's type in the IODs we write (CT Image,
  Comprehensive 3D SR): Type 1 -> D, Type 2 -> Z, otherwise X (`resolve_action`).
Dates (DA, DT) that the table lists are shifted back by one whole-day offset per patient instead (option 113107), so
intervals between studies survive; times of day (TM) are left as they are, which a whole-day shift does not change;
the birth date is always emptied. Private tags are removed. UIDs map through a keyed hash, so every series, the
report and its exports of one study stay linked, and the same key gives the same mapping on every run. Free text
(transcripts, narrative) loses the names and identifiers the headers carry, honorific + name patterns, dates and
phone numbers (`scrub_text`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
MODIFIED_DATES_CODE = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")
CLEAN_STRUCTURED_CONTENT_CODE = ("113104", "DCM", "Clean Structured Content Option")
METHOD_TEXT = ["DICOM PS3.15 E.1 Basic Profile", "Modified Dates"]  # LO, 64 characters per value
DUMMY_NAME = "ANONYMOUS^"  # trailing caret: a one-component person name
DUMMY_TEXT = "REMOVED"
SHIFT_DAYS = (365, 3650)  # dates move back between one and ten years, fixed per patient

# Attributes of the IODs we write whose presence is required: Type 1 need a value (compound codes resolve to D),
# Type 2 must stay present but may be empty (resolve to Z). Patient, General Study, CT Image, SR Document General.
TYPE1 = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "ContentDate",
         "ContentTime", "MediaStorageSOPInstanceUID"}
TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
         "ReferringPhysicianName", "StudyID", "ContrastBolusAgent", "Manufacturer"}
PSEUDONYMS = {"PatientID"}  # Z/D resolved to a keyed pseudonym so one patient's studies stay linked



@lru_cache(maxsize=1)
def table() -> dict[str, tuple[str, str]]:
    """Table E.1-1 as {"GGGG,EEEE": (action, name)}; masked groups keep their "xx" (e.g. "60xx,3000")."""
    out = {}
    for line in TABLE_E1_1.strip().splitlines():
        tag, action, name = line.split(None, 2)
        out[tag] = (action, name)
    return out


def _tag_key(group: int, element: int) -> str:
    return f"{group:04X},{element:04X}"


def table_entry(group: int, element: int) -> tuple[str, str] | None:
    """The Table E.1-1 row of a tag, matching repeating groups (50xx curves, 60xx overlays) by mask."""
    rows = table()
    exact = rows.get(_tag_key(group, element))
    if exact is not None:
        return exact
    if 0x5000 <= group <= 0x50FF and group % 2 == 0:
        return rows.get("50xx,xxxx")
    if 0x6000 <= group <= 0x60FF and group % 2 == 0:
        return rows.get(f"60xx,{element:04X}")
    return None


def resolve_action(code: str, keyword: str, vr: str) -> str:
    """One of X, Z, D, U, K, SHIFT for a table code and the attribute it applies to."""
    if vr in ("DA", "DT") and keyword != "PatientBirthDate" and code != "U":
        return "SHIFT"
    if vr == "TM" and keyword != "PatientBirthTime":
        return "K"  # a time of day survives a whole-day shift unchanged (option 113107)
    if code in ("X", "Z", "D", "U", "K", "C"):
        return "D" if code == "C" else code
    if code == "X/Z/U*":
        return "X"  # Type 3 in the IODs we write
    options = code.split("/")
    if keyword in PSEUDONYMS and "D" in options:
        return "D"
    if keyword in TYPE1 and "D" in options:
        return "D"
    if keyword in (TYPE1 | TYPE2) and "Z" in options:
        return "Z"
    return "X" if "X" in options else options[-1]


def _dummy(vr: str):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    if vr == "PN":
        return DUMMY_NAME
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "AE"):
        return DUMMY_TEXT
    if vr == "CS":
        return "REMOVED"
    if vr == "UR":
        return "urn:removed"
    if vr in ("IS", "DS"):
        return "0"
    if vr == "AS":
        return "000Y"
    if vr in ("SS", "US", "SL", "UL", "SV", "UV", "FL", "FD"):
        return 0
    if vr == "AT":
        return 0x00000000
    if vr == "SQ":
        return Sequence([Dataset()])
    if vr in ("DA",):
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    return b"\x00\x00"  # OB, OW, UN and the other binary VRs


@dataclass
class Deidentifier:
    """Keyed, deterministic de-identification shared by one study's datasets and its report exports.

    `key`: secret bytes; the same key maps the same UID, patient and date to the same replacement every time. Keep it
    private (with it, a known original UID can be linked to its replacement). A fresh random key by default.
    """

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    identifiers: set[str] = field(default_factory=set, repr=False)  # names and IDs seen in headers, scrubbed from text

    def _digest(self, *parts: str) -> bytes:
        return hmac.new(self.key, "\x1f".join(parts).encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """Replacement UID under the 2.25 (UUID-derived) root: '2.25.' + a 128-bit integer, at most 44 characters."""
        original = str(original).strip()
        if not original:
            return original
        return "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        return "ANON-" + self._digest("patient", str(patient_id)).hex()[:12].upper()

    def shift_days(self, patient_id: str) -> int:
        lo, hi = SHIFT_DAYS
        return -(lo + int.from_bytes(self._digest("date", str(patient_id))[:4], "big") % (hi - lo))

    def report_id(self, original: str) -> str:
        return str(uuid.UUID(bytes=self._digest("report", original)[:16], version=4))

    # ---- dates
    @staticmethod
    def shift_da(value: str, days: int) -> str:
        value = str(value).strip()
        if not value:
            return value
        try:
            return (datetime.strptime(value[:8], "%Y%m%d").date() + timedelta(days=days)).strftime("%Y%m%d")
        except ValueError:
            return ""  # an unparseable date cannot be shifted, so it is emptied

    @staticmethod
    def shift_dt(value: str, days: int) -> str:
        value = str(value).strip()
        if len(value) < 8:
            return ""
        shifted = Deidentifier.shift_da(value[:8], days)
        return shifted + value[8:] if shifted else ""

    # ---- text
    def remember(self, ds) -> None:
        """Collect names and identifiers from a dataset so `scrub_text` can find them in free text."""
        for elem in ds.iterall():
            if elem.VR == "PN" and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                for v in values:
                    self.identifiers.update(name_parts(str(v)))
            elif elem.keyword in ("PatientID", "AccessionNumber", "OtherPatientIDs", "StudyID") and elem.value:
                self.identifiers.add(str(elem.value))

    def scrub_text(self, text: str | None, extra: set[str] | None = None) -> str | None:
        return scrub_text(text, self.identifiers | (extra or set()))

    # ---- datasets
    def deidentify_dataset(self, ds, *, clean_structured_content: bool = False):
        """A de-identified copy of `ds` (and its file meta); the original is not changed."""
        out = copy.deepcopy(ds)
        self.remember(ds)
        patient_id = str(getattr(ds, "PatientID", "") or "")
        days = self.shift_days(patient_id)
        out.remove_private_tags()
        self._apply(out, patient_id, days, clean_structured_content)
        meta = getattr(out, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self.uid(meta.MediaStorageSOPInstanceUID)
        mark_deidentified(out, clean_structured_content)
        return out

    def _apply(self, ds, patient_id: str, days: int, clean_sc: bool) -> None:
        for elem in list(ds):
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            entry = table_entry(elem.tag.group, elem.tag.element)
            keyword = elem.keyword or ""
            vr = elem.VR
            if entry is None:
                if vr == "SQ":
                    for item in elem.value:
                        self._apply(item, patient_id, days, clean_sc)
                elif clean_sc and keyword == "TextValue" and elem.value:
                    elem.value = self.scrub_text(str(elem.value))
                continue
            code = entry[0]
            action = resolve_action(code, keyword, vr)
            if clean_sc and keyword == "ContentSequence":
                action = "K"  # Clean Structured Content: keep the tree, clean every item in it
            if action == "X":
                del ds[elem.tag]
            elif action == "Z":
                elem.value = [] if vr == "SQ" else None
            elif action == "D":
                if keyword in PSEUDONYMS:
                    elem.value = self.pseudonym(patient_id)
                elif vr == "UI":  # a dummy UID must still be a valid UID: map it like U
                    elem.value = [self.uid(v) for v in elem.value] if elem.VM > 1 else self.uid(elem.value or "0")
                else:
                    elem.value = _dummy(vr)
            elif action == "U":
                if vr == "SQ":
                    for item in elem.value:
                        self._apply(item, patient_id, days, clean_sc)
                elif elem.VM > 1:
                    elem.value = [self.uid(v) for v in elem.value]
                elif elem.value:
                    elem.value = self.uid(elem.value)
            elif action == "SHIFT":
                shift = self.shift_da if vr == "DA" else self.shift_dt
                if elem.VM > 1:
                    elem.value = [shift(v, days) for v in elem.value]
                elif elem.value:
                    elem.value = shift(elem.value, days)
            elif vr == "SQ":  # K: a kept sequence is still cleaned
                for item in elem.value:
                    self._apply(item, patient_id, days, clean_sc)

    # ---- reports
    def deidentify_report(self, report, header=None):
        """A de-identified copy of a `CTReport`: identity emptied or pseudonymised, UIDs mapped, dates shifted,
        free text scrubbed. Pass the slice header the report came from so its names are scrubbed from text too."""
        if header is not None:
            self.remember(header)
        r = report.model_copy(deep=True)
        p, s = r.patient, r.study
        self.identifiers.update(name_parts(p.name))
        self.identifiers.update(x for x in (p.id, s.accession_number) if x)
        for name in (s.referring_physician,):
            self.identifiers.update(name_parts(name))
        days = self.shift_days(p.id)
        p.name, p.id, p.sex, p.age, p.birth_date = "", self.pseudonym(p.id), "", "", ""
        s.study_uid, s.series_uid = self.uid(s.study_uid), self.uid(s.series_uid)
        s.accession_number, s.referring_physician, s.institution = "", "", ""
        s.description, s.series_description = "", ""
        s.study_date = self.shift_da(s.study_date, days)
        r.indication.text = self.scrub_text(r.indication.text)
        if r.indication.transcript is not None:
            r.indication.transcript = self.scrub_text(r.indication.transcript)
        r.comparison = self.scrub_text(r.comparison)
        for system in type(r.findings).model_fields:
            setattr(r.findings, system, self.scrub_text(getattr(r.findings, system)))
        r.impression, r.recommendation = self.scrub_text(r.impression), self.scrub_text(r.recommendation)
        for f in r.flags:
            f.message = self.scrub_text(f.message)
        for c in r.critical:
            c.message = self.scrub_text(c.message)
        for m in r.measurements:
            m.tracking_uid = self.uid(m.tracking_uid)
            m.image_sop_instance_uid = self.uid(m.image_sop_instance_uid)
        r.model.device_uid = self.uid(r.model.device_uid)
        if r.signature is not None:
            r.signature.signer, r.signature.organization = DUMMY_NAME, DUMMY_TEXT  # (0040,A075), (0040,A027): D
            r.signature.signed_at = r.signature.signed_at + timedelta(days=days)
        r.created_at = r.created_at + timedelta(days=days)
        r.report_id = self.report_id(r.report_id)
        r.deidentified = True
        return r


def mark_deidentified(ds, clean_structured_content: bool = False) -> None:
    """Record what was done: PatientIdentityRemoved, DeidentificationMethod(CodeSequence), modified dates."""
    from pydicom.dataset import Dataset

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD_TEXT + (["Clean Structured Content"] if clean_structured_content else [])
    codes = [PROFILE_CODE, MODIFIED_DATES_CODE] + ([CLEAN_STRUCTURED_CONTENT_CODE] if clean_structured_content else [])
    items = []
    for value, scheme, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


_HONORIFIC = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Doctor|Prof|Professor)\.?\s+(?:[A-Z][a-zA-Z'\-]+\s?){1,3}")
_DATES = re.compile(r"\b(?:\d{4}-\d{2}-\d{2}|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}|"
                    r"\d{1,2}\s+(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d{4}|"
                    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d{1,2},?\s+\d{4})\b", re.I)
_PHONE = re.compile(r"(?<!\w)\+?\d[\d\s\-()]{7,}\d\b")
_ID_LABEL = re.compile(r"\b(?:MRN|medical record number|patient id|accession(?: number)?|NHS number|SSN)\s*[:#]?\s*"
                       r"[A-Z0-9\-]{3,}\b", re.I)


# Words a report needs to keep its meaning: a name part equal to one of these is not scrubbed from free text
# (it is still removed from the headers), so a patient called "No" cannot turn "No effusion" into a finding.
REPORT_WORDS = frozenset("""no not none nor without with and or the left right upper middle lower lobe lung lungs
small large mild moderate severe mass nodule heart clear normal free may will""".split())


def name_parts(person_name: str) -> set[str]:
    """Components of a DICOM PN value worth scrubbing from text: three or more characters, not report vocabulary."""
    parts = re.split(r"[\^=\s,]+", person_name or "")
    return {p for p in parts if len(p) >= 3 and p.lower() not in REPORT_WORDS}


def scrub_text(text: str | None, identifiers: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Replace names and identifiers (from headers), honorific + name, labelled IDs, dates and phone numbers."""
    if not text:
        return text
    out = text
    for ident in sorted((i for i in identifiers if i and len(i) >= 2 and i.lower() not in REPORT_WORDS), key=len,
                        reverse=True):
        out = re.sub(rf"(?<![\w]){re.escape(ident)}(?![\w])", "[REDACTED]", out, flags=re.I)
    out = _HONORIFIC.sub("[NAME]", out)
    out = _ID_LABEL.sub("[ID]", out)
    out = _DATES.sub("[DATE]", out)
    out = _PHONE.sub("[PHONE]", out)
    return out

# PS3.15 2026c Table E.1-1, Basic Profile column: tag, action code, attribute name (654 rows).
TABLE_E1_1 = """
0000,1000 X      Affected SOP Instance UID
0000,1001 U      Requested SOP Instance UID
0002,0003 U      Media Storage SOP Instance UID
0004,1511 U      Referenced SOP Instance UID in File
0008,0012 X/D    Instance Creation Date
0008,0013 X/Z/D  Instance Creation Time
0008,0014 U      Instance Creator UID
0008,0015 X      Instance Coercion DateTime
0008,0017 U      Acquisition UID
0008,0018 U      SOP Instance UID
0008,0019 U      Pyramid UID
0008,0020 Z      Study Date
0008,0021 X/D    Series Date
0008,0022 X/Z    Acquisition Date
0008,0023 Z/D    Content Date
0008,0024 X      Overlay Date
0008,0025 X      Curve Date
0008,002A X/Z/D  Acquisition DateTime
0008,0030 Z      Study Time
0008,0031 X/D    Series Time
0008,0032 X/Z    Acquisition Time
0008,0033 Z/D    Content Time
0008,0034 X      Overlay Time
0008,0035 X      Curve Time
0008,0050 Z      Accession Number
0008,0054 X      Retrieve AE Title
0008,0055 X      Station AE Title
0008,0058 U      Failed SOP Instance UID List
0008,0080 X/Z/D  Institution Name
0008,0081 X      Institution Address
0008,0082 X/Z/D  Institution Code Sequence
0008,0090 Z      Referring Physician's Name
0008,0092 X      Referring Physician's Address
0008,0094 X      Referring Physician's Telephone Numbers
0008,0096 X      Referring Physician Identification Sequence
0008,009C Z      Consulting Physician's Name
0008,009D X      Consulting Physician Identification Sequence
0008,0106 D      Context Group Version
0008,0107 D      Context Group Local Version
0008,0201 X      Timezone Offset From UTC
0008,1000 X      Network ID
0008,1010 X/Z/D  Station Name
0008,1030 X      Study Description
0008,103E X      Series Description
0008,1040 X      Institutional Department Name
0008,1041 X      Institutional Department Type Code Sequence
0008,1048 X      Physician(s) of Record
0008,1049 X      Physician(s) of Record Identification Sequence
0008,1050 X      Performing Physician's Name
0008,1052 X      Performing Physician Identification Sequence
0008,1060 X      Name of Physician(s) Reading Study
0008,1062 X      Physician(s) Reading Study Identification Sequence
0008,1070 X/Z/D  Operators' Name
0008,1072 X/D    Operator Identification Sequence
0008,1080 X      Admitting Diagnoses Description
0008,1084 X      Admitting Diagnoses Code Sequence
0008,1088 X      Pyramid Description
0008,1110 X/Z    Referenced Study Sequence
0008,1111 X/Z/D  Referenced Performed Procedure Step Sequence
0008,1120 X      Referenced Patient Sequence
0008,1140 X/Z/U* Referenced Image Sequence
0008,1155 U      Referenced SOP Instance UID
0008,1195 U      Transaction UID
0008,1301 X      Principal Diagnosis Code Sequence
0008,1302 X      Primary Diagnosis Code Sequence
0008,1303 X      Secondary Diagnoses Code Sequence
0008,1304 X      Histological Diagnoses Code Sequence
0008,2111 X      Derivation Description
0008,2112 X/Z/U* Source Image Sequence
0008,3010 U      Irradiation Event UID
0008,4000 X      Identifying Comments
0010,0010 Z      Patient's Name
0010,0011 X      Person Names to Use Sequence
0010,0012 X      Name to Use
0010,0013 X      Name to Use Comment
0010,0014 X      Third Person Pronouns Sequence
0010,0015 X      Pronoun Code Sequence
0010,0016 X      Pronoun Comment
0010,0020 Z/D    Patient ID
0010,0021 X      Issuer of Patient ID
0010,0030 Z      Patient's Birth Date
0010,0032 X      Patient's Birth Time
0010,0040 Z      Patient's Sex
0010,0041 X      Gender Identity Sequence
0010,0042 X      Sex Parameters for Clinical Use Category Comment
0010,0043 X      Sex Parameters for Clinical Use Category Sequence
0010,0044 X      Gender Identity Code Sequence
0010,0045 X      Gender Identity Comment
0010,0046 X      Sex Parameters for Clinical Use Category Code Sequence
0010,0047 X      Sex Parameters for Clinical Use Category Reference
0010,0050 X      Patient's Insurance Plan Code Sequence
0010,0101 X      Patient's Primary Language Code Sequence
0010,0102 X      Patient's Primary Language Modifier Code Sequence
0010,1000 X      Other Patient IDs
0010,1001 X      Other Patient Names
0010,1002 X      Other Patient IDs Sequence
0010,1005 X      Patient's Birth Name
0010,1010 X      Patient's Age
0010,1020 X      Patient's Size
0010,1030 X      Patient's Weight
0010,1040 X      Patient's Address
0010,1050 X      Insurance Plan Identification
0010,1060 X      Patient's Mother's Birth Name
0010,1080 X      Military Rank
0010,1081 X      Branch of Service
0010,1090 X      Medical Record Locator
0010,1100 X      Referenced Patient Photo Sequence
0010,2000 X      Medical Alerts
0010,2110 X      Allergies
0010,2150 X      Country of Residence
0010,2152 X      Region of Residence
0010,2154 X      Patient's Telephone Numbers
0010,2155 X      Patient's Telecom Information
0010,2160 X      Ethnic Group
0010,2161 X      Ethnic Group Code Sequence
0010,2162 X      Ethnic Groups
0010,2180 X      Occupation
0010,21A0 X      Smoking Status
0010,21B0 X      Additional Patient History
0010,21C0 X      Pregnancy Status
0010,21D0 X      Last Menstrual Date
0010,21F0 X      Patient's Religious Preference
0010,2203 X/Z    Patient's Sex Neutered
0010,2297 X      Responsible Person
0010,2299 X      Responsible Organization
0010,4000 X      Patient Comments
0012,0010 D      Clinical Trial Sponsor Name
0012,0020 D      Clinical Trial Protocol ID
0012,0021 Z      Clinical Trial Protocol Name
0012,0022 X      Issuer of Clinical Trial Protocol ID
0012,0023 X      Other Clinical Trial Protocol IDs Sequence
0012,0030 Z      Clinical Trial Site ID
0012,0031 Z      Clinical Trial Site Name
0012,0032 X      Issuer of Clinical Trial Site ID
0012,0040 D      Clinical Trial Subject ID
0012,0041 X      Issuer of Clinical Trial Subject ID
0012,0042 D      Clinical Trial Subject Reading ID
0012,0043 X      Issuer of Clinical Trial Subject Reading ID
0012,0050 Z      Clinical Trial Time Point ID
0012,0051 X      Clinical Trial Time Point Description
0012,0055 X      Issuer of Clinical Trial Time Point ID
0012,0060 Z      Clinical Trial Coordinating Center Name
0012,0071 X      Clinical Trial Series ID
0012,0072 X      Clinical Trial Series Description
0012,0073 X      Issuer of Clinical Trial Series ID
0012,0081 D      Clinical Trial Protocol Ethics Committee Name
0012,0082 X      Clinical Trial Protocol Ethics Committee Approval Number
0012,0086 X      Ethics Committee Approval Effectiveness Start Date
0012,0087 X      Ethics Committee Approval Effectiveness End Date
0014,407C X      Calibration Time
0014,407E X      Calibration Date
0016,002B X      Maker Note
0016,004B X      Device Setting Description
0016,004D X      Camera Owner Name
0016,004E X      Lens Specification
0016,004F X      Lens Make
0016,0050 X      Lens Model
0016,0051 X      Lens Serial Number
0016,0070 X      GPS Version ID
0016,0071 X      GPS Latitude Ref
0016,0072 X      GPS Latitude
0016,0073 X      GPS Longitude Ref
0016,0074 X      GPS Longitude
0016,0075 X      GPS Altitude Ref
0016,0076 X      GPS Altitude
0016,0077 X      GPS Time Stamp
0016,0078 X      GPS Satellites
0016,0079 X      GPS Status
0016,007A X      GPS Measure Mode
0016,007B X      GPS DOP
0016,007C X      GPS Speed Ref
0016,007D X      GPS Speed
0016,007E X      GPS Track Ref
0016,007F X      GPS Track
0016,0080 X      GPS Img Direction Ref
0016,0081 X      GPS Img Direction
0016,0082 X      GPS Map Datum
0016,0083 X      GPS Dest Latitude Ref
0016,0084 X      GPS Dest Latitude
0016,0085 X      GPS Dest Longitude Ref
0016,0086 X      GPS Dest Longitude
0016,0087 X      GPS Dest Bearing Ref
0016,0088 X      GPS Dest Bearing
0016,0089 X      GPS Dest Distance Ref
0016,008A X      GPS Dest Distance
0016,008B X      GPS Processing Method
0016,008C X      GPS Area Information
0016,008D X      GPS Date Stamp
0016,008E X      GPS Differential
0018,0010 Z/D    Contrast/Bolus Agent
0018,0027 X      Intervention Drug Stop Time
0018,0035 X      Intervention Drug Start Time
0018,1000 X/Z/D  Device Serial Number
0018,1002 U      Device UID
0018,1004 X      Plate ID
0018,1005 X      Generator ID
0018,1007 X      Cassette ID
0018,1008 X      Gantry ID
0018,1009 X      Unique Device Identifier
0018,100A X      UDI Sequence
0018,100B U      Manufacturer's Device Class UID
0018,1010 X      Secondary Capture Device ID
0018,1011 X      Hardcopy Creation Device ID
0018,1012 X      Date of Secondary Capture
0018,1014 X      Time of Secondary Capture
0018,1030 X/D    Protocol Name
0018,1042 X      Contrast/Bolus Start Time
0018,1043 X      Contrast/Bolus Stop Time
0018,1072 X      Radiopharmaceutical Start Time
0018,1073 X      Radiopharmaceutical Stop Time
0018,1078 X      Radiopharmaceutical Start DateTime
0018,1079 X      Radiopharmaceutical Stop DateTime
0018,11BB D      Acquisition Field Of View Label
0018,1200 X      Date of Last Calibration
0018,1201 X      Time of Last Calibration
0018,1202 X      DateTime of Last Calibration
0018,1203 Z      Calibration DateTime
0018,1204 X      Date of Manufacture
0018,1205 X      Date of Installation
0018,1400 X/D    Acquisition Device Processing Description
0018,2042 U      Target UID
0018,4000 X      Acquisition Comments
0018,5011 X      Transducer Identification Sequence
0018,700A X/D    Detector ID
0018,700C X/D    Date of Last Detector Calibration
0018,700E X/D    Time of Last Detector Calibration
0018,9074 D      Frame Acquisition DateTime
0018,9151 D      Frame Reference DateTime
0018,9185 X      Respiratory Motion Compensation Technique Description
0018,9367 D      X-Ray Source ID
0018,9369 D      Source Start DateTime
0018,936A D      Source End DateTime
0018,9371 D      X-Ray Detector ID
0018,9373 X      X-Ray Detector Label
0018,937B X      Multi-energy Acquisition Description
0018,937F X      Decomposition Description
0018,9424 X      Acquisition Protocol Description
0018,9516 X/D    Start Acquisition DateTime
0018,9517 X/D    End Acquisition DateTime
0018,9623 D      Functional Sync Pulse
0018,9701 D      Decay Correction DateTime
0018,9804 D      Exclusion Start DateTime
0018,9919 Z/D    Instruction Performed DateTime
0018,9937 X      Requested Series Description
0018,A002 X      Contribution DateTime
0018,A003 X      Contribution Description
0020,000D U      Study Instance UID
0020,000E U      Series Instance UID
0020,0010 Z      Study ID
0020,0027 X      Pyramid Label
0020,0052 U      Frame of Reference UID
0020,0200 U      Synchronization Frame of Reference UID
0020,3401 X      Modifying Device ID
0020,3403 X      Modified Image Date
0020,3405 X      Modified Image Time
0020,3406 X      Modified Image Description
0020,4000 X      Image Comments
0020,9158 X      Frame Comments
0020,9161 U      Concatenation UID
0020,9164 U      Dimension Organization UID
0028,1199 U      Palette Color Lookup Table UID
0028,1214 U      Large Palette Color Lookup Table UID
0028,4000 X      Image Presentation Comments
0032,0012 X      Study ID Issuer
0032,0032 X      Study Verified Date
0032,0033 X      Study Verified Time
0032,0034 X      Study Read Date
0032,0035 X      Study Read Time
0032,1000 X      Scheduled Study Start Date
0032,1001 X      Scheduled Study Start Time
0032,1010 X      Scheduled Study Stop Date
0032,1011 X      Scheduled Study Stop Time
0032,1020 X      Scheduled Study Location
0032,1021 X      Scheduled Study Location AE Title
0032,1030 X      Reason for Study
0032,1032 X      Requesting Physician
0032,1033 X      Requesting Service
0032,1040 X      Study Arrival Date
0032,1041 X      Study Arrival Time
0032,1050 X      Study Completion Date
0032,1051 X      Study Completion Time
0032,1060 X/Z    Requested Procedure Description
0032,1066 X      Reason for Visit
0032,1067 X      Reason for Visit Code Sequence
0032,1070 X      Requested Contrast Agent
0032,4000 X      Study Comments
0034,0001 D      Flow Identifier Sequence
0034,0002 D      Flow Identifier
0034,0005 D      Source Identifier
0034,0007 D      Frame Origin Timestamp
0038,0004 X      Referenced Patient Alias Sequence
0038,0010 X      Admission ID
0038,0011 X      Issuer of Admission ID
0038,0014 X      Issuer of Admission ID Sequence
0038,001A X      Scheduled Admission Date
0038,001B X      Scheduled Admission Time
0038,001C X      Scheduled Discharge Date
0038,001D X      Scheduled Discharge Time
0038,001E X      Scheduled Patient Institution Residence
0038,0020 X      Admitting Date
0038,0021 X      Admitting Time
0038,0030 X      Discharge Date
0038,0032 X      Discharge Time
0038,0040 X      Discharge Diagnosis Description
0038,0050 X      Special Needs
0038,0060 X      Service Episode ID
0038,0061 X      Issuer of Service Episode ID
0038,0062 X      Service Episode Description
0038,0064 X      Issuer of Service Episode ID Sequence
0038,0300 X      Current Patient Location
0038,0400 X      Patient's Institution Residence
0038,0500 X      Patient State
0038,4000 X      Visit Comments
003A,0020 X      Multiplex Group Label
003A,0203 X      Channel Label
003A,020C X      Channel Derivation Description
003A,0310 U      Multiplex Group UID
003A,0314 D      Impedance Measurement DateTime
003A,0329 X      Waveform Filter Description
003A,032B X      Filter Lookup Table Description
0040,0001 X      Scheduled Station AE Title
0040,0002 X      Scheduled Procedure Step Start Date
0040,0003 X      Scheduled Procedure Step Start Time
0040,0004 X      Scheduled Procedure Step End Date
0040,0005 X      Scheduled Procedure Step End Time
0040,0006 X      Scheduled Performing Physician's Name
0040,0007 X      Scheduled Procedure Step Description
0040,0009 X      Scheduled Procedure Step ID
0040,000B X      Scheduled Performing Physician Identification Sequence
0040,0010 X      Scheduled Station Name
0040,0011 X      Scheduled Procedure Step Location
0040,0012 X      Pre-Medication
0040,0241 X      Performed Station AE Title
0040,0242 X      Performed Station Name
0040,0243 X      Performed Location
0040,0244 X      Performed Procedure Step Start Date
0040,0245 X      Performed Procedure Step Start Time
0040,0250 X      Performed Procedure Step End Date
0040,0251 X      Performed Procedure Step End Time
0040,0253 X      Performed Procedure Step ID
0040,0254 X      Performed Procedure Step Description
0040,0275 X      Request Attributes Sequence
0040,0280 X      Comments on the Performed Procedure Step
0040,0310 X      Comments on Radiation Dose
0040,050A X      Specimen Accession Number
0040,0512 D      Container Identifier
0040,0513 Z      Issuer of the Container Identifier Sequence
0040,051A X      Container Description
0040,0551 D      Specimen Identifier
0040,0554 U      Specimen UID
0040,0555 X/Z    Acquisition Context Sequence
0040,0556 X      Acquisition Context Description
0040,0562 Z      Issuer of the Specimen Identifier Sequence
0040,0600 X      Specimen Short Description
0040,0602 X      Specimen Detailed Description
0040,0610 Z      Specimen Preparation Sequence
0040,06FA X      Slide Identifier
0040,1001 X      Requested Procedure ID
0040,1002 X      Reason for the Requested Procedure
0040,1004 X      Patient Transport Arrangements
0040,1005 X      Requested Procedure Location
0040,100A X      Reason for Requested Procedure Code Sequence
0040,1010 X      Names of Intended Recipients of Results
0040,1011 X      Intended Recipients of Results Identification Sequence
0040,1101 D      Person Identification Code Sequence
0040,1102 X      Person's Address
0040,1103 X      Person's Telephone Numbers
0040,1104 X      Person's Telecom Information
0040,1400 X      Requested Procedure Comments
0040,2001 X      Reason for the Imaging Service Request
0040,2004 X      Issue Date of Imaging Service Request
0040,2005 X      Issue Time of Imaging Service Request
0040,2008 X      Order Entered By
0040,2009 X      Order Enterer's Location
0040,2010 X      Order Callback Phone Number
0040,2011 X      Order Callback Telecom Information
0040,2016 Z      Placer Order Number / Imaging Service Request
0040,2017 Z      Filler Order Number / Imaging Service Request
0040,2400 X      Imaging Service Request Comments
0040,3001 X      Confidentiality Constraint on Patient Data Description
0040,4005 X      Scheduled Procedure Step Start DateTime
0040,4008 X      Scheduled Procedure Step Expiration DateTime
0040,4010 X      Scheduled Procedure Step Modification DateTime
0040,4011 X      Expected Completion DateTime
0040,4025 X      Scheduled Station Name Code Sequence
0040,4027 X      Scheduled Station Geographic Location Code Sequence
0040,4028 X      Performed Station Name Code Sequence
0040,4030 X      Performed Station Geographic Location Code Sequence
0040,4034 X      Scheduled Human Performers Sequence
0040,4035 X      Actual Human Performers Sequence
0040,4036 X      Human Performer's Organization
0040,4037 X      Human Performer's Name
0040,4050 X      Performed Procedure Step Start DateTime
0040,4051 X      Performed Procedure Step End DateTime
0040,4052 X      Procedure Step Cancellation DateTime
0040,A023 X      Findings Group Recording Date (Trial)
0040,A024 X      Findings Group Recording Time (Trial)
0040,A027 D      Verifying Organization
0040,A030 D      Verification DateTime
0040,A032 X/D    Observation DateTime
0040,A033 X      Observation Start DateTime
0040,A034 X      Effective Start DateTime
0040,A035 X      Effective Stop DateTime
0040,A073 D      Verifying Observer Sequence
0040,A075 D      Verifying Observer Name
0040,A078 X      Author Observer Sequence
0040,A07A X      Participant Sequence
0040,A07C X      Custodial Organization Sequence
0040,A082 Z      Participation DateTime
0040,A088 Z      Verifying Observer Identification Code Sequence
0040,A110 X      Date of Document or Verbal Transaction (Trial)
0040,A112 X      Time of Document Creation or Verbal Transaction (Trial)
0040,A120 D      DateTime
0040,A121 D      Date
0040,A122 D      Time
0040,A123 D      Person Name
0040,A124 U      UID
0040,A13A D      Referenced DateTime
0040,A171 U      Observation UID
0040,A172 U      Referenced Observation UID (Trial)
0040,A192 X      Observation Date (Trial)
0040,A193 X      Observation Time (Trial)
0040,A307 X      Current Observer (Trial)
0040,A352 X      Verbal Source (Trial)
0040,A353 X      Address (Trial)
0040,A354 X      Telephone Number (Trial)
0040,A358 X      Verbal Source Identifier Code Sequence (Trial)
0040,A402 U      Observation Subject UID (Trial)
0040,A730 D      Content Sequence
0040,B020 X/D    Waveform Annotation Sequence
0040,B034 X      Annotation DateTime
0040,B036 X      Segment Definition DateTime
0040,B03B X      Montage Name
0040,B03F X      Montage Channel Label
0040,DB06 X      Template Version
0040,DB07 X      Template Local Version
0040,DB0C U      Template Extension Organization UID
0040,DB0D U      Template Extension Creator UID
0040,E004 X      HL7 Document Effective Time
0040,E012 X      Display URI
0042,0011 D      Encapsulated Document
0044,0004 X      Approval Status DateTime
0044,000B X      Product Expiration DateTime
0044,0010 X      Substance Administration DateTime
0044,0104 D      Assertion DateTime
0044,0105 X      Assertion Expiration DateTime
0050,001B X      Container Component ID
0050,0020 X      Device Description
0050,0021 X      Long Device Description
0062,0021 U      Tracking UID
0064,0003 U      Source Frame of Reference UID
0068,6226 D      Effective DateTime
0068,6270 D      Information Issue DateTime
006A,0003 D      Annotation Group UID
006A,0005 D      Annotation Group Label
006A,0006 X      Annotation Group Description
0070,0001 D      Graphic Annotation Sequence
0070,0006 D      Unformatted Text Value
0070,0082 X      Presentation Creation Date
0070,0083 X      Presentation Creation Time
0070,0084 Z/D    Content Creator's Name
0070,0086 X      Content Creator's Identification Code Sequence
0070,031A U      Fiducial UID
0070,1101 U      Presentation Display Collection UID
0070,1102 U      Presentation Sequence Collection UID
0072,000A D      Hanging Protocol Creation DateTime
0072,005E D      Selector AE Value
0072,005F D      Selector AS Value
0072,0061 D      Selector DA Value
0072,0063 D      Selector DT Value
0072,0065 D      Selector OB Value
0072,0066 D      Selector LO Value
0072,0068 D      Selector LT Value
0072,006A D      Selector PN Value
0072,006B D      Selector TM Value
0072,006C D      Selector SH Value
0072,006D D      Selector UN Value
0072,006E D      Selector ST Value
0072,0070 D      Selector UT Value
0072,0071 D      Selector UR Value
0074,1234 X      Receiving AE
0074,1236 X      Requesting AE
0088,0140 U      Storage Media File-set UID
0088,0200 X      Icon Image Sequence(see Note 11)
0088,0904 X      Topic Title
0088,0906 X      Topic Subject
0088,0910 X      Topic Author
0088,0912 X      Topic Keywords
0100,0420 X      SOP Authorization DateTime
0400,0100 U      Digital Signature UID
0400,0105 D      Digital Signature DateTime
0400,0115 D      Certificate of Signer
0400,0310 X      Certified Timestamp
0400,0402 X      Referenced Digital Signature Sequence
0400,0403 X      Referenced SOP Instance MAC Sequence
0400,0404 X      MAC
0400,0550 X      Modified Attributes Sequence
0400,0551 X      Nonconforming Modified Attributes Sequence
0400,0552 X      Nonconforming Data Element Value
0400,0561 X      Original Attributes Sequence
0400,0562 D      Attribute Modification DateTime
0400,0563 D      Modifying System
0400,0564 Z      Source of Previous Values
0400,0565 D      Reason for the Attribute Modification
0400,0600 X      Instance Origin Status
2030,0020 X      Text String
2100,0040 X      Creation Date
2100,0050 X      Creation Time
2100,0070 X      Originator
2100,0140 D      Destination AE
2200,0002 X/Z    Label Text
2200,0005 X/Z    Barcode Value
3002,0121 X      Position Acquisition Template Name
3002,0123 X      Position Acquisition Template Description
3006,0002 D      Structure Set Label
3006,0004 X      Structure Set Name
3006,0006 X      Structure Set Description
3006,0008 Z      Structure Set Date
3006,0009 Z      Structure Set Time
3006,0024 U      Referenced Frame of Reference UID
3006,0026 Z      ROI Name
3006,0028 X      ROI Description
3006,002D X      ROI DateTime
3006,002E X      ROI Observation DateTime
3006,0038 X      ROI Generation Description
3006,004D X      ROI Creator Sequence
3006,004E X      ROI Interpreter Sequence
3006,0085 X      ROI Observation Label
3006,0088 X      ROI Observation Description
3006,00A6 Z      ROI Interpreter
3006,00C2 U      Related Frame of Reference UID
3008,0024 D      Treatment Control Point Date
3008,0025 D      Treatment Control Point Time
3008,0054 X/D    First Treatment Date
3008,0056 X/D    Most Recent Treatment Date
3008,0105 X/Z    Source Serial Number
3008,0162 D      Safe Position Exit Date
3008,0164 D      Safe Position Exit Time
3008,0166 D      Safe Position Return Date
3008,0168 D      Safe Position Return Time
3008,0250 X/D    Treatment Date
3008,0251 X/D    Treatment Time
300A,0002 D      RT Plan Label
300A,0003 X      RT Plan Name
300A,0004 X      RT Plan Description
300A,0006 X/D    RT Plan Date
300A,0007 X/D    RT Plan Time
300A,000B X      Treatment Sites
300A,000E X      Prescription Description
300A,0013 U      Dose Reference UID
300A,0016 X      Dose Reference Description
300A,0054 U      Table Top Position Alignment UID
300A,0072 X      Fraction Group Description
300A,0083 U      Referenced Dose Reference UID
300A,00B2 X/Z    Treatment Machine Name
300A,00C3 X      Beam Description
300A,00DD X      Bolus Description
300A,0196 X      Fixation Device Description
300A,01A6 X      Shielding Device Description
300A,01B2 X      Setup Technique Description
300A,0216 X      Source Manufacturer
300A,022C D      Source Strength Reference Date
300A,022E D      Source Strength Reference Time
300A,02EB X      Compensator Description
300A,0608 D      Treatment Position Group Label
300A,0609 U      Treatment Position Group UID
300A,0611 Z      RT Accessory Holder Slot ID
300A,0615 Z      RT Accessory Device Slot ID
300A,0619 D      Radiation Dose Identification Label
300A,0623 D      Radiation Dose In-Vivo Measurement Label
300A,062A D      RT Tolerance Set Label
300A,0650 U      Patient Setup UID
300A,0676 X      Equipment Frame of Reference Description
300A,067C D      Radiation Generation Mode Label
300A,067D Z      Radiation Generation Mode Description
300A,0700 U      Treatment Session UID
300A,0734 D      Treatment Tolerance Violation Description
300A,0736 D      Treatment Tolerance Violation DateTime
300A,073A D      Recorded RT Control Point DateTime
300A,0741 D      Interlock DateTime
300A,0742 D      Interlock Description
300A,0760 D      Override DateTime
300A,0783 D      Interlock Origin Description
300A,0785 U      Referenced Treatment Position Group UID
300A,078E X      Patient Treatment Preparation Procedure Parameter Description
300A,0792 X      Patient Treatment Preparation Method Description
300A,0794 X      Patient Setup Photo Description
300A,079A X      Displacement Reference Label
300C,0113 X      Reason for Omission Description
300C,0127 D      Beam Hold Transition DateTime
300E,0004 Z      Review Date
300E,0005 Z      Review Time
300E,0008 X/Z    Reviewer Name
3010,0006 U      Conceptual Volume UID
3010,000B U      Referenced Conceptual Volume UID
3010,000F Z      Conceptual Volume Combination Description
3010,0013 U      Constituent Conceptual Volume UID
3010,0015 U      Source Conceptual Volume UID
3010,0017 Z      Conceptual Volume Description
3010,001B Z      Device Alternate Identifier
3010,002D D      Device Label
3010,0031 U      Referenced Fiducials UID
3010,0033 D      User Content Label
3010,0034 D      User Content Long Label
3010,0035 D      Entity Label
3010,0036 X      Entity Name
3010,0037 X      Entity Description
3010,0038 D      Entity Long Label
3010,003B U      RT Treatment Phase UID
3010,0043 Z      Manufacturer's Device Identifier
3010,004C X/D    Intended Phase Start Date
3010,004D X/D    Intended Phase End Date
3010,0054 D      RT Prescription Label
3010,0056 X/D    RT Treatment Approach Label
3010,005A Z      RT Physician Intent Narrative
3010,005C Z      Reason for Superseding
3010,0061 X      Prior Treatment Dose Description
3010,006E U      Dosimetric Objective UID
3010,006F U      Referenced Dosimetric Objective UID
3010,0077 X/D    Treatment Site
3010,007A Z      Treatment Technique Notes
3010,007B Z      Prescription Notes
3010,007F Z      Fractionation Notes
3010,0081 Z      Prescription Notes Sequence
3010,0085 X      Intended Fraction Start Time
4000,0010 X      Arbitrary
4000,4000 X      Text Comments
4008,0040 X      Results ID
4008,0042 X      Results ID Issuer
4008,0100 X      Interpretation Recorded Date
4008,0101 X      Interpretation Recorded Time
4008,0102 X      Interpretation Recorder
4008,0108 X      Interpretation Transcription Date
4008,0109 X      Interpretation Transcription Time
4008,010A X      Interpretation Transcriber
4008,010B X      Interpretation Text
4008,010C X      Interpretation Author
4008,0111 X      Interpretation Approver Sequence
4008,0112 X      Interpretation Approval Date
4008,0113 X      Interpretation Approval Time
4008,0114 X      Physician Approving Interpretation
4008,0115 X      Interpretation Diagnosis Description
4008,0118 X      Results Distribution List Sequence
4008,0119 X      Distribution Name
4008,011A X      Distribution Address
4008,0200 X      Interpretation ID
4008,0202 X      Interpretation ID Issuer
4008,0300 X      Impressions
4008,4000 X      Results Comments
50xx,xxxx X      Curve Data
60xx,3000 X      Overlay Data
60xx,4000 X      Overlay Comments
FFFA,FFFA X      Digital Signatures Sequence
FFFC,FFFC X      Data Set Trailing Padding
"""
