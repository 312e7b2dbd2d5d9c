"""CT-RATE (Hamamci et al., HF `ibrahimhamamci/CT-RATE`) as report-generation training pairs: volume + report text.

Layout under ROOT (split "train" or "valid"):

    dataset/{train,valid}_fixed/<patient>/<study>/<VolumeName>.nii.gz   e.g. train_12_a_1 = split_patient_scan_recon
    radiology_text_reports/{train,validation}_reports.csv               VolumeName, Findings_EN, Impressions_EN, ...
    metadata/{train,validation}_metadata.csv                            VolumeName, RescaleSlope, RescaleIntercept, ...
    multi_abnormality_labels/{train,valid}_predicted_labels.csv         optional: VolumeName + 18 binary columns

The NIfTI volumes hold stored values, not HU: HU = stored * RescaleSlope + RescaleIntercept from the metadata row
(intercept -1024, or -8192 on Siemens go.All). Volumes come back as our `Volume` in DICOM LPS voxel order, the same
as DICOM ingest gives, so the report model sees one orientation whatever the source.
"""

from __future__ import annotations

import csv
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from pipelines.ct.errors import CTError
from pipelines.ct.volume import SeriesMetadata, Volume

# split -> (volume folder, CSV prefix of reports and metadata, labels file): the dataset spells "valid" two ways
SPLITS = {
    "train": ("train_fixed", "train", "train_predicted_labels.csv"),
    "valid": ("valid_fixed", "validation", "valid_predicted_labels.csv"),
}
REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
SPACING_TOLERANCE = 0.01  # relative header-vs-metadata spacing difference that earns a warning
# Array axes (z, y, x) increase towards Superior, Posterior, patient Left: nibabel axis codes of DICOM LPS voxel order
LPS_VOXEL_AXCODES = ("S", "P", "L")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world coordinates are RAS+, ours LPS+


class CTRateError(CTError):
    """The CT-RATE folder, one of its CSVs or one of its volumes is missing or unreadable."""


@dataclass
class SkippedStudy:
    name: str  # VolumeName
    reason: str


@dataclass
class CTRateStudy:
    name: str  # VolumeName, e.g. "train_12_a_1"
    path: Path | None  # the .nii.gz file
    findings: str
    impression: str
    indication: str = ""  # ClinicalInformation_EN when the reports CSV has it
    labels: dict[str, bool] | None = None  # the 18 predicted abnormality labels, None without a labels row
    metadata: dict[str, str] | None = None  # the metadata CSV row, None when the volume has none

    def load(self) -> Volume:
        return load_volume(self.path, self.metadata, name=self.name)


def load_volume(path: Path, metadata: dict[str, str] | None, *, name: str | None = None) -> Volume:
    """One CT-RATE NIfTI as an int16 HU Volume (z, y, x) in LPS voxel order; `metadata` is its metadata CSV row."""
    path = Path(path)
    name = name or path.name.removesuffix(".nii.gz")
    slope, intercept = _rescale(metadata, name, path)
    try:
        image = nib.load(path)
        header_scaling = (float(image.dataobj.slope), float(image.dataobj.inter))  # nibabel moves them off the header
        stored = np.asanyarray(image.dataobj.get_unscaled())
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as exc:
        raise CTRateError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    if header_scaling != (1.0, 0.0):
        # The metadata rescale applies to stored values; a header that scales them too would make HU ambiguous.
        raise CTRateError(f"{path}: NIfTI header carries its own scaling (scl_slope, scl_inter) = {header_scaling}; "
                          f"expected none, since HU come from RescaleSlope/RescaleIntercept in the metadata CSV")
    if stored.ndim == 4 and stored.shape[3] == 1:
        stored = stored[..., 0]
    if stored.ndim != 3:
        raise CTRateError(f"{path}: expected a 3-D volume, found shape {stored.shape}")

    hu = np.rint(stored.astype(np.float32) * slope + intercept)
    hu = np.clip(hu, -32768, 32767).astype(np.int16)

    # Reorder the stored axes into (z, y, x) = (S, P, L) from the affine, and carry the affine along with them.
    stored_axes = io_orientation(image.affine)
    if np.isnan(stored_axes).any():
        raise CTRateError(f"{path}: affine {image.affine[:3].tolist()} does not map the voxel axes to distinct "
                          f"patient directions; expected a non-degenerate orientation")
    to_lps_voxels = ornt_transform(stored_axes, axcodes2ornt(LPS_VOXEL_AXCODES))
    affine = image.affine @ inv_ornt_aff(to_lps_voxels, stored.shape)
    hu = np.ascontiguousarray(apply_orientation(hu, to_lps_voxels))
    zooms = image.header.get_zooms()[:3]
    spacing = [0.0, 0.0, 0.0]
    for source_axis, (target_axis, _flip) in enumerate(to_lps_voxels):
        spacing[int(target_axis)] = float(zooms[source_axis])
    axes_lps = RAS_TO_LPS @ affine[:3, :3]  # columns: mm step per voxel along z, y, x
    direction = (axes_lps / np.linalg.norm(axes_lps, axis=0)).T  # rows: unit vectors of z, y, x

    _check_spacing(spacing, metadata, path)
    return Volume(hu=hu, spacing_zyx=tuple(spacing), origin_lps=tuple(RAS_TO_LPS @ affine[:3, 3]),
                  direction=direction, metadata=series_metadata(name, metadata))


def series_metadata(name: str, row: dict[str, str] | None) -> SeriesMetadata:
    row = row or {}
    patient = "_".join(name.split("_")[:2])  # split_patientID: the dataset's only patient identity
    return SeriesMetadata(
        patient_id=patient, patient_sex=row.get("PatientSex", ""), patient_age=row.get("PatientAge", ""),
        series_description=row.get("SeriesDescription", ""), study_date=row.get("StudyDate", ""),
        manufacturer=row.get("Manufacturer", ""), kernel=row.get("ConvolutionKernel", ""))


def _rescale(row: dict[str, str] | None, name: str, path: Path) -> tuple[float, float]:
    if row is None:
        raise CTRateError(f"{path}: volume {name} has no row in the metadata CSV; expected RescaleSlope and "
                          f"RescaleIntercept for it (stored values are not HU)")
    values = []
    for column in ("RescaleSlope", "RescaleIntercept"):
        try:
            value = float(row.get(column, ""))
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise CTRateError(f"{path}: metadata row of volume {name} has {column}={row.get(column, '')!r}; "
                              f"expected a number")
        values.append(value)
    return values[0], values[1]


def _check_spacing(spacing_zyx: list[float], row: dict[str, str], path: Path) -> None:
    """Warn when the NIfTI header spacing and the metadata CSV (XYSpacing = [row, column] mm, ZSpacing) disagree."""
    xy = [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", row.get("XYSpacing", ""))]
    try:
        z = [float(row.get("ZSpacing", ""))]
    except ValueError:
        z = []
    if len(xy) != 2 or len(z) != 1:
        return  # nothing to compare with
    for axis, header, listed in zip("zyx", spacing_zyx, z + xy):
        if abs(header - listed) > SPACING_TOLERANCE * listed:
            warnings.warn(f"{path}: {axis} spacing {header:g} mm in the NIfTI header, {listed:g} mm in the "
                          f"metadata CSV; using the header", stacklevel=3)


def _read_csv(path: Path, required: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Rows keyed by VolumeName (first row wins); quoted fields may hold commas, quotes and newlines."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise CTRateError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
            rows: dict[str, dict[str, str]] = {}
            for row in reader:
                rows.setdefault(row["VolumeName"].strip().removesuffix(".nii.gz"),
                                {k: (v or "").strip() for k, v in row.items() if k is not None})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CTRateError(f"{path}: cannot read CSV ({exc})") from None


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CTRateError(f"{path}: not found; expected {what} (CT-RATE layout)")
    return path


class CTRateDataset:
    """The studies of one split that have both a volume and a report, in VolumeName order."""

    def __init__(self, root, split: str = "train"):
        if split not in SPLITS:
            raise CTRateError(f"split: expected one of {', '.join(SPLITS)}, found {split!r}")
        folder, prefix, labels_file = SPLITS[split]
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise CTRateError(f"{self.root}: not a folder; expected the CT-RATE root "
                              f"(dataset/, radiology_text_reports/, metadata/)")
        volume_dir = _require(self.root / "dataset" / folder, f"the {split} volumes folder <patient>/<study>/*.nii.gz")
        reports = _read_csv(_require(self.root / "radiology_text_reports" / f"{prefix}_reports.csv",
                                     "the reports CSV"), REPORT_COLUMNS)
        metadata = _read_csv(_require(self.root / "metadata" / f"{prefix}_metadata.csv", "the metadata CSV"),
                             ("VolumeName",))
        labels_path = self.root / "multi_abnormality_labels" / labels_file
        labels = _read_csv(labels_path, ("VolumeName",)) if labels_path.exists() else {}

        self.skipped: list[SkippedStudy] = []
        volumes: dict[str, Path] = {}
        for path in sorted(volume_dir.rglob("*.nii.gz")):
            name = path.name.removesuffix(".nii.gz")
            if name in volumes:
                self.skipped.append(SkippedStudy(name, f"duplicate volume {path} (kept {volumes[name]})"))
            else:
                volumes[name] = path
        for name in sorted(reports.keys() - volumes.keys()):
            self.skipped.append(SkippedStudy(name, f"in the reports CSV but no {name}.nii.gz under {volume_dir}"))
        for name in sorted(volumes.keys() - reports.keys()):
            self.skipped.append(SkippedStudy(name, f"{volumes[name]} has no row in the reports CSV"))

        self.studies = [self._study(name, volumes[name], reports[name], metadata.get(name), labels.get(name))
                        for name in sorted(volumes.keys() & reports.keys())]
        self.failed: list[SkippedStudy] = []  # studies whose volume did not load in the last iter_volumes()

    @staticmethod
    def _study(name, path, report, metadata, label_row) -> CTRateStudy:
        labels = None
        if label_row is not None:
            labels = {k: v not in ("", "0", "0.0") for k, v in label_row.items() if k != "VolumeName"}
        return CTRateStudy(name=name, path=path, findings=report["Findings_EN"], impression=report["Impressions_EN"],
                           indication=report.get("ClinicalInformation_EN", ""), labels=labels, metadata=metadata)

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> CTRateStudy:
        return self.studies[index]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.studies]

    def iter_volumes(self) -> Iterator[tuple[CTRateStudy, Volume]]:
        """(study, volume) for every study that loads; the others land in `.failed` instead of stopping the run."""
        self.failed = []
        for study in self.studies:
            try:
                volume = study.load()
            except CTRateError as exc:
                self.failed.append(SkippedStudy(study.name, str(exc)))
                continue
            yield study, volume
