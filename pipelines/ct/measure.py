"""Quantitative chest CT findings from HU alone (real or synthetic scans), in physical units.

Grids: the volume is block-averaged (never copied to float64) to a detection grid of ~2.5 mm slices and ~1.4 mm
pixels (DETECT_MM, a no-op for such series) and from there to a ~2.9 mm segmentation grid (SEGMENT_MM). Body, airways,
lungs, the lung envelope and the mediastinum are segmented on the coarse grid; nodules (inside the lung bounding box)
and effusions are found and measured on the detection grid; lung volumes and %LAA-950 count full-resolution voxels per
block; full-resolution masks are built only when read. Locations are reported in the volume's own voxels.

Pipeline (all thresholds in HU, all sizes in mm so results do not depend on the voxel grid):
  body      largest > -500 HU component, holes filled per slice (drops the table)
  airways   grown from the trachea at < -950 HU (airway walls stop the growth), excluded from the lungs
  lungs     air (< -400 HU) inside the body minus airways, split at the body midline, holes filled per slice
  emphysema %LAA-950 = share of lung voxels below -950 HU (raw HU, as in clinical software)
  nodules   dense (> -700 HU) voxels in the lungs; vessels are suppressed by ball openings at three radii
            (a ball rolls through blobs, not through thinner tubes) followed by shape tests: elongation (PCA), contact
            with the hilum / pleura, and how much of the dense tissue around the blob belongs to it (vessel junctions
            leave compact residues that are surrounded by tube). A nodule fused with a vessel of its own width stays
            joined to it at every radius; a Hessian blob filter (local maxima of the 1.5 mm Gaussian whose curvature
            is about equal in all three directions) finds it, and a ball of its inscribed radius cuts it out. Size is
            measured at the half-contrast threshold on an interpolated axial section through the centre: long axis,
            perpendicular short axis, their mean.
  effusions fluid-density (-25..25 HU) regions thicker than a few mm: pleural next to a lung outside the mediastinum,
            pericardial inside it (at least MIN_PERICARDIAL_ML).
  consolidation  soft-tissue density replacing lung (inside the lung or its per-slice convex hull, away from the heart)
            wider than a 4 mm ball, with air bronchograms enclosed in it.
  heart     cardiothoracic ratio: widest transverse heart diameter (blood / myocardium, not the pericardial fat or
            fluid) over the widest internal thoracic diameter; `cardiomegaly` above CARDIOMEGALY_CTR.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.ct.anatomy import lobe_of
from pipelines.ct.volume import Volume

LUNG_AIR_HU = -400.0
LAA_HU = -950.0
AIRWAY_HU = -950.0
DENSE_HU = -700.0
FLUID_HU = (-45.0, 25.0)  # fluid against fat (-95) and muscle (48): half-way levels
OPENING_RADII_MM = (1.6, 2.6, 4.0)
MIN_NODULE_MM = 4.0
ENVELOPE_MM = 8.0  # closing radius of the lung envelope searched for nodules
NEAR_LUNG_MM = 5.0  # an effusion must touch the lung within this distance
CALCIFIED_HU = 300.0  # a blob whose brightest voxels exceed this is calcified
MAX_DENSE_SHELL = 0.3  # share of a blob's outer shell that may be soft tissue (vessels)
# Compact blobs (PCA elongation and ellipsoid fill) may have up to MAX_DENSE_SHELL_COMPACT of their shell in soft
# tissue if they own at least COMPACT_MIN_OWNED of the dense tissue in the ball around them.
COMPACT_ELONGATION = 1.7
COMPACT_FILL = 0.8
MAX_DENSE_SHELL_COMPACT = 0.42
COMPACT_MIN_OWNED = 0.6
JUNCTION_MAX_RADIUS_MM = 6.0  # blobs with a larger equivalent radius skip the vessel-junction test
GGO_SHELL_MM = 2.0  # ground-glass rim (mm) beyond blur that makes a nodule part-solid
# Blob filter for solid nodules fused with a vessel (the openings keep them joined to the tube): Gaussian scale (mm),
# least / most downward curvature, least curvature times sigma^2 (HU), minimum smoothed peak HU and contrast over the
# local parenchyma, inscribed radius (mm), and the sphere (a multiple of that radius, + 1 mm) on which at most
# BLOB_MAX_SHELL of the voxels may be dense; the blob is cut out at BLOB_CUT_SCALE times its radius (+ 1 mm).
BLOB_SIGMAS_MM = (1.5,)
BLOB_MIN_RATIO = 0.6
BLOB_MIN_STRENGTH_HU = 80.0
BLOB_MIN_HU = -400.0
BLOB_MIN_CONTRAST_HU = 500.0
BLOB_MIN_RADIUS_MM = 2.2
BLOB_SHELL_SCALE = 2.0
BLOB_MAX_SHELL = 0.2
BLOB_CUT_SCALE = 1.0
BLOB_PATCH_MM = 14.0
EMPHYSEMA_REPORT_PERCENT = 6.0  # LAA-950 above which emphysema is reported as a finding
MIN_EFFUSION_ML = 15.0
EFFUSION_REGROW_VOXELS = 3  # geodesic regrowth after the opening (voxels)
PERICARDIAL_LOW_HU = -25.0
MIN_PERICARDIAL_ML = 50.0  # up to ~50 mL of pericardial fluid is normal
CONSOLIDATION_HU = -400.0  # about half-way between aerated lung (-865) and consolidated lung (soft tissue, 30-40)
CONSOLIDATION_OPENING_MM = 4.0  # ball that rolls through consolidation, not through vessels or small nodules
MIN_CONSOLIDATION_ML = 5.0
AIR_BRONCHOGRAM_HU = -500.0
MIN_BRONCHOGRAM_VOXELS = 8  # enclosed air voxels (detection grid) that make an air bronchogram
MIN_BRONCHOGRAM_SHARE = 0.002  # ... and their share of the filled region
HEART_HU = -30.0  # half-way between fat (-95) and blood / myocardium / muscle (30-60): heart and chest-wall edges
HEART_OPENING_MM = 6.0  # opening radius that detaches the heart from vessels and organs touching it
MIN_HEART_ML = 100.0  # smallest soft-tissue body taken for the heart
CARDIOMEGALY_CTR = 0.5  # cardiothoracic ratio above which the heart is reported as enlarged
RIM_VOXELS = 2
FRAME_MIDLINE_MM = 15.0  # half-width of the midline strip (trachea) left out of the lungs' lobe frames


@dataclass
class Finding:
    """One finding in the ground-truth vocabulary. Locations: `center_zyx_mm` from voxel (0, 0, 0); `center_voxel`
    and `bbox_zyx` (z0, y0, x0, z1, y1, x1; end-exclusive) in voxel indices for drawing."""

    type: str
    side: str | None = None
    lobe: str | None = None
    diameter_mm: float | None = None
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    volume_ml: float | None = None
    mean_hu: float | None = None
    composition: str | None = None
    center_zyx_mm: list[float] | None = None
    center_voxel: list[int] | None = None
    bbox_zyx: list[int] | None = None
    laa950_percent: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        d.update(self.extra)
        return d


@dataclass
class Findings:
    findings: list[Finding]
    lung_volume_ml: dict[str, float]  # {"right": ..., "left": ...}
    laa950_percent: float
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # body, lungs, airways (bool, Z, Y, X)
    # cardiothoracic_ratio, heart_diameter_mm, thoracic_diameter_mm (always measured when both lungs and a heart are
    # found, whether or not the ratio is abnormal); None otherwise
    heart: dict[str, float] | None = None

    def of_type(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.type == kind]

    def to_dict(self) -> dict:
        return {"findings": [f.to_dict() for f in self.findings],
                "lungs": {"right_volume_ml": round(self.lung_volume_ml.get("right", 0.0), 1),
                          "left_volume_ml": round(self.lung_volume_ml.get("left", 0.0), 1),
                          "laa950_percent": round(self.laa950_percent, 3)},
                "heart": dict(self.heart) if self.heart else None}


class FullResolutionMasks(dict):
    """Masks kept on the detection grid and brought to the volume's shape on first access (a full-resolution
    mask costs more to build than the whole measurement, and most callers never read them)."""

    def __init__(self, shape, factors, coarse: dict[str, np.ndarray]):
        super().__init__({name: None for name in coarse})
        self._shape, self._factors, self._coarse = tuple(shape), tuple(factors), dict(coarse)

    def __getitem__(self, name: str) -> np.ndarray:
        value = super().__getitem__(name)
        if value is None:
            value = _upsample(self._coarse.pop(name), self._factors, self._shape)
            super().__setitem__(name, value)
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        return [self[name] for name in self]

    def items(self):
        return [(name, self[name]) for name in self]


# ----------------------------------------------------------------------------------------------------------- helpers

def _sigma_vox(mm: float, spacing) -> tuple[float, ...]:
    return tuple(mm / s for s in spacing)


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice at once: background components (4-connected within a slice, never across
    slices) that do not reach the edge of their slice are holes. The same set as `ndimage.binary_fill_holes` with a
    structuring element without z neighbours, from one labelling instead of an iterated dilation."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    labels, n = ndimage.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        border[edge] = True
    border[0] = False  # label 0 is the mask itself, kept
    return ~border[labels]


def _block_mean(hu: np.ndarray, factors, transform=None) -> np.ndarray:
    """Mean over non-overlapping blocks of `factors` voxels (float32); block i covers full-resolution indices
    [i * f, (i + 1) * f), edge blocks are padded by replication. Works one output slice at a time (OpenCV's area
    resampling is the block mean for an integer factor), so no float copy of the full volume is ever made;
    `transform` (e.g. a threshold) is applied to each slab of input slices first."""
    fz, fy, fx = (int(f) for f in factors)
    nz, ny, nx = hu.shape
    oz, oy, ox = -(-nz // fz), -(-ny // fy), -(-nx // fx)
    out = np.empty((oz, oy, ox), dtype=np.float32)
    if (fz, fy, fx) == (1, 1, 1) and transform is None:
        out[...] = hu
        return out
    import cv2

    for k in range(oz):
        slab = hu[k * fz:(k + 1) * fz]
        if transform is not None:
            slab = transform(slab)
        plane = slab[0].astype(np.float32)
        for j in range(1, fz):  # a slab past the last slice repeats that slice
            plane += slab[min(j, slab.shape[0] - 1)]
        if fz > 1:
            plane *= np.float32(1.0 / fz)
        if (fy, fx) == (1, 1):
            out[k] = plane
            continue
        if ny % fy or nx % fx:
            plane = cv2.copyMakeBorder(plane, 0, oy * fy - ny, 0, ox * fx - nx, cv2.BORDER_REPLICATE)
        out[k] = cv2.resize(plane, (ox, oy), interpolation=cv2.INTER_AREA)
    return out


def _ball(radius_mm: float, spacing, strict: bool = False) -> np.ndarray:
    """Voxel offsets within `radius_mm` of the centre (< when strict, else <=) as a structuring element."""
    half = [int(radius_mm / s + 1e-6) for s in spacing]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    d2 = sum(g * g for g in grids)
    return d2 < radius_mm ** 2 - 1e-9 if strict else d2 <= radius_mm ** 2 + 1e-9


def _upsample(mask: np.ndarray, factors, shape) -> np.ndarray:
    """Nearest-neighbour inverse of `_block_mean` for masks, cropped to `shape` (one broadcast write)."""
    factors = tuple(int(f) for f in factors)
    if factors == (1, 1, 1):
        return mask[tuple(slice(0, n) for n in shape)]
    full = tuple(n * f for n, f in zip(mask.shape, factors))
    out = np.empty(full, dtype=mask.dtype)
    blocks = out.reshape(mask.shape[0], factors[0], mask.shape[1], factors[1], mask.shape[2], factors[2])
    blocks[...] = mask[:, None, :, None, :, None]
    if full != tuple(shape):
        out = np.ascontiguousarray(out[tuple(slice(0, n) for n in shape)])
    return out


def _grid_factors(spacing, target_mm) -> tuple[int, int, int]:
    """Integer block sizes that bring each axis' spacing up to about `target_mm` = (z, in-plane) mm."""
    tz, txy = target_mm
    return (max(1, int(tz / spacing[0] + 1e-6)), max(1, int(txy / spacing[1] + 1e-6)),
            max(1, int(txy / spacing[2] + 1e-6)))


def _bbox(mask: np.ndarray, margin=(0, 0, 0)) -> tuple[slice, ...]:
    """Bounding box (slices, end-exclusive, widened by `margin` voxels) from the mask's axis projections."""
    out = []
    for axis, (m, n) in enumerate(zip(margin, mask.shape)):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(max(int(hit[0]) - m, 0), min(int(hit[-1]) + 1 + m, n)))
    return tuple(out)


def _orientation(volume: Volume) -> tuple[int, int, int]:
    """Signs that map array axes to anatomy: (+1 if z index grows head-ward, +1 if y grows posterior,
    +1 if x grows to the patient's left)."""
    d = volume.direction
    return (1 if d[0][2] >= 0 else -1, 1 if d[1][1] >= 0 else -1, 1 if d[2][0] >= 0 else -1)


# ----------------------------------------------------------------------------------------------------------- segmentation

def segment_body(smooth: np.ndarray) -> np.ndarray:
    return _fill_slices(_largest(smooth > -500))


def segment_airways(smooth: np.ndarray, body: np.ndarray, spacing, up: int) -> np.ndarray:
    """Trachea found in the top slices (round air near the midline), grown through connected airway lumen."""
    from scipy import ndimage

    lumen = (smooth < AIRWAY_HU) & body
    nz = smooth.shape[0]
    order = range(nz - 1, -1, -1) if up > 0 else range(nz)
    pixel_mm2 = spacing[1] * spacing[2]
    for k in list(order)[: max(3, nz // 6)]:
        if not body[k].any():
            continue
        cx = np.nonzero(body[k])[1].mean()
        labels, n = ndimage.label(lumen[k])
        for lab in range(1, n + 1):
            comp = labels == lab
            area = comp.sum() * pixel_mm2
            xs = np.nonzero(comp)[1]
            if 40 <= area <= 900 and abs(xs.mean() - cx) * spacing[2] < 25:
                seed = (k, *[int(v[0]) for v in np.nonzero(comp)])
                labels3, _ = ndimage.label(lumen)
                return labels3 == labels3[seed]
    return np.zeros_like(lumen)


def segment_lungs(smooth, body, airways, spacing, signs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, left, midline x index). Lung = air inside the body minus airways, holes (vessels, nodules) filled."""
    from scipy import ndimage

    air = (smooth < LUNG_AIR_HU) & body & ~airways
    labels, n = ndimage.label(air)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    voxel_ml = float(np.prod(spacing)) / 1000
    keep = [lab for lab in np.argsort(sizes)[::-1][:3] if sizes[lab] * voxel_ml > 50]
    chosen = np.zeros(n + 1, dtype=bool)  # lookup table by label: one gather instead of np.isin's sort
    chosen[keep] = True
    lungs = chosen[labels]
    cols = np.nonzero(body.any(axis=(0, 1)))[0]
    mid = int(round((cols.min() + cols.max()) / 2)) if len(cols) else smooth.shape[2] // 2
    left_side = np.zeros_like(lungs)
    if signs[2] > 0:
        left_side[:, :, mid:] = True
    else:
        left_side[:, :, :mid] = True
    right = _fill_slices(lungs & ~left_side) & ~airways
    left = _fill_slices(lungs & left_side) & ~airways
    return right, left, mid


# ----------------------------------------------------------------------------------------------------------- nodules

def _opening(mask: np.ndarray, radius: float, spacing) -> np.ndarray:
    """Binary opening by a ball of `radius` mm: erosion by the open ball, dilation by the closed one (the same set
    as thresholding distance transforms, with small structuring elements on these grids)."""
    from scipy import ndimage

    core = ndimage.binary_erosion(mask, structure=_ball(radius, spacing, strict=True))
    if not core.any():
        return core
    return ndimage.binary_dilation(core, structure=_ball(radius, spacing))


def _pca_shape(coords_mm: np.ndarray, spacing, volume_mm3: float) -> tuple[float, float]:
    """(elongation, fill): sqrt of the largest / smallest variance, and the volume over that of the solid ellipsoid
    with the same second moments (variance along a semi-axis a is a^2 / 5), ~1 for a blob, small for a branching tree."""
    if len(coords_mm) < 3:
        return 1.0, 1.0
    cov = np.cov(coords_mm.T) + np.diag(np.asarray(spacing) ** 2 / 12.0)
    ev = np.clip(np.linalg.eigvalsh(cov), 1e-6, None)
    ellipsoid = 4 / 3 * math.pi * 5 ** 1.5 * math.sqrt(float(np.prod(ev)))
    return float(math.sqrt(ev[-1] / ev[0])), volume_mm3 / ellipsoid


def _axial_axes(plane: np.ndarray, keep: np.ndarray, threshold: float, px_y: float, px_x: float):
    """Long and perpendicular short axis (mm) of the region above `threshold` in a 2-D patch, on a 4x grid."""
    import cv2

    up = 4
    h, w = plane.shape
    big = cv2.resize(plane.astype(np.float32), (w * up, h * up), interpolation=cv2.INTER_LINEAR)
    allowed = cv2.resize(keep.astype(np.uint8), (w * up, h * up), interpolation=cv2.INTER_NEAREST) > 0
    region = ((big > threshold) & allowed).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    if n <= 1:
        return None
    lab = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(labels == lab)
    pts = np.stack([xs * px_x / up, ys * px_y / up], axis=1).astype(np.float32)
    hull = cv2.convexHull(pts).reshape(-1, 2)
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    axis = diff[i, j] / max(dist[i, j], 1e-6)
    perp = np.array([-axis[1], axis[0]])
    proj = hull @ perp
    cell = 0.5 * (px_x + px_y) / up  # boundary samples are cell centres: add one cell of extent
    return float(dist[i, j]) + cell, float(proj.max() - proj.min()) + cell


def detect_nodules(smooth, raw, lungs, envelope, spacing, signs, lung_frames, mid, offset) -> list[Finding]:
    """Nodule candidates in a crop around the lungs. `smooth` / `raw` are HU on the detection grid, `lungs` the lung
    mask and `envelope` the lung envelope (closing by a ball) on that crop, `offset` the crop's first voxel; the
    findings are in detection-grid voxels."""
    from scipy import ndimage

    D = smooth
    # Search inside the lung envelope: a nodule touching a vessel that runs out of the lung in one slice is not a
    # hole of that slice's lung mask, but it is inside the envelope.
    lung = envelope
    dense = (D > DENSE_HU) & lung
    aerated = lungs  # the lung mask itself (air plus enclosed structures), not the envelope
    if not dense.any():
        return []
    voxel_mm3 = float(np.prod(spacing))
    min_vol = math.pi / 6 * MIN_NODULE_MM ** 3
    accepted: list[dict] = []
    # On coarse grids a ball smaller than a pixel opens nothing and a few voxels have no shape: scale both.
    pixel = max(spacing[1], spacing[2])
    radii = sorted({max(r, 0.8 * pixel) for r in OPENING_RADII_MM})
    min_vol = max(min_vol, 8 * voxel_mm3)
    for radius in radii:
        opened = _opening(dense, radius, spacing)
        labels, n = ndimage.label(opened)
        if n == 0:
            continue
        for lab, obj in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[obj] == lab
            vol = comp.sum() * voxel_mm3
            if vol < min_vol or vol > 150000:  # > ~65 mm sphere: not a focal lesion
                continue
            coords = np.argwhere(comp) * spacing
            elongation, fill = _pca_shape(coords, spacing, vol)
            if elongation > 2.2 or fill < 0.6:
                continue
            centre = coords.mean(0) + np.array([s.start for s in obj]) * spacing
            r_eq = (3 * vol / (4 * math.pi)) ** (1 / 3)
            if any(np.linalg.norm(centre - a["centre"]) < max(r_eq, a["r_eq"]) + 2 for a in accepted):
                continue
            # Shell just outside the blob: a nodule in the lung is wrapped in aerated lung with a few vessels
            # touching it; a blob against the chest wall, an effusion or the hilum is half wrapped in soft tissue.
            box = tuple(slice(max(o.start - 1, 0), min(o.stop + 1, n)) for o, n in zip(obj, labels.shape))
            local = labels[box] == lab
            shell = ndimage.binary_dilation(local) & ~local
            if not shell.any():
                continue
            shell_dense = float((dense[box][shell] | ~aerated[box][shell]).mean())
            # A compact, well-filled blob may be wrapped more tightly by vessels or lie closer to the pleura: it
            # passes with a denser shell, but then also has to own more of the dense tissue around it (below).
            compact = elongation <= COMPACT_ELONGATION and fill >= COMPACT_FILL
            if shell_dense > (MAX_DENSE_SHELL_COMPACT if compact else MAX_DENSE_SHELL):
                continue
            min_owned = 0.5 if shell_dense <= MAX_DENSE_SHELL else COMPACT_MIN_OWNED
            # How much of the dense tissue in a ball around the blob is the blob: vessel junctions leave compact
            # residues that are surrounded by their tubes. Peripheral vessels are at most a few mm thick, so a blob
            # wider than JUNCTION_MAX_RADIUS_MM cannot be such a residue and skips this test.
            if r_eq < JUNCTION_MAX_RADIUS_MM:
                ball_r = 2.2 * r_eq + 1.5
                lo = np.maximum(((centre - ball_r) / spacing).astype(int), 0)
                hi = np.minimum(((centre + ball_r) / spacing).astype(int) + 2, dense.shape)
                region = tuple(slice(a, b) for a, b in zip(lo, hi))
                grid = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)],
                                            indexing="ij"), -1)
                inball = np.linalg.norm(grid - centre, axis=-1) <= ball_r
                dense_in = (dense[region] & inball).sum()
                blob_in = (labels[region] == lab)[inball].sum()
                if dense_in == 0 or blob_in / dense_in < min_owned:
                    continue
            accepted.append({"centre": centre, "r_eq": r_eq, "obj": obj, "lab": lab, "labels": labels,
                             "radius": radius})
    for a in accepted:
        a["blob"] = a.pop("labels")[a["obj"]] == a.pop("lab")
    accepted += _blob_candidates(D, dense, aerated, spacing, accepted)
    out = []
    offset = np.asarray(offset)
    for a in accepted:
        f = _measure_nodule(a["blob"], a["obj"], D, raw, lung, spacing, offset, signs, lung_frames, mid)
        if f is not None:
            out.append(f)
    return out


def _hessian_at(s: np.ndarray, points: np.ndarray, spacing) -> np.ndarray:
    """Hessian (HU / mm^2) of `s` at interior voxel `points` (N, 3) by central differences, shape (N, 3, 3)."""
    h = np.empty((len(points), 3, 3), dtype=np.float64)
    unit = np.eye(3, dtype=int)
    centre = s[tuple(points.T)].astype(np.float64)
    for i in range(3):
        plus, minus = tuple(points.T + unit[i][:, None]), tuple(points.T - unit[i][:, None])
        h[:, i, i] = (s[plus] - 2 * centre + s[minus]) / spacing[i] ** 2
        for j in range(i + 1, 3):
            e = unit[i] + unit[j]
            f = unit[i] - unit[j]
            pp, mm = tuple(points.T + e[:, None]), tuple(points.T - e[:, None])
            pm, mp = tuple(points.T + f[:, None]), tuple(points.T - f[:, None])
            h[:, i, j] = h[:, j, i] = (s[pp] + s[mm] - s[pm] - s[mp]) / (4 * spacing[i] * spacing[j])
    return h


def _blob_points(D: np.ndarray, aerated: np.ndarray, spacing) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Bright blobs at the scales of small nodules: local maxima of the Gaussian-smoothed HU whose Hessian curves
    down in all three directions about equally (a tube is flat along its axis, a plate along two). Returns
    (voxel, sigma_mm, eigenvalues ascending) per point."""
    from scipy import ndimage

    out = []
    for sigma in BLOB_SIGMAS_MM:
        s = ndimage.gaussian_filter(D, _sigma_vox(sigma, spacing))
        peak = s > BLOB_MIN_HU
        peak &= aerated
        peak[[0, -1]] = False
        peak[:, [0, -1]] = False
        peak[:, :, [0, -1]] = False
        points = np.argwhere(peak)
        if not len(points):
            continue
        # Local maxima among the 26 neighbours, tested only at the bright voxels.
        value = s[tuple(points.T)]
        keep = np.ones(len(points), dtype=bool)
        for dz in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dz or dy or dx:
                        keep &= value >= s[points[:, 0] + dz, points[:, 1] + dy, points[:, 2] + dx]
        points = points[keep]
        if not len(points):
            continue
        ev = np.linalg.eigvalsh(_hessian_at(s, points, spacing))  # ascending: ev[:, 0] curves down the most
        blob = (ev[:, 2] < 0) & (ev[:, 2] / ev[:, 0] > BLOB_MIN_RATIO) & (-ev[:, 2] * sigma ** 2 > BLOB_MIN_STRENGTH_HU)
        out += [(p, sigma, e) for p, e in zip(points[blob], ev[blob])]
    return out


def _blob_candidates(D, dense, aerated, spacing, accepted) -> list[dict]:
    """Nodules the openings miss (small or faint ones, or ones fused with a vessel): blob points from
    `_blob_points`, each cut out of its surroundings by a ball of its own inscribed radius."""
    from scipy import ndimage

    out: list[dict] = []
    half = np.ceil(BLOB_PATCH_MM / spacing).astype(int)
    for point, sigma, ev in _blob_points(D, aerated, spacing):
        centre = point * spacing
        if any(np.linalg.norm(centre - a["centre"]) < a["r_eq"] + 3 for a in accepted + out):
            continue
        lo = np.maximum(point - half, 0)
        hi = np.minimum(point + half + 1, D.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        d = D[box]
        p = tuple(point - lo)
        background = float(np.median(d[~dense[box]])) if (~dense[box]).sum() > 10 else -850.0
        peak = float(d[p])
        if peak - background < BLOB_MIN_CONTRAST_HU:
            continue
        threshold = 0.5 * (background + peak)
        labels, _ = ndimage.label(d > threshold)
        region = labels == labels[p]
        radius = float(ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1][p])
        if radius < BLOB_MIN_RADIUS_MM:
            continue
        grid = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, point, spacing)], indexing="ij")
        dist = np.sqrt(sum(g * g for g in grid))
        # Dense tissue on a sphere well outside the blob: a nodule is wrapped in aerated lung with a few vessels
        # touching it, a vessel bend or junction is crossed by its tubes.
        sphere = np.abs(dist - BLOB_SHELL_SCALE * radius - 1.0) <= 0.5 * max(spacing)
        if not sphere.any() or (d[sphere] > threshold).mean() > BLOB_MAX_SHELL:
            continue
        blob = region & (dist <= BLOB_CUT_SCALE * radius + 1.0)
        obj = tuple(slice(a, b) for a, b in zip(lo, hi))
        out.append({"centre": centre, "r_eq": radius, "obj": obj, "blob": blob})
    return out


def _measure_nodule(blob_in_obj, obj, D, raw, lung, spacing, offset, signs, lung_frames, mid) -> Finding | None:
    """Size, density and place of one candidate: `blob_in_obj` is its mask over the crop region `obj`."""
    from scipy import ndimage

    m = (3, 5, 5)
    box = tuple(slice(max(s.start - mm, 0), min(s.stop + mm, n)) for s, mm, n in zip(obj, m, D.shape))
    d = D[box]
    blob = np.zeros(d.shape, dtype=bool)
    blob[tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(obj, box))] = blob_in_obj
    raw_box = raw[box]
    near = ndimage.binary_dilation(blob, iterations=1)
    parenchyma = lung[box] & ~ndimage.binary_dilation(blob, iterations=3) & (d < DENSE_HU)
    background = float(np.median(d[parenchyma])) if parenchyma.sum() > 10 else -850.0
    edt = ndimage.distance_transform_edt(blob, sampling=spacing)
    core = blob & (edt >= 0.5 * edt.max())
    peak = float(np.median(d[core]))
    outer = near & (d > (background - 600.0) / 2)
    solid = near & (d > -300.0)
    r_outer = (3 * outer.sum() / (4 * math.pi)) ** (1 / 3)
    r_solid = (3 * solid.sum() / (4 * math.pi)) ** (1 / 3)
    # Equivalent radii in voxel units scaled to mm by the geometric-mean spacing. Blur alone separates the -730 and
    # -300 HU contours of a solid nodule by ~1 mm; a ground-glass rim thicker than that means a part-solid nodule.
    mm = float(np.prod(spacing)) ** (1 / 3)
    shell_mm = (r_outer - r_solid) * mm
    filled = np.stack([ndimage.binary_fill_holes(b) for b in blob])  # per slice: air bronchograms are holes
    air_inside = (filled & ~blob & (raw_box < -600)).sum() / max(filled.sum(), 1)
    if peak > 200 or np.percentile(raw_box[blob], 95) > CALCIFIED_HU:
        kind, composition = "calcified_granuloma", "calcified"
    elif air_inside > 0.005 and filled.sum() * float(np.prod(spacing)) > 4000:
        return None  # a dense region around air bronchograms is consolidation (`detect_consolidation`), not a nodule
    else:
        kind = "nodule"
        if solid.sum() < 0.05 * outer.sum():
            composition = "ground-glass"
        elif shell_mm > GGO_SHELL_MM:
            composition = "part-solid"
        else:
            composition = "solid"
    if composition in ("solid", "calcified"):
        rim = peak
    else:
        ggo = outer & ~solid
        rim = float(np.median(d[ggo])) if ggo.any() else peak
    threshold = 0.5 * (background + rim)
    mask = (d > threshold) & near
    labels_m, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels_m.ravel(), weights=None)
    sizes[0] = 0
    mask = labels_m == int(np.argmax(sizes))
    idx = np.argwhere(mask)
    centre_vox = idx.mean(0)
    # Axial section through the centre, interpolated between the two nearest slices.
    zf = centre_vox[0]
    z0 = int(np.floor(zf))
    z1 = min(z0 + 1, d.shape[0] - 1)
    w = zf - z0
    plane = d[z0] * (1 - w) + d[z1] * w
    keep = ndimage.binary_dilation(mask[z0] | mask[z1], iterations=1)
    axes = _axial_axes(plane, keep, threshold, spacing[1], spacing[2])
    if axes is None:
        return None
    long_mm, short_mm = axes
    diameter = 0.5 * (long_mm + short_mm)
    if diameter < 3.0:
        return None
    centre_abs = centre_vox + offset + np.array([b.start for b in box])
    zyx_mm = [round(float(c * s), 2) for c, s in zip(centre_abs, spacing)]
    side = "left" if (centre_abs[2] - mid) * signs[2] > 0 else "right"
    lobe = _lobe(lung_frames, side, centre_abs, signs)
    lo = idx.min(0) + offset + np.array([b.start for b in box])
    hi = idx.max(0) + 1 + offset + np.array([b.start for b in box])
    return Finding(type=kind, side=side, lobe=lobe, diameter_mm=round(diameter, 2), long_axis_mm=round(long_mm, 2),
                   short_axis_mm=round(short_mm, 2), volume_ml=round(mask.sum() * float(np.prod(spacing)) / 1000, 4),
                   mean_hu=round(float(d[mask].mean()), 1), composition=composition, center_zyx_mm=zyx_mm,
                   center_voxel=[int(round(c)) for c in centre_abs], bbox_zyx=[int(v) for v in (*lo, *hi)])


def _lung_frame(mask: np.ndarray, mid: int, px_x_mm: float):
    """(y0, y1, z0, z1) of a lung, the frame `anatomy.lobe_of` places lobes in, from its voxels at least
    FRAME_MIDLINE_MM from the body midline (column `mid`): above the apex the trachea's partial-volume rim (air, but
    not below AIRWAY_HU) is still counted as lung, and would raise the frame's top by centimetres."""
    half = int(np.ceil(FRAME_MIDLINE_MM / px_x_mm))
    sides = (mask[:, :, :max(mid - half, 0)], mask[:, :, mid + half + 1:])  # views: no copy of the mask
    in_z = np.logical_or.reduce([m.any(axis=(1, 2)) for m in sides])
    if not in_z.any():
        return None
    in_y = np.logical_or.reduce([m.any(axis=(0, 2)) for m in sides])
    zz, yy = np.nonzero(in_z)[0], np.nonzero(in_y)[0]
    return int(yy.min()), int(yy.max()), int(zz.min()), int(zz.max())


def _lobe(frames, side, centre_vox, signs) -> str | None:
    f = frames.get(side)
    if f is None:
        return None
    y0, y1, z0, z1 = f
    u = (centre_vox[1] - y0) / max(y1 - y0, 1)
    t = (centre_vox[0] - z0) / max(z1 - z0, 1)
    return lobe_of(side, u if signs[1] > 0 else 1 - u, t if signs[0] > 0 else 1 - t)


# ----------------------------------------------------------------------------------------------------------- effusions

def comp_mask_at(labels, lab, c) -> bool:
    return bool(labels[c] == lab)


def _mediastinum(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Per slice: convex hull of both lungs minus the lungs (heart, great vessels, spine, effusions)."""
    import cv2

    out = np.zeros_like(right)
    for k in range(right.shape[0]):
        if not (right[k].any() and left[k].any()):
            continue
        both = np.zeros(right.shape[1:], np.uint8)
        pts_all = []
        for m in (right[k], left[k]):
            ys, xs = np.nonzero(m)
            pts = np.stack([xs, ys], 1).astype(np.int32)
            pts_all.append(pts)
        cv2.fillPoly(both, [cv2.convexHull(np.concatenate(pts_all))], 1)
        out[k] = (both > 0) & ~right[k] & ~left[k]
    return out


def _lung_hulls(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Per slice and side: the convex hull of that lung's mask. Consolidation replaces aerated lung, so a
    consolidated region against the chest wall is outside the (air-based) lung mask but inside its hull."""
    import cv2

    out = np.zeros_like(right)
    for k in range(right.shape[0]):
        plane = np.zeros(right.shape[1:], np.uint8)
        for m in (right[k], left[k]):
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            cv2.fillPoly(plane, [cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32))], 1)
        out[k] = plane > 0
    return out


def _inside_any(voxel, regions, reach: int = 2) -> bool:
    """Whether one of the (box, mask) regions has a voxel within `reach` detection-grid voxels of `voxel` (the
    centre of a blob cut out of an irregular region need not fall on the region itself)."""
    for box, mask in regions:
        local = [v - b.start for v, b in zip(voxel, box)]
        near = tuple(slice(max(c - reach, 0), max(c + reach + 1, 0)) for c in local)
        if mask[near].any():
            return True
    return False


def detect_effusions(hu, right, left, body, spacing, signs, mid, near_lung=None, mediastinum=None) -> list[Finding]:
    """Pleural and pericardial effusions. `near_lung` (voxels within NEAR_LUNG_MM of a lung) and `mediastinum` (see
    `_mediastinum`) may be passed in when already known, on the same grid as `hu`."""
    from scipy import ndimage

    lungs = right | left
    if not lungs.any():
        return []
    zs = np.nonzero(lungs.any(axis=(1, 2)))[0]
    sl = (slice(int(zs.min()), int(zs.max()) + 1),) + _bbox(body, margin=(0, 2, 2))[1:]
    smooth = ndimage.gaussian_filter(hu[sl].astype(np.float32), _sigma_vox(1.5, spacing))
    lung = lungs[sl]
    fluid = (smooth > FLUID_HU[0]) & (smooth < FLUID_HU[1]) & body[sl] & ~lung
    # Opening by a 2.5 mm ball removes the one-voxel shells where fat or lung meets soft tissue.
    opened = _opening(fluid, 2.5, spacing) & fluid
    labels, n = ndimage.label(opened)
    if n == 0:
        return []
    mediastinum = _mediastinum(right[sl], left[sl]) if mediastinum is None else mediastinum[sl]
    near_lung = (ndimage.binary_dilation(lung, structure=_ball(NEAR_LUNG_MM, spacing)) if near_lung is None
                 else near_lung[sl])
    voxel_ml = float(np.prod(spacing)) / 1000
    out = []
    for lab, obj in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[obj] == lab
        vol = comp.sum() * voxel_ml
        if vol < MIN_EFFUSION_ML:
            continue
        touches_lung = (near_lung[obj] & comp).sum() / max(comp.sum(), 1)
        idx = np.argwhere(comp) + np.array([s.start for s in obj])
        centre = idx.mean(0)
        c = tuple(int(round(v)) for v in centre)
        # A pericardial effusion is a shell around the heart: its centroid falls between the lungs, in soft tissue.
        if mediastinum[c] and not comp_mask_at(labels, lab, c):
            if vol < MIN_PERICARDIAL_ML:
                continue  # normal pericardial fluid, or the partial-volume cap where a large heart meets fat below it
            kind, side = "pericardial_effusion", None
        elif touches_lung > 0.02:
            kind = "pleural_effusion"
            side = "left" if (centre[2] + sl[2].start - mid) * signs[2] > 0 else "right"
        else:
            continue
        # Give back what the opening shaved off (tapering edges), then count the partial-volume rim towards the lung
        # (voxels between lung and fluid density) by their fluid fraction.
        # Work in a box around the component with room for the regrowth and the rim (voxels).
        grow = EFFUSION_REGROW_VOXELS + RIM_VOXELS + 1
        box = tuple(slice(max(o.start - grow, 0), min(o.stop + grow, n)) for o, n in zip(obj, labels.shape))
        region = labels[box] == lab
        local = smooth[box]
        if kind == "pleural_effusion":
            region = ndimage.binary_dilation(region, iterations=EFFUSION_REGROW_VOXELS, mask=fluid[box])
            rim = ndimage.binary_dilation(region, iterations=RIM_VOXELS) & ~region & (local > -850) \
                & (local <= FLUID_HU[0])
            rim_ml = float(np.clip((local[rim] + 850.0) / 858.0, 0, 1).sum()) * voxel_ml
        else:
            # Pericardial fluid lies between two fat layers: the fat/fluid half-way level would count the blurred
            # epicardial fat, so keep the voxels that are clearly fluid and the half-fluid voxels next to them.
            region &= local > PERICARDIAL_LOW_HU
            rim_ml = 0.0
        vol = region.sum() * voxel_ml
        total = vol + rim_ml
        centre_abs = centre + np.array([s.start for s in sl])
        lo = idx.min(0) + np.array([s.start for s in sl])
        hi = idx.max(0) + 1 + np.array([s.start for s in sl])
        out.append(Finding(type=kind, side=side, volume_ml=round(total, 1), mean_hu=round(float(smooth[obj][comp].mean()), 1),
                           center_zyx_mm=[round(float(c * s), 2) for c, s in zip(centre_abs, spacing)],
                           center_voxel=[int(round(c)) for c in centre_abs], bbox_zyx=[int(v) for v in (*lo, *hi)]))
    # One pleural finding per side (the largest component) plus the pericardial one.
    merged: dict[tuple, Finding] = {}
    for f in out:
        key = (f.type, f.side)
        if key in merged:
            merged[key].volume_ml = round(merged[key].volume_ml + f.volume_ml, 1)
        else:
            merged[key] = f
    return list(merged.values())


# ------------------------------------------------------------------------------------------------------ consolidation

def detect_consolidation(fine, coarse, lungs2, hulls2, airways2, heart2, g, spacing, signs, lung_frames, mid):
    """Airspace consolidation: soft-tissue density filling lung over a region wider than CONSOLIDATION_OPENING_MM
    (an opening by that ball removes vessels and small nodules), inside the lung or the per-slice convex hull of each
    lung (`hulls2`, see `_lung_hulls`) but away from the heart (`heart2`, the heart with a margin, which the hull of
    the left lung wraps), with air bronchograms: air below AIR_BRONCHOGRAM_HU enclosed by the dense region in an
    axial slice and not part of the airway tree (`airways2`, whose lumen next to hilar vessels is no bronchogram).
    Nodules, the liver and spleen under the domes, the heart and effusions are dense too but enclose no air.
    Candidates come from the segmentation grid (`coarse` and the masks ending in 2, factors `g` to the detection
    grid); the bronchograms and the volume are found on the detection grid (`fine`, spacing `spacing`).
    Returns (findings in detection-grid voxels, [(box, mask)] of each consolidation on the detection grid)."""
    from scipy import ndimage

    region2 = (lungs2 | hulls2) & ~heart2
    if not region2.any():
        return [], []
    crop2 = _bbox(region2, margin=(1, 1, 1))
    dense2 = np.zeros_like(region2)
    dense2[crop2] = (coarse[crop2] > CONSOLIDATION_HU) & region2[crop2]
    if not dense2.any():
        return [], []
    sp2 = np.asarray(spacing) * g
    core = np.zeros_like(dense2)
    core[crop2] = _opening(dense2[crop2], CONSOLIDATION_OPENING_MM, sp2)
    labels, n = ndimage.label(core)
    voxel_ml = float(np.prod(spacing)) / 1000
    out, masks = [], []
    for lab, obj in enumerate(ndimage.find_objects(labels), start=1):
        comp2 = labels[obj] == lab
        if comp2.sum() * voxel_ml * float(np.prod(g)) < MIN_CONSOLIDATION_ML:
            continue
        # The candidate and one coarse voxel around it (for the edges the opening shaved off), on the detection grid.
        box2 = tuple(slice(max(o.start - 1, 0), min(o.stop + 1, m)) for o, m in zip(obj, labels.shape))
        near2 = ndimage.binary_dilation(labels[box2] == lab)
        box = tuple(slice(b.start * f, min(b.stop * f, m)) for b, f, m in zip(box2, g, fine.shape))
        shape = tuple(b.stop - b.start for b in box)

        def up(mask2):
            return _upsample(mask2, g, shape)

        raw = fine[box]
        smooth = ndimage.gaussian_filter(raw, _sigma_vox(0.7, spacing))
        dense = (smooth > CONSOLIDATION_HU) & up(region2[box2])
        grown = dense & up(near2)
        filled = _fill_slices(grown)
        air = filled & ~grown & (raw < AIR_BRONCHOGRAM_HU) & ~up(ndimage.binary_dilation(airways2[box2]))
        if air.sum() < MIN_BRONCHOGRAM_VOXELS or air.sum() < MIN_BRONCHOGRAM_SHARE * filled.sum():
            continue
        start = np.array([b.start for b in box])
        idx = np.argwhere(filled)
        centre = idx.mean(0) + start
        side = "left" if (centre[2] - mid) * signs[2] > 0 else "right"
        lo = idx.min(0) + start
        hi = idx.max(0) + 1 + start
        masks.append((box, filled))
        # Volume: the dense region with its bronchograms (the airspace it replaces), counted on the detection grid.
        out.append(Finding(type="consolidation", side=side, lobe=_lobe(lung_frames, side, centre, signs),
                           volume_ml=round(float(filled.sum()) * voxel_ml, 1),
                           mean_hu=round(float(raw[grown].mean()), 1),
                           center_zyx_mm=[round(float(c * s), 2) for c, s in zip(centre, spacing)],
                           center_voxel=[int(round(c)) for c in centre], bbox_zyx=[int(v) for v in (*lo, *hi)]))
    return out, masks


# ----------------------------------------------------------------------------------------------------------- heart

def _largest_run_width(mask: np.ndarray) -> np.ndarray:
    """Per slice of a (z, y, x) mask: its x-extent in voxels (last minus first occupied column + 1), 0 when empty."""
    cols = mask.any(axis=1)
    has = cols.any(axis=1)
    first = np.argmax(cols, axis=1)
    last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
    return np.where(has, last - first + 1, 0)


def measure_heart(fine, coarse, right2, left2, mediastinum2, g, spacing, signs) -> dict | None:
    """Cardiothoracic ratio on axial slices: the widest transverse extent of the heart (blood and myocardium above
    HEART_HU, i.e. without the pericardial fat) over the widest internal thoracic diameter (inner edge of the chest
    wall to inner edge, through the lungs). The heart is picked on the segmentation grid (`coarse`, factors `g` to
    the detection grid `fine` whose spacing is `spacing`) and measured on the detection grid. None without both
    lungs or without a heart-sized soft-tissue body between them."""
    from scipy import ndimage

    both = right2.any(axis=(1, 2)) & left2.any(axis=(1, 2))
    if not both.any():
        return None
    sp2 = np.asarray(spacing) * g
    # Soft tissue between the lungs, opened by a ball so the heart comes apart from the great vessels, the
    # oesophagus and the top of the liver that touch it through thin bridges.
    medi = mediastinum2 & both[:, None, None]
    if not medi.any():
        return None
    box2 = _bbox(medi, margin=(1, 1, 1))
    soft = (coarse[box2] > HEART_HU) & medi[box2]
    soft = _opening(soft, HEART_OPENING_MM, sp2) & soft
    labels, n = ndimage.label(soft)
    if n == 0:
        return None
    ys = np.nonzero((right2 | left2).any(axis=(0, 2)))[0]
    y_mid = 0.5 * (ys.min() + ys.max()) - box2[1].start
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(float)
    inside = labels > 0
    y_mean = np.bincount(labels[inside], weights=np.nonzero(inside)[1], minlength=n + 1) / np.maximum(sizes, 1)
    # The heart lies in front of the lungs' mid-coronal plane (spine, descending aorta and oesophagus behind it).
    sizes[(y_mean - y_mid) * signs[1] >= 0] = 0
    sizes[0] = 0
    best = int(np.argmax(sizes))
    if best == 0 or sizes[best] * float(np.prod(sp2)) / 1000 < MIN_HEART_ML:
        return None
    heart2 = np.zeros_like(mediastinum2)
    heart2[box2] = labels == best
    # Detection-grid crop around the heart (one coarse voxel of margin), as slices of the detection grid.
    hbox2 = _bbox(heart2, margin=(1, 1, 1))
    zsl = tuple(slice(b.start * f, min(b.stop * f, m)) for b, f, m in zip(hbox2, g, fine.shape))
    shape = tuple(z.stop - z.start for z in zsl)
    region = _upsample(ndimage.binary_dilation(heart2[hbox2], iterations=1), g, shape)
    crop = ndimage.gaussian_filter(fine[zsl], _sigma_vox(1.0, spacing)) > HEART_HU
    # On the finer grid the epicardial fat separates the heart from pericardial fluid, which the coarse grid blurs
    # into one body: keep the component that holds most of the coarse heart.
    labels1, n1 = ndimage.label(crop & region)
    if n1 == 0:
        return None
    overlap = np.bincount(labels1[_upsample(heart2[hbox2], g, shape)], minlength=n1 + 1)
    overlap[0] = 0
    heart = labels1 == int(np.argmax(overlap))
    widths = _largest_run_width(heart) * spacing[2]
    k = int(np.argmax(widths))
    heart_mm = float(widths[k])
    # Internal thoracic diameter per row, on the slices through the heart that hold both lungs: walk out from each
    # lung's lateral edge through any fat to the first voxel of chest wall (muscle or bone above HEART_HU).
    z1 = np.arange(zsl[0].start, zsl[0].stop)
    z1 = z1[both[np.minimum(z1 // g[0], len(both) - 1)]]
    if not len(z1):
        return None
    ny, nx = fine.shape[1:]

    def rows_of(mask2):
        return mask2[z1 // g[0]].repeat(g[1], axis=1).repeat(g[2], axis=2)[:, :ny, :nx]

    right1, left1 = rows_of(right2), rows_of(left2)
    wall = fine[z1] > HEART_HU
    xs = np.arange(nx, dtype=np.int16)
    lo_lung, hi_lung = (right1, left1) if signs[2] > 0 else (left1, right1)
    rows = lo_lung.any(axis=2) & hi_lung.any(axis=2)
    if not rows.any():
        return None
    lo_lung, hi_lung, wall = lo_lung[rows], hi_lung[rows], wall[rows]  # (row, x) for the rows with both lungs
    lo_edge = np.argmax(lo_lung, axis=1)  # first column of the lung at low x
    hi_edge = nx - 1 - np.argmax(hi_lung[:, ::-1], axis=1)  # last column of the lung at high x
    last_wall = np.maximum.accumulate(np.where(wall, xs, np.int16(-1)), axis=1)  # last wall column at or before x
    next_wall = np.minimum.accumulate(np.where(wall, xs, np.int16(nx))[:, ::-1], axis=1)[:, ::-1]
    lo_wall = np.take_along_axis(last_wall, lo_edge[:, None], axis=1)[:, 0].astype(int)
    hi_wall = np.take_along_axis(next_wall, hi_edge[:, None], axis=1)[:, 0].astype(int)
    ok = (lo_wall >= 0) & (hi_wall < nx)
    if not ok.any():
        return None
    thorax = (hi_wall - lo_wall - 1) * spacing[2]
    thorax_mm = float(thorax[ok].max())
    if thorax_mm <= 0:
        return None
    yy, xx = np.nonzero(heart[k])
    centre = np.array([k + zsl[0].start, yy.mean() + zsl[1].start, xx.mean() + zsl[2].start])
    z_idx, y_idx, x_idx = np.nonzero(heart)
    lo = np.array([z_idx.min(), y_idx.min(), x_idx.min()]) + [s.start for s in zsl]
    hi = np.array([z_idx.max(), y_idx.max(), x_idx.max()]) + 1 + [s.start for s in zsl]
    return {"cardiothoracic_ratio": round(heart_mm / thorax_mm, 3), "heart_diameter_mm": round(heart_mm, 1),
            "thoracic_diameter_mm": round(thorax_mm, 1), "centre_voxel": centre, "bbox": (*lo, *hi),
            "mask2": heart2}


# ----------------------------------------------------------------------------------------------------------- entry point

def _envelope(lungs: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(envelope, near): the closing of the lung mask by a ball of ENVELOPE_MM, and the voxels within NEAR_LUNG_MM
    of a lung; both from the same distance transform, on a crop with room for the ball."""
    from scipy import ndimage

    envelope, near = np.zeros_like(lungs), np.zeros_like(lungs)
    if not lungs.any():
        return envelope, near
    margin = tuple(int(math.ceil(ENVELOPE_MM / s)) + 2 for s in spacing)
    sl = _bbox(lungs, margin=margin)
    distance = ndimage.distance_transform_edt(~lungs[sl], sampling=spacing)
    near[sl] = distance <= NEAR_LUNG_MM
    outside = distance > ENVELOPE_MM
    del distance
    envelope[sl] = ndimage.distance_transform_edt(~outside, sampling=spacing) > ENVELOPE_MM
    return envelope, near


def _to_full_grid(finding: Finding, factors, spacing, shape) -> Finding:
    """Detection-grid voxel locations -> full-resolution ones (block i covers voxels [i * f, (i + 1) * f))."""
    if tuple(factors) == (1, 1, 1):
        return finding
    f = np.asarray(factors, dtype=float)
    if finding.center_zyx_mm is not None:
        mm = np.asarray(finding.center_zyx_mm) + (f - 1) / 2 * spacing
        finding.center_zyx_mm = [round(float(v), 2) for v in mm]
        finding.center_voxel = [int(min(max(round(v / s), 0), n - 1)) for v, s, n in zip(mm, spacing, shape)]
    if finding.bbox_zyx is not None:
        lo, hi = np.asarray(finding.bbox_zyx[:3]), np.asarray(finding.bbox_zyx[3:])
        finding.bbox_zyx = [int(v) for v in (*(lo * f).astype(int), *np.minimum(hi * f, shape).astype(int))]
    return finding


# Working grids (mm, z then in-plane): nodules and effusions on DETECT_MM (the grid their thresholds were set on),
# body / airway / lung segmentation on SEGMENT_MM, both built by block averaging (no float64 copy of the volume).
DETECT_MM = (2.5, 1.45)
SEGMENT_MM = (2.9, 2.9)


def measure(volume: Volume) -> Findings:
    """Segment and measure; every number comes from the HU array and its spacing."""
    from scipy import ndimage

    spacing = np.asarray(volume.spacing_zyx, dtype=float)
    signs = _orientation(volume)
    hu = volume.hu
    f1 = _grid_factors(spacing, DETECT_MM)
    sp1 = spacing * f1
    g = _grid_factors(sp1, SEGMENT_MM)
    sp2 = sp1 * g
    fine = _block_mean(hu, f1)
    coarse = _block_mean(fine, g)
    body2 = segment_body(coarse)
    airways2 = segment_airways(coarse, body2, sp2, signs[0])
    right2, left2, mid2 = segment_lungs(coarse, body2, airways2, sp2, signs)
    envelope2, near_lung2 = _envelope(right2 | left2, sp2)
    mediastinum2 = _mediastinum(right2, left2)
    heart = measure_heart(fine, coarse, right2, left2, mediastinum2, g, sp1, signs)
    heart_zone2 = np.zeros_like(right2)  # the heart and ~6 mm (two coarse voxels) around it
    if heart is not None:
        hbox = _bbox(heart["mask2"], margin=(2, 2, 2))
        heart_zone2[hbox] = ndimage.binary_dilation(heart["mask2"][hbox], iterations=2)
    shape1 = fine.shape
    right1, left1, body1 = (_upsample(m, g, shape1) for m in (right2, left2, body2))
    lungs1 = right1 | left1
    mid1 = mid2 * g[2] + g[2] // 2
    # Lung volumes and %LAA-950 from detection-grid blocks: each block carries its count of full-resolution voxels
    # (edge blocks are partly padding) and of those below -950 HU, so no full-resolution mask is needed.
    per_block = float(np.prod(f1))
    inside = None
    if any(n % f for n, f in zip(hu.shape, f1)):  # share of each block inside the volume: outer product per axis
        shares = [np.minimum(f, n - np.arange(0, n, f)) / f for n, f in zip(hu.shape, f1)]
        inside = (shares[0][:, None, None] * shares[1][None, :, None] * shares[2][None, None, :]).astype(np.float32)
    low = _block_mean(hu, f1, transform=lambda slab: slab < LAA_HU) * per_block
    if inside is not None:  # edge blocks were filled by replication: keep the share that lies inside the volume
        low *= inside

    def n_voxels(mask1):
        return float(mask1.sum() * per_block if inside is None else (inside[mask1] * per_block).sum())

    voxel_ml = float(np.prod(spacing)) / 1000
    lungs_n = n_voxels(lungs1)
    n_lung = int(round(lungs_n))
    laa = 100.0 * float(low[lungs1].sum()) / lungs_n if n_lung else 0.0
    lung_volume_ml = {"right": n_voxels(right1) * voxel_ml, "left": n_voxels(left1) * voxel_ml}
    del low, inside
    frames = {"right": _lung_frame(right1, mid1, sp1[2]), "left": _lung_frame(left1, mid1, sp1[2])}
    findings: list[Finding] = []
    if n_lung:
        sl = _bbox(lungs1, margin=(2, 4, 4))
        raw = fine[sl]
        smooth = ndimage.gaussian_filter(raw, _sigma_vox(0.7, sp1))
        envelope = _upsample(envelope2, g, shape1)[sl]
        consolidations, consolidated = detect_consolidation(
            fine, coarse, right2 | left2, _lung_hulls(right2, left2), airways2, heart_zone2,
            g, sp1, signs, frames, mid1)
        nodules = detect_nodules(smooth, raw, lungs1[sl], envelope, sp1, signs, frames, mid1, [s.start for s in sl])
        # A dense focus inside a consolidation is part of it, not a nodule.
        findings += consolidations + [f for f in nodules if not _inside_any(f.center_voxel, consolidated)]
        del smooth, raw
    del coarse, heart_zone2
    # Contact with the lung and the mediastinum come from the segmentation grid (the contact test is a loose 2 %
    # share, and the mediastinum only decides where a fluid region's centre lies).
    findings += detect_effusions(fine, right1, left1, body1, sp1, signs, mid1, _upsample(near_lung2, g, shape1),
                                 _upsample(mediastinum2, g, shape1))
    heart_summary = None
    if heart is not None:
        ratio = heart["cardiothoracic_ratio"]
        heart_summary = {k: heart[k] for k in ("cardiothoracic_ratio", "heart_diameter_mm", "thoracic_diameter_mm")}
        if ratio > CARDIOMEGALY_CTR:
            centre = heart["centre_voxel"]
            findings.append(Finding(type="cardiomegaly",
                                    center_zyx_mm=[round(float(c * s), 2) for c, s in zip(centre, sp1)],
                                    center_voxel=[int(round(c)) for c in centre],
                                    bbox_zyx=[int(v) for v in heart["bbox"]],
                                    extra={"cardiothoracic_ratio": ratio}))
    findings = [_to_full_grid(f, f1, spacing, hu.shape) for f in findings]
    if laa >= EMPHYSEMA_REPORT_PERCENT:
        findings.append(Finding(type="emphysema", side="bilateral", laa950_percent=round(laa, 2)))
    masks = FullResolutionMasks(hu.shape, tuple(a * b for a, b in zip(f1, g)),
                                {"body": body2, "lungs": right2 | left2, "airways": airways2})
    return Findings(findings=findings, lung_volume_ml=lung_volume_ml, laa950_percent=laa, masks=masks,
                    heart=heart_summary)
