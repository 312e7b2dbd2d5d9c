from datetime import datetime

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from pipelines.ct.deid import Deidentifier, resolve_action, scrub_text, table, table_entry

FAKE = {"AE": "STATION7", "AS": "063Y", "AT": 0x00100010, "CS": "FAKEVALUE", "DA": "20240115", "DS": "1.5",
        "DT": "20240115103000", "FL": 1.5, "FD": 2.5, "IS": "7", "LO": "Jane Doe Long", "LT": "Seen by Jane Doe",
        "OB": b"\x01\x02", "OD": b"\x01" * 8, "OF": b"\x01" * 4, "OL": b"\x01" * 4, "OV": b"\x01" * 8,
        "OW": b"\x01\x02", "PN": "DOE^JANE", "SH": "DOEJ", "SL": 1, "SS": 1, "ST": "Jane Doe, 1 Main St",
        "SV": 1, "TM": "103000", "UC": "Doe", "UL": 1, "UN": b"\x01\x02", "UR": "http://example.org/jane",
        "US": 1, "UT": "Jane Doe", "UV": 1}


def _concrete_tag(key: str) -> Tag:
    """A real tag for a table row; repeating groups (50xx, 60xx) use their first group."""
    group, element = key.split(",")
    return Tag(int(group.replace("xx", "00"), 16), int(element.replace("xxxx", "3000").replace("xx", "00"), 16))


def _vr(tag: Tag) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return ""
    return vr.split(" or ")[0]


def _fake_value(vr: str):
    if vr == "SQ":
        item = Dataset()
        item.PersonName = "DOE^JOHN"  # (0040,A123) D: must be cleaned inside kept sequences too
        item.CodeValue = "123"
        return Sequence([item])
    return generate_uid() if vr == "UI" else FAKE[vr]


@pytest.fixture()
def identified(study):
    """A phantom slice carrying a full fake identity: every Table E.1-1 attribute pydicom knows, plus private tags."""
    ds = pydicom.dcmread(sorted(study.folder.glob("*.dcm"))[0])
    planted = {}
    for key in table():
        tag = _concrete_tag(key)
        vr = _vr(tag)
        if not vr or tag.group in (0x0000, 0x0002):  # command and file-meta groups do not live in a dataset body
            continue
        if tag not in ds:
            ds.add_new(tag, vr, _fake_value(vr))
        planted[key] = (tag, vr, ds[tag].value)
    ds.add_new(0x00090010, "LO", "ACME PRIVATE")
    ds.add_new(0x00091001, "LO", "Jane Doe secret")
    return ds, planted


def test_table_holds_the_standard_rows():
    rows = table()
    assert len(rows) == 654
    assert {a for a, _ in rows.values()} == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    expected = {"0010,0010": "Z", "0010,0020": "Z/D", "0010,0030": "Z", "0010,1010": "X", "0008,0050": "Z",
                "0020,000D": "U", "0008,0018": "U", "0008,0080": "X/Z/D", "0008,1030": "X", "0040,A075": "D",
                "0040,A730": "D", "0018,1002": "U", "0008,0021": "X/D", "60xx,3000": "X", "50xx,xxxx": "X"}
    assert {k: rows[k][0] for k in expected} == expected
    assert table_entry(0x6002, 0x3000) == ("X", "Overlay Data") and table_entry(0x5010, 0x0005)[0] == "X"
    assert table_entry(0x0028, 0x0010) is None  # Rows: not identifying, not in the table


def test_every_table_attribute_is_handled_per_its_action(identified):
    ds, planted = identified
    deid = Deidentifier(key=b"test-key" * 4)
    days = deid.shift_days(str(ds.PatientID))
    patient_id = str(ds.PatientID)
    out = deid.deidentify_dataset(ds)
    checked = {}
    for key, (tag, vr, before) in planted.items():
        action = resolve_action(table()[key][0], keyword_for_tag(tag), vr)
        checked[action] = checked.get(action, 0) + 1
        where = f"{key} {table()[key][1]} ({action})"
        if action == "X":
            assert tag not in out, where
            continue
        after = out[tag].value
        if action == "Z":
            assert after in (None, "", b"") or (vr == "SQ" and len(after) == 0), where
        elif action == "D":
            assert after not in (None, "", b"") and after != before, where
            if keyword_for_tag(tag) == "PatientID":
                assert after == deid.pseudonym(patient_id)
        elif action == "U":
            assert after == deid.uid(before) and after.startswith("2.25."), where
        elif action == "SHIFT":
            shifted = (datetime.strptime(str(before)[:8], "%Y%m%d") - datetime.strptime(str(after)[:8], "%Y%m%d"))
            assert shifted.days == -days and str(after)[8:] == str(before)[8:], where
        elif action == "K":
            if vr == "SQ":
                for item in after:
                    assert "PersonName" not in item or item.PersonName == "ANONYMOUS^", where
            else:
                assert vr == "TM" and after == before, where
        else:
            raise AssertionError(f"{where}: unexpected action")
    assert sum(checked.values()) > 600 and set(checked) == {"X", "Z", "D", "U", "SHIFT", "K"}
    assert not any(e.tag.is_private for e in out.iterall())
    assert out.PatientIdentityRemoved == "YES" and out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert "DOE" not in str(out.PatientName) and ds.PatientName != out.PatientName  # the original is untouched
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    out.save_as(__import__("io").BytesIO(), enforce_file_format=True)  # still a writable DICOM file


def test_uids_are_consistent_across_the_series_and_dates_shift_together(study):
    deid = Deidentifier(key=b"k" * 32)
    files = sorted(study.folder.glob("*.dcm"))
    before = [pydicom.dcmread(f) for f in files]
    after = [deid.deidentify_dataset(ds) for ds in before]
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(getattr(ds, attr)) for ds in after}) == 1
        assert str(getattr(after[0], attr)) == deid.uid(getattr(before[0], attr)) != getattr(before[0], attr)
    sops = [str(ds.SOPInstanceUID) for ds in after]
    assert len(set(sops)) == len(files) and sops == [deid.uid(ds.SOPInstanceUID) for ds in before]
    offsets = {(datetime.strptime(b.StudyDate, "%Y%m%d") - datetime.strptime(a.StudyDate, "%Y%m%d")).days
               for b, a in zip(before, after)}
    offsets |= {(datetime.strptime(b.ContentDate, "%Y%m%d") - datetime.strptime(a.ContentDate, "%Y%m%d")).days
                for b, a in zip(before, after)}
    assert len(offsets) == 1 and 365 <= offsets.pop() <= 3650
    # Same key, same mapping on another run; another key, another mapping.
    assert Deidentifier(key=b"k" * 32).deidentify_dataset(before[3]).SOPInstanceUID == after[3].SOPInstanceUID
    assert Deidentifier(key=b"x" * 32).deidentify_dataset(before[3]).SOPInstanceUID != after[3].SOPInstanceUID
    assert all(len(str(ds.SOPInstanceUID)) <= 64 for ds in after)


def test_free_text_loses_names_ids_dates_and_phones():
    text = ("Mr. John Smith, MRN: 448812, seen on 2024-03-01 and 3 March 2024; call 555-123-4567. "
            "SAMPLE reports cough. The nodule measures 6 mm.")
    out = scrub_text(text, {"SAMPLE", "CASE7"})
    for secret in ("John", "Smith", "448812", "2024", "555", "SAMPLE"):
        assert secret not in out
    assert out.endswith("[REDACTED] reports cough. The nodule measures 6 mm.")


def test_report_deidentification_matches_the_dataset_mapping(study):
    deid = Deidentifier(key=b"r" * 32)
    report = study.report(transcript=f"History of cough. Patient {study.volume.metadata.patient_name.split('^')[0]} "
                                     "was seen by Dr. Gregory House on 12/03/2024.")
    report.sign("HOUSE^GREGORY", "PPTH")
    header = study.headers[0]
    clean = deid.deidentify_report(report, header)
    ds = deid.deidentify_dataset(header)
    assert clean.study.study_uid == ds.StudyInstanceUID and clean.study.series_uid == ds.SeriesInstanceUID
    assert clean.study.study_date == ds.StudyDate and clean.patient.id == ds.PatientID
    assert clean.patient.name == "" and clean.study.accession_number == "" and clean.deidentified
    family = study.volume.metadata.patient_name.split("^")[0]
    blob = clean.to_json()
    for secret in (family, study.volume.metadata.patient_id, "House", "Gregory", "12/03/2024", report.study.study_uid):
        assert secret not in blob
    assert clean.signature.signer == "ANONYMOUS^"
    assert (report.signature.signed_at - clean.signature.signed_at).days == -deid.shift_days(report.patient.id)
    assert [m.tracking_uid for m in clean.measurements] == [deid.uid(m.tracking_uid) for m in report.measurements]
    assert report.patient.name != "" and report.deidentified is False  # the original is untouched


def test_name_parts_that_are_report_words_do_not_change_the_meaning():
    deid = Deidentifier()
    ds = Dataset()
    ds.PatientName = "NO^LEFT^MARIANNE"
    ds.PatientID = "X1"
    deid.remember(ds)
    out = deid.scrub_text("No left pleural effusion. Marianne reports cough. Patient X1.")
    assert out == "No left pleural effusion. [REDACTED] reports cough. Patient [REDACTED]."
    assert "key" not in repr(deid) and "MARIANNE" not in repr(deid)
