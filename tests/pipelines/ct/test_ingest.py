"""Ingest of a small phantom series, clean and corrupted every way uploads go wrong."""

import random
import zipfile

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from pipelines.ct.dicom import ArchiveLimits, extract_zip, ingest, scan
from pipelines.ct.errors import (GeometryError, IngestError, NoDicomError, SeriesSelectionError, ZipBombError,
                                 ZipSlipError)


def test_clean_series_round_trips_exactly(small_series_dir, small_phantom):
    result = ingest(small_series_dir)
    v, truth = result.volume, small_phantom.volume
    assert v.hu.dtype == np.int16 and v.shape == (24, 128, 128)
    assert np.array_equal(v.hu, truth.hu)
    assert v.spacing_zyx == pytest.approx((2.5, 360 / 128, 360 / 128), abs=1e-5)
    assert v.origin_lps == pytest.approx(truth.origin_lps, abs=1e-3)
    assert v.metadata.patient_id == "PH000011" and v.metadata.kvp == 120.0 and v.metadata.contrast is False
    assert v.metadata.series_uid == truth.metadata.series_uid
    assert [s.reason for s in result.skipped] == []
    assert result.warnings == []


def test_info_positions_come_from_ipp_not_thickness(series_copy, edit, files_of):
    # SliceThickness says 5 mm but the positions are 2.5 mm apart: spacing must follow positions.
    edit(files_of(series_copy), lambda ds: setattr(ds, "SliceThickness", 5))
    info = scan(series_copy).to_dict()
    picked = info["picked"]
    assert picked["shape"] == [24, 128, 128]
    assert picked["spacing_mm"][0] == pytest.approx(2.5)
    steps = np.diff(picked["positions_mm"])
    assert np.allclose(steps, 2.5, atol=1e-3)
    assert info["series"][0]["n_files"] == 24 and info["series"][0]["modality"] == "CT"


def test_shuffled_names_and_instance_numbers(series_copy, small_phantom, edit, files_of):
    files = files_of(series_copy)
    rng = random.Random(3)
    numbers = list(range(1, len(files) + 1))
    rng.shuffle(numbers)
    edit(files, lambda ds: setattr(ds, "InstanceNumber", numbers.pop()))
    names = [f"x{rng.random():.8f}.dcm" for _ in files]
    for path, name in zip(files, names):
        path.rename(series_copy / name)
    (series_copy / "sub").mkdir()
    (series_copy / names[0]).rename(series_copy / "sub" / names[0])  # recursive folders too
    assert np.array_equal(ingest(series_copy).volume.hu, small_phantom.volume.hu)


def test_second_series_is_never_mixed_in(series_copy, small_phantom, files_of):
    files = files_of(series_copy)
    uid = generate_uid()
    for i, path in enumerate(files[:30]):  # a derived reformat with more files must lose to ORIGINAL/PRIMARY
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") // 2).astype("<u2").tobytes()
        ds.save_as(series_copy / f"derived{i}.dcm", enforce_file_format=True)
    result = ingest(series_copy)
    assert np.array_equal(result.volume.hu, small_phantom.volume.hu)
    assert any("2 series present" in w and uid in w for w in result.warnings)
    other = ingest(series_copy, series_uid=uid)
    assert other.volume.metadata.series_uid == uid and other.volume.shape[0] == 24
    with pytest.raises(SeriesSelectionError, match="1.2.3.4 not found"):
        scan(series_copy, series_uid="1.2.3.4")


def test_localizer_only_folder_is_rejected(series_copy, edit, files_of):
    edit(files_of(series_copy), lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    with pytest.raises(SeriesSelectionError, match="no CT image series"):
        ingest(series_copy)


def test_missing_rescale_tags_default_with_warning(series_copy, small_phantom, edit, files_of):
    def strip(ds):
        del ds.RescaleSlope, ds.RescaleIntercept

    edit(files_of(series_copy), strip)
    result = ingest(series_copy)
    # Stored values are HU + 1024; without the tags slope 1 / intercept 0 is assumed and said so.
    assert np.array_equal(result.volume.hu, small_phantom.volume.hu + 1024)
    assert any("assumed slope 1 and intercept 0" in w for w in result.warnings)


def test_signed_pixels_without_intercept(series_copy, small_phantom, edit, files_of):
    def signed(ds):
        stored = np.frombuffer(ds.PixelData, "<u2").astype(np.int32) - 1024
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        ds.PixelData = stored.astype("<i2").tobytes()

    edit(files_of(series_copy), signed)
    assert np.array_equal(ingest(series_copy).volume.hu, small_phantom.volume.hu)


def test_small_z_gap_is_resampled_and_reported(series_copy, small_phantom, files_of):
    files = files_of(series_copy)
    files[10].unlink()
    result = ingest(series_copy)
    hu = result.volume.hu
    assert hu.shape == (24, 128, 128)
    assert any("non-uniform slice spacing" in w and "resampled 23 slices onto 24" in w for w in result.warnings)
    truth = small_phantom.volume.hu.astype(np.float32)
    assert np.array_equal(hu[9], small_phantom.volume.hu[9]) and np.array_equal(hu[11], small_phantom.volume.hu[11])
    assert np.abs(hu[10] - (truth[9] + truth[11]) / 2).max() <= 1.0


def test_large_z_gap_is_refused(series_copy, files_of):
    for path in files_of(series_copy)[8:12]:
        path.unlink()
    with pytest.raises(GeometryError, match=r"gap of 12\.50 mm .* refusing to interpolate"):
        ingest(series_copy)


def test_mixed_orientation_is_refused(series_copy, edit, files_of):
    edit(files_of(series_copy)[5:6], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    with pytest.raises(GeometryError, match="mixed slice orientations: 23 slices .* 1 with"):
        ingest(series_copy)


def test_rle_compressed_copy(series_copy, small_phantom, files_of):
    for path in files_of(series_copy):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
    result = ingest(series_copy)
    assert result.volume.metadata.transfer_syntax == RLELossless
    assert np.array_equal(result.volume.hu, small_phantom.volume.hu)


def test_enhanced_multiframe_copy(tmp_path, small_series_dir, small_phantom, files_of):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    datasets = [pydicom.dcmread(p) for p in files_of(small_series_dir)]
    random.Random(1).shuffle(datasets)
    enhanced = LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=generate_uid(), series_number=9,
                                              sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    result = ingest(tmp_path / "enhanced.dcm")
    assert result.volume.shape == (24, 128, 128)
    assert np.array_equal(result.volume.hu, small_phantom.volume.hu)
    assert result.volume.spacing_zyx[0] == pytest.approx(2.5, abs=1e-4)


def test_truncated_file_is_skipped_and_gap_filled(series_copy, files_of):
    files = files_of(series_copy)
    data = files[7].read_bytes()
    files[7].write_bytes(data[: len(data) // 2])
    files[0].write_bytes(files[0].read_bytes()[:200])  # cut inside the header
    result = ingest(series_copy)
    reasons = {p.split("/")[-1]: r for p, r in ((s.path, s.reason) for s in result.skipped)}
    assert reasons[files[7].name].startswith("truncated: pixel data needs 32768 bytes")
    assert files[0].name in reasons
    assert result.volume.shape == (23, 128, 128)  # slice 0 gone (an end), slice 7 interpolated
    assert any("resampled 22 slices onto 23" in w for w in result.warnings)


def test_everything_truncated_is_one_clear_error(series_copy, files_of):
    for path in files_of(series_copy):
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(NoDicomError, match="no DICOM image files among 24 file"):
        ingest(series_copy)


def test_non_dicom_files_are_listed_not_fatal(series_copy, small_phantom):
    (series_copy / "README.txt").write_text("scanner export\n")
    (series_copy / "thumbs.db").write_bytes(np.random.default_rng(0).bytes(4096))
    result = ingest(series_copy)
    assert np.array_equal(result.volume.hu, small_phantom.volume.hu)
    assert sorted(s.path.split("/")[-1] for s in result.skipped) == ["README.txt", "thumbs.db"]
    assert all("not a DICOM file" in s.reason for s in result.skipped)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(NoDicomError, match="no DICOM image files among 1 file"):
        ingest(tmp_path)
    with pytest.raises(IngestError, match="input not found"):
        ingest(tmp_path / "missing")


def test_zip_upload(tmp_path, small_series_dir, small_phantom, files_of):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in files_of(small_series_dir):
            z.write(path, f"patient/series/{path.name}")
        z.writestr("patient/notes.txt", "hello")
    result = ingest(archive)
    assert np.array_equal(result.volume.hu, small_phantom.volume.hu)
    assert [s.path for s in result.skipped] == [f"{archive}!/patient/notes.txt"]


def test_zip_slip_is_refused_before_writing(tmp_path, small_series_dir, files_of):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(files_of(small_series_dir)[0], "ok/first.dcm")
        z.writestr("../../escaped.txt", "pwned")
    with pytest.raises(ZipSlipError, match=r"member '\.\./\.\./escaped\.txt' would be written outside"):
        ingest(archive)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ZipSlipError):
        extract_zip(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path.parent / "escaped.txt").exists()


def test_zip_bomb_is_refused(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.dcm", bytes(30 * 1024 * 1024))
    with pytest.raises(ZipBombError, match=r"member 'zeros\.dcm' expands \d+x \(cap 200x\)"):
        ingest(archive)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as z:
        for i in range(12):
            z.writestr(f"f{i}.dcm", b"x")
    with pytest.raises(ZipBombError, match="12 members exceed the cap of 10"):
        ingest(tmp_path / "many.zip", limits=ArchiveLimits(max_members=10))
    with pytest.raises(ZipBombError, match="declared uncompressed size"):
        ingest(archive, limits=ArchiveLimits(max_total_bytes=1024 * 1024))


def test_every_local_pydicom_test_file_ingests_or_fails_cleanly():
    from pydicom.data import get_testdata_files

    paths = [p for p in get_testdata_files() if not p.endswith((".py", ".pyc"))]
    assert len(paths) > 50
    outcomes = {"ok": 0, "error": 0}
    for path in paths:
        try:
            result = ingest(path)
        except IngestError as exc:
            assert str(exc).strip(), path
            outcomes["error"] += 1
        else:
            assert result.volume.hu.dtype == np.int16 and result.volume.hu.ndim == 3, path
            outcomes["ok"] += 1
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 5
