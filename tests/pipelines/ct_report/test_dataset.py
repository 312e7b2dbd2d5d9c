"""CT-RATE adapter on a tiny fixture in the dataset's exact layout: HU from the metadata rescale, LPS voxel order from
any stored orientation, report text round-trip, skipped studies and per-file errors."""

from __future__ import annotations

import csv
import gzip
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest

from mmcore.errors import InputError
from pipelines.ct.dataset import CTRateDataset, CTRateError, load_volume

SHAPE_ZYX = (16, 20, 24)
# Marker voxels in (z, y, x) LPS voxel order: z inferior->superior, y anterior->posterior, x patient right->left.
RIGHT_ANTERIOR_SUPERIOR = (15, 0, 0)
LEFT_POSTERIOR_INFERIOR = (0, 19, 23)
LABEL_NAMES = ["Medical material", "Arterial wall calcification", "Cardiomegaly"]  # the real file has 18

# Each NIfTI array axis as (axis of the (z, y, x) truth it holds, stored reversed?)
LAYOUT_LPS = [(2, False), (1, False), (0, False)]  # i -> patient left, j -> posterior, k -> superior (dcm2niix-like)
LAYOUT_RAS = [(2, True), (1, True), (0, False)]  # i -> patient right, j -> anterior, k -> superior
LAYOUT_IAR = [(0, True), (1, True), (2, True)]  # axes permuted too: i -> inferior, j -> anterior, k -> right

FINDINGS_1 = 'Nodule of 6 mm, right upper lobe, "stable".\nNo effusion, no consolidation.'
STUDIES = {
    # name: (layout, spacing_zyx mm, origin_lps mm, intercept, metadata ZSpacing)
    "train_1_a_1": (LAYOUT_LPS, (2.0, 0.75, 0.75), (-90.0, -80.0, -300.0), -1024, "2.0"),
    "train_2_a_1": (LAYOUT_RAS, (1.5, 0.8, 0.8), (-95.0, -70.0, -250.0), -8192, "1.5"),
    "train_3_a_2": (LAYOUT_IAR, (3.0, 0.6, 0.6), (-70.0, -60.0, -200.0), -1024, "3.3"),  # ZSpacing 10 % off
}


def truth_stored(intercept: int) -> np.ndarray:
    """Stored values of the true (z, y, x) volume: 40 HU background, 500 HU and -1000 HU markers."""
    stored = np.full(SHAPE_ZYX, 40 - intercept, dtype=np.int16)
    stored[RIGHT_ANTERIOR_SUPERIOR] = 500 - intercept
    stored[LEFT_POSTERIOR_INFERIOR] = -1000 - intercept
    return stored


def write_nifti(path, stored_zyx, spacing_zyx, origin_lps, layout):
    """Store the (z, y, x) truth in `layout`, with the affine worked out by hand (not by nibabel's orientation code)."""
    data = stored_zyx.transpose([axis for axis, _ in layout])
    corner = [0, 0, 0]  # truth index of stored voxel (0, 0, 0)
    for n, (axis, reverse) in enumerate(layout):
        if reverse:
            data = np.flip(data, n)
            corner[axis] = SHAPE_ZYX[axis] - 1
    lps_step = {0: np.array([0, 0, spacing_zyx[0]]), 1: np.array([0, spacing_zyx[1], 0]),
                2: np.array([spacing_zyx[2], 0, 0])}  # mm per truth voxel along z, y, x in LPS
    to_ras = np.array([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    for n, (axis, reverse) in enumerate(layout):
        affine[:3, n] = to_ras * lps_step[axis] * (-1 if reverse else 1)
    affine[:3, 3] = to_ras * (np.array(origin_lps) + sum(corner[a] * lps_step[a] for a in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.ascontiguousarray(data), affine).to_filename(path)


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def metadata_row(name, spacing_zyx, intercept, z_spacing, manufacturer="Philips"):
    xy = f"[{spacing_zyx[1]}, {spacing_zyx[2]}]"  # as in the dataset: "[row, column]" mm
    return [name, manufacturer, "F", "061Y", "B", "20190527", xy, z_spacing, "1", str(intercept)]


METADATA_HEADER = ["VolumeName", "Manufacturer", "PatientSex", "PatientAge", "ConvolutionKernel", "StudyDate",
                   "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct_rate")
    volumes = root / "dataset" / "train_fixed"
    meta = []
    for name, (layout, spacing, origin, intercept, z_spacing) in STUDIES.items():
        patient, study = "_".join(name.split("_")[:2]), "_".join(name.split("_")[:3])
        write_nifti(volumes / patient / study / f"{name}.nii.gz", truth_stored(intercept), spacing, origin, layout)
        maker = "SIEMENS" if intercept == -8192 else "Philips"
        meta.append(metadata_row(name, spacing, intercept, z_spacing, maker))
    # train_4: volume and report, no metadata row; train_5: corrupt file; train_8: volume without a report row
    write_nifti(volumes / "train_4" / "train_4_a" / "train_4_a_1.nii.gz", truth_stored(-1024), (1, 1, 1), (0, 0, 0),
                LAYOUT_LPS)
    good = (volumes / "train_1" / "train_1_a" / "train_1_a_1.nii.gz").read_bytes()
    (volumes / "train_5" / "train_5_a").mkdir(parents=True)
    (volumes / "train_5" / "train_5_a" / "train_5_a_1.nii.gz").write_bytes(good[: len(good) // 2])
    meta.append(metadata_row("train_5_a_1", (2.0, 0.75, 0.75), -1024, "2.0"))
    write_nifti(volumes / "train_8" / "train_8_a" / "train_8_a_1.nii.gz", truth_stored(-1024), (1, 1, 1), (0, 0, 0),
                LAYOUT_LPS)
    write_csv(root / "metadata" / "train_metadata.csv", METADATA_HEADER, meta)

    # VolumeName appears with and without the .nii.gz suffix in the released CSVs
    reports = [["train_1_a_1", FINDINGS_1, "Small nodule, follow up.", "Cough, 3 weeks", "Non-contrast"],
               ["train_2_a_1.nii.gz", "Normal lungs.", "No acute findings.", "", ""],
               ["train_3_a_2", "Emphysema.", "Emphysema, mild.", "", ""],
               ["train_4_a_1", "Normal.", "Normal.", "", ""],
               ["train_5_a_1", "Normal.", "Normal.", "", ""],
               ["train_9_a_1", "Report without a volume.", "None.", "", ""]]
    write_csv(root / "radiology_text_reports" / "train_reports.csv",
              ["VolumeName", "Findings_EN", "Impressions_EN", "ClinicalInformation_EN", "Technique_EN"], reports)
    write_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", ["VolumeName"] + LABEL_NAMES,
              [["train_1_a_1", 0, 0, 1], ["train_2_a_1", 1, 0, 0]])

    # valid split: other folder and CSV names (valid_fixed, validation_*.csv), no labels file
    write_nifti(root / "dataset" / "valid_fixed" / "valid_7" / "valid_7_a" / "valid_7_a_1.nii.gz",
                truth_stored(-1024), (2.0, 0.75, 0.75), (0, 0, 0), LAYOUT_RAS)
    write_csv(root / "metadata" / "validation_metadata.csv", METADATA_HEADER,
              [metadata_row("valid_7_a_1", (2.0, 0.75, 0.75), -1024, "2.0")])
    write_csv(root / "radiology_text_reports" / "validation_reports.csv", ["VolumeName", "Findings_EN",
              "Impressions_EN"], [["valid_7_a_1", "Clear lungs.", "Normal chest CT."]])
    return root


@pytest.fixture(scope="module")
def dataset(root):
    return CTRateDataset(root, "train")


def test_index_pairs_volumes_with_reports_and_lists_the_rest(dataset):
    assert dataset.names == ["train_1_a_1", "train_2_a_1", "train_3_a_2", "train_4_a_1", "train_5_a_1"]
    assert len(dataset) == 5 and dataset[2].name == "train_3_a_2"
    skipped = {s.name: s.reason for s in dataset.skipped}
    assert set(skipped) == {"train_8_a_1", "train_9_a_1"}
    assert "no row in the reports CSV" in skipped["train_8_a_1"] and "train_8_a_1.nii.gz" in skipped["train_8_a_1"]
    assert "no train_9_a_1.nii.gz" in skipped["train_9_a_1"]


def test_report_text_and_labels_round_trip(dataset):
    first = dataset[0]
    assert first.findings == FINDINGS_1  # quoted comma, quotes and newline intact
    assert first.impression == "Small nodule, follow up."
    assert first.indication == "Cough, 3 weeks"
    assert first.labels == {"Medical material": False, "Arterial wall calcification": False, "Cardiomegaly": True}
    assert dataset[1].labels["Medical material"] is True and dataset[1].indication == ""
    assert dataset[2].labels is None  # no row in the labels CSV
    assert first.path.name == "train_1_a_1.nii.gz"


@pytest.mark.parametrize("name", list(STUDIES))
def test_volume_is_hu_in_lps_voxel_order(dataset, name):
    _, spacing, origin, intercept, _ = STUDIES[name]
    study = dataset[dataset.names.index(name)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = study.load()
    expected = ["z spacing 3 mm in the NIfTI header, 3.3 mm in the metadata CSV"] if name == "train_3_a_2" else []
    assert [m for m in expected if any(m in str(w.message) for w in caught)] == expected
    assert len(caught) == len(expected)
    assert volume.hu.dtype == np.int16 and volume.shape == SHAPE_ZYX
    assert volume.hu[RIGHT_ANTERIOR_SUPERIOR] == 500  # stored 500 - intercept maps back exactly
    assert volume.hu[LEFT_POSTERIOR_INFERIOR] == -1000
    assert volume.hu[5, 5, 5] == 40 and (volume.hu == 40).sum() == volume.hu.size - 2
    assert volume.spacing_zyx == pytest.approx(spacing)
    assert volume.origin_lps == pytest.approx(origin)
    np.testing.assert_allclose(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-9)
    # the marker's LPS position: right (small x), anterior (small y), superior (large z)
    assert volume.voxel_to_lps(RIGHT_ANTERIOR_SUPERIOR) == pytest.approx(
        (origin[0], origin[1], origin[2] + 15 * spacing[0]))
    assert volume.metadata.manufacturer == ("SIEMENS" if intercept == -8192 else "Philips")
    assert (volume.metadata.patient_sex, volume.metadata.patient_age) == ("F", "061Y")
    assert (volume.metadata.kernel, volume.metadata.study_date) == ("B", "20190527")
    assert volume.metadata.patient_id == "_".join(name.split("_")[:2])


def test_rescale_clips_to_int16(tmp_path):
    stored = truth_stored(-1024)
    stored[0, 0, 0] = -32768  # -32768 + (-1024) is below int16
    path = tmp_path / "train_6_a_1.nii.gz"
    write_nifti(path, stored, (1.0, 1.0, 1.0), (0, 0, 0), LAYOUT_LPS)
    volume = load_volume(path, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})
    assert volume.hu[0, 0, 0] == -32768 and volume.hu[1, 1, 1] == 40


def test_bad_volumes_raise_naming_the_file_and_iteration_continues(dataset):
    with pytest.raises(CTRateError, match=r"train_4_a_1\.nii\.gz: volume train_4_a_1 has no row in the metadata CSV"):
        dataset[3].load()
    with pytest.raises(CTRateError, match=r"train_5_a_1\.nii\.gz: cannot read as NIfTI"):
        dataset[4].load()
    with pytest.warns(UserWarning):  # train_3's ZSpacing mismatch
        loaded = [study.name for study, _ in dataset.iter_volumes()]
    assert loaded == ["train_1_a_1", "train_2_a_1", "train_3_a_2"]
    assert [f.name for f in dataset.failed] == ["train_4_a_1", "train_5_a_1"]
    assert "metadata CSV" in dataset.failed[0].reason and "NIfTI" in dataset.failed[1].reason


def test_bad_rescale_header_scaling_affine_or_bytes_are_errors(tmp_path):
    path = tmp_path / "train_6_a_1.nii.gz"
    write_nifti(path, truth_stored(-1024), (1.0, 1.0, 1.0), (0, 0, 0), LAYOUT_LPS)
    with pytest.raises(CTRateError, match=r"train_6_a_1 has RescaleIntercept=''; expected a number"):
        load_volume(path, {"RescaleSlope": "1", "RescaleIntercept": ""})
    plain = tmp_path / "plain.nii"
    write_nifti(plain, truth_stored(-1024), (1.0, 1.0, 1.0), (0, 0, 0), LAYOUT_LPS)
    header = bytearray(plain.read_bytes())
    header[112:120] = struct.pack("<ff", 1.0, -1024.0)  # NIfTI-1 scl_slope, scl_inter (bytes 112-119)
    scaled = tmp_path / "scaled.nii.gz"
    scaled.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(CTRateError, match=r"scaled\.nii\.gz: NIfTI header carries its own scaling"):
        load_volume(scaled, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})
    header[112:120] = struct.pack("<ff", float("nan"), float("nan"))
    header[252:256] = struct.pack("<hh", 0, 1)  # qform_code 0, sform_code 1: the sform rows are the affine
    header[312:328] = struct.pack("<4f", 0, 0, 0, 0)  # srow_z: no patient direction for k
    flat = tmp_path / "flat.nii.gz"
    flat.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(CTRateError, match=r"flat\.nii\.gz: affine .* expected a non-degenerate orientation"):
        load_volume(flat, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(CTRateError, match=r"garbage\.nii\.gz: cannot read as NIfTI"):
        load_volume(garbage, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})


def test_valid_split_uses_its_own_file_names(root):
    valid = CTRateDataset(root, "valid")
    assert valid.names == ["valid_7_a_1"] and valid.skipped == [] and valid[0].labels is None
    volume = valid[0].load()
    assert volume.hu[RIGHT_ANTERIOR_SUPERIOR] == 500 and volume.spacing_zyx == pytest.approx((2.0, 0.75, 0.75))


def test_layout_errors_name_the_missing_path(root, tmp_path):
    assert issubclass(CTRateError, InputError)
    with pytest.raises(CTRateError, match=r"validation_reports\.csv: not found; expected the reports CSV"):
        (tmp_path / "dataset" / "valid_fixed").mkdir(parents=True)
        CTRateDataset(tmp_path, "valid")
    with pytest.raises(CTRateError, match=r"train_fixed: not found; expected the train volumes folder"):
        CTRateDataset(tmp_path, "train")
    with pytest.raises(CTRateError, match=r"split: expected one of train, valid, found 'test'"):
        CTRateDataset(root, "test")
    bad = tmp_path / "bad"
    (bad / "dataset" / "train_fixed").mkdir(parents=True)
    write_csv(bad / "radiology_text_reports" / "train_reports.csv", ["VolumeName", "Findings"], [["x", "y"]])
    with pytest.raises(CTRateError, match=r"train_reports\.csv: missing column\(s\) Findings_EN, Impressions_EN"):
        CTRateDataset(bad, "train")


def test_ct_report_recipe_trains_on_the_ct_rate_layout(root, tmp_path):
    """`mmcore train ct-report --data ROOT`: readable studies become cases (unreadable ones are skipped), the
    radiologist's findings are routed into the target sections, and a checkpoint is written."""
    import json

    import pipelines.ct.train  # noqa: F401  (registers the recipe)
    from mmcore.train import get_recipe, run_recipe
    from pipelines.ct.train import ctrate_cases

    cases = ctrate_cases(str(root), tmp_path / "cache")
    assert len(cases) == 3  # train_1, train_2, train_3; train_4 (no metadata) and train_5 (corrupt) skipped
    targets = sorted(case["target"] for _, case in cases)
    assert any(t.startswith("lungs: Emphysema. |") and t.endswith("impression: Emphysema, mild.") for t in targets)
    assert all(grid.shape == (2, 64, 64, 64) for grid, _ in cases)  # (channels, *GRID)
    recipe = get_recipe("ct-report", data=str(root), cache=str(tmp_path / "cache"), eval_phantoms="0", audio="0")
    run_recipe(recipe, tmp_path / "run", steps=2, batch_size=2, progress=False)
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert card["synthetic"] is False and str(root) in card["training_data"] and card["steps"] == 2
    assert config["extra"]["task"] == "ct-report"
