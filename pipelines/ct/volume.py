"""`Volume`: a CT scan as an int16 Hounsfield-unit array (z, y, x) with its patient geometry and metadata.

Geometry follows DICOM's patient frame (LPS: +x to the patient's left, +y posterior, +z head-ward). Voxel (k, j, i)
sits at `origin_lps + k*sz*direction[0] + j*sy*direction[1] + i*sx*direction[2]`, where `direction` rows are the unit
vectors of the z, y, x array axes. Slices are ordered by ascending position along the slice normal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

HU_MIN, HU_MAX = -1024, 3071  # clip range for stored HU (12-bit CT range); int16 holds it with room to spare


@dataclass(frozen=True)
class Window:
    width: float  # HU
    level: float  # HU

    @property
    def bounds(self) -> tuple[float, float]:
        return self.level - self.width / 2, self.level + self.width / 2


WINDOWS = {
    "lung": Window(1500, -600),
    "mediastinum": Window(350, 50),
    "soft_tissue": Window(400, 40),
    "bone": Window(2500, 480),
}


@dataclass
class SeriesMetadata:
    """Identity and acquisition facts copied from the DICOM headers (empty strings / None when absent)."""

    patient_id: str = ""
    patient_name: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_uid: str = ""
    series_uid: str = ""
    study_description: str = ""
    series_description: str = ""
    study_date: str = ""
    series_date: str = ""
    modality: str = "CT"
    manufacturer: str = ""
    kvp: float | None = None
    slice_thickness_mm: float | None = None
    kernel: str = ""
    contrast: bool = False
    image_type: list[str] = field(default_factory=list)
    transfer_syntax: str = ""


@dataclass
class Volume:
    hu: np.ndarray  # (Z, Y, X) int16 Hounsfield units
    spacing_zyx: tuple[float, float, float]  # mm between voxel centres
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mm, centre of voxel (0, 0, 0)
    direction: np.ndarray = field(default_factory=lambda: np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float))
    metadata: SeriesMetadata = field(default_factory=SeriesMetadata)

    def __post_init__(self):
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu: expected a 3-D (z, y, x) array, found shape {self.hu.shape}")
        if len(self.spacing_zyx) != 3 or min(self.spacing_zyx) <= 0:
            raise ValueError(f"Volume.spacing_zyx: expected three positive millimetre values, found {self.spacing_zyx}")
        self.spacing_zyx = tuple(float(s) for s in self.spacing_zyx)
        self.origin_lps = tuple(float(o) for o in self.origin_lps)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_zyx))

    @property
    def positions_mm(self) -> list[float]:
        """Slice positions along the slice normal (mm), one per slice in volume order."""
        normal = self.direction[0]
        start = float(np.dot(self.origin_lps, normal))
        return [start + k * self.spacing_zyx[0] for k in range(self.shape[0])]

    def voxel_to_mm(self, zyx) -> tuple[float, float, float]:
        """Voxel index (may be fractional) -> millimetres from the centre of voxel (0, 0, 0) along z, y, x."""
        return tuple(float(i) * s for i, s in zip(zyx, self.spacing_zyx))

    def voxel_to_lps(self, zyx) -> tuple[float, float, float]:
        offset = np.asarray(self.voxel_to_mm(zyx)) @ self.direction
        return tuple(float(v) for v in np.asarray(self.origin_lps) + offset)

    def metadata_dict(self) -> dict:
        return asdict(self.metadata)


def window_to_uint8(hu: np.ndarray, window: str | Window = "lung") -> np.ndarray:
    """Map HU through a display window to 0..255 (display only: never feed windowed values to measurements)."""
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"window: expected one of {sorted(WINDOWS)}, found {window!r}")
        window = WINDOWS[window]
    lo, hi = window.bounds
    scaled = (hu.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def resample(volume: Volume, spacing_zyx: tuple[float, float, float], order: int = 1) -> Volume:
    """Resample to new voxel spacing (mm) with spline `order` (1 = trilinear), keeping the physical extent's origin."""
    from scipy import ndimage

    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError(f"spacing_zyx: expected three positive millimetre values, found {spacing_zyx}")
    old = np.asarray(volume.spacing_zyx)
    new = np.asarray(spacing_zyx, dtype=float)
    extent = (np.asarray(volume.shape) - 1) * old
    shape = tuple(int(n) for n in np.floor(extent / new + 1e-6).astype(int) + 1)
    out = np.empty(shape, dtype=np.int16)
    # Slice by slice along z keeps peak memory at one float32 slab instead of a whole float copy of the volume.
    zs = np.arange(shape[0]) * new[0] / old[0]
    ys = np.arange(shape[1]) * new[1] / old[1]
    xs = np.arange(shape[2]) * new[2] / old[2]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    for k, zf in enumerate(zs):
        k0 = min(int(np.floor(zf)), volume.shape[0] - 1)
        k1 = min(k0 + 1, volume.shape[0] - 1)
        w = float(zf - k0)
        slab = volume.hu[k0].astype(np.float32) * (1 - w) + volume.hu[k1].astype(np.float32) * w
        plane = ndimage.map_coordinates(slab, [gy, gx], order=order, mode="nearest")
        out[k] = np.clip(np.rint(plane), -32768, 32767).astype(np.int16)
    return replace(volume, hu=out, spacing_zyx=tuple(float(s) for s in new))
