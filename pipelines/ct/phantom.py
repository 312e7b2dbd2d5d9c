"""Synthetic chest CT phantoms with known findings, deterministic by seed.

The anatomy is analytic (ellipses, tubes, ellipsoids in millimetres) and rendered slice by slice with partial-volume
edges (each voxel gets the fraction of it a shape covers), a scanner point-spread blur, and correlated noise with a
filtered-back-projection-like power spectrum (ramp times apodisation), so measurements face realistic edges, vessels
that look like nodules in one slice, and noise that is not white.

Frames: array index (k, j, i) = (z, y, x); slice 0 is the most inferior (ascending along the slice normal, as ingest
sorts). `center_zyx_mm` is in mm from the centre of voxel (0, 0, 0). Patient frame LPS (+x = patient left).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.ct.anatomy import lobe_of
from pipelines.ct.errors import PhantomError
from pipelines.ct.volume import SeriesMetadata, Volume

HILUM_CLEAR_MM = 35.0  # nodules are placed at least this far (plus their radius) from each hilum
FINDING_TYPES = ("nodule", "pleural_effusion", "pericardial_effusion", "emphysema", "consolidation", "cardiomegaly",
                 "calcified_granuloma")
# Probability that a seed-drawn phantom carries each finding type (the realistic mix used without --findings).
FINDING_RATES = {"nodule": 0.6, "pleural_effusion": 0.25, "pericardial_effusion": 0.1, "emphysema": 0.25,
                 "consolidation": 0.15, "cardiomegaly": 0.15, "calcified_granuloma": 0.2}
HU = {"air": -1000.0, "fat": -95.0, "muscle": 48.0, "blood": 40.0, "fluid": 8.0, "liver": 60.0, "spleen": 45.0,
      "bone": 450.0, "cortex": 800.0, "cartilage": 120.0, "lung": -865.0, "emphysema": -980.0, "table": 150.0}


@dataclass
class PhantomConfig:
    size: int = 512  # in-plane matrix (pixels)
    slices: int = 128
    thickness_mm: float = 2.5  # slice thickness = spacing between slices
    fov_mm: float = 360.0  # reconstruction field of view; pixel spacing = fov / size
    noise_hu: float = 18.0  # noise standard deviation (HU)
    psf_mm: float = 0.6  # Gaussian sigma of the scanner point-spread function (mm)

    def validate(self) -> None:
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size: expected 32..1024 pixels, found {self.size}")
        if not 8 <= self.slices <= 1024:
            raise ValueError(f"slices: expected 8..1024, found {self.slices}")
        if not 0.5 <= self.thickness_mm <= 10:
            raise ValueError(f"thickness_mm: expected 0.5..10 mm, found {self.thickness_mm}")
        if not 200 <= self.fov_mm <= 600:
            raise ValueError(f"fov_mm: expected 200..600 mm, found {self.fov_mm}")
        if self.noise_hu < 0 or self.psf_mm < 0:
            raise ValueError("noise_hu and psf_mm must be >= 0")

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / self.size


@dataclass
class Phantom:
    volume: Volume
    ground_truth: dict
    lung_mask: np.ndarray = field(repr=False)  # (Z, Y, X) bool, the true lung (airway lumen excluded)


# ----------------------------------------------------------------------------------------------------------- shapes

def _occupancy(signed_mm: np.ndarray, width_mm) -> np.ndarray:
    """Fraction of a voxel inside a shape from the signed distance of its centre (negative inside), box-filter model."""
    return np.clip(0.5 - signed_mm / width_mm, 0.0, 1.0)


def _ellipse_sd(x, y, cx, cy, ax, ay):
    """Approximate signed distance (mm) to an axis-aligned ellipse (first-order: (q - 1) / |grad q|)."""
    dx, dy = (x - cx) / ax, (y - cy) / ay
    q = np.sqrt(dx * dx + dy * dy) + 1e-9
    grad = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2) / q + 1e-9
    return (q - 1.0) / grad


def _paint(hu, occ, value, *masks):
    """Alpha-blend `value` with coverage `occ` into `hu`; the same coverage is removed from every tracked mask."""
    hu *= 1.0 - occ
    hu += occ * value
    for m in masks:
        m *= 1.0 - occ


@dataclass
class Segment:
    p0: np.ndarray  # (x, y, z) mm
    p1: np.ndarray
    radius: float  # mm


def _grow_tree(rng, start, direction, radius, min_radius, inside, out: list, depth=0):
    """Bifurcating tube tree: children turn 20-40 degrees and thin by ~0.78; growth stops outside the lung."""
    direction = direction / np.linalg.norm(direction)
    length = float(np.clip(7.0 * radius * rng.uniform(0.8, 1.2), 6.0, 45.0))
    end = start + direction * length
    steps = np.linspace(0.25, 1.0, 4)
    ok = [inside(start + direction * length * s) for s in steps]
    if not ok[0]:
        return
    if not all(ok):
        end = start + direction * length * steps[max(i for i, v in enumerate(ok) if v) if any(ok) else 0]
    out.append(Segment(start, end, radius))
    if radius * 0.78 < min_radius or depth > 9 or not all(ok):
        return
    for sign in (-1, 1):
        axis = np.cross(direction, rng.normal(size=3))
        axis /= np.linalg.norm(axis) + 1e-9
        angle = math.radians(rng.uniform(20, 40)) * sign
        # Rodrigues rotation of the parent direction about a random perpendicular axis
        child = (direction * math.cos(angle) + np.cross(axis, direction) * math.sin(angle)
                 + axis * np.dot(axis, direction) * (1 - math.cos(angle)))
        _grow_tree(rng, end, child, radius * rng.uniform(0.72, 0.84), min_radius, inside, out, depth + 1)


# ----------------------------------------------------------------------------------------------------------- anatomy

class ChestModel:
    """Analytic chest drawn from a seed. Heights are fractions t of the scan (0 = bottom slice, 1 = top slice)."""

    def __init__(self, cfg: PhantomConfig, rng: np.random.Generator, findings: dict):
        self.cfg, self.rng = cfg, rng
        self.extent_z = cfg.slices * cfg.thickness_mm
        self.body_ax = rng.uniform(150, 172)
        self.body_ay = rng.uniform(108, 122)
        self.body_cy = rng.uniform(-6, 6)
        self.fat = rng.uniform(8, 22)  # subcutaneous fat thickness (mm)
        self.muscle = rng.uniform(9, 14)
        self.cav_ax = self.body_ax - self.fat - self.muscle
        self.cav_ay = self.body_ay - self.fat - self.muscle
        self.lung_cx = self.cav_ax * 0.52
        self.lung_ax = self.cav_ax * 0.42
        self.lung_ay = self.cav_ay * 0.86
        self.lung_cy = self.body_cy - self.cav_ay * 0.06
        self.dome = {"right": rng.uniform(0.24, 0.3), "left": rng.uniform(0.19, 0.24)}  # diaphragm dome heights
        self.apex_t = rng.uniform(0.93, 0.99)
        self.spine_y = self.body_cy + self.cav_ay - 18
        self.heart_scale = findings.get("cardiomegaly", 1.0)
        if self.heart_scale > 1:  # cardiomegaly: cardiothoracic ratio above 0.5 whatever the chest width
            self.heart_scale = max(self.heart_scale, 0.53 * self.cav_ax / 52.0)
        self.heart = dict(cx=rng.uniform(12, 22), cy=self.body_cy - self.cav_ay * 0.25, t=rng.uniform(0.3, 0.36),
                          ax=52.0 * self.heart_scale, ay=42.0 * self.heart_scale, az=48.0 * min(self.heart_scale, 1.15))
        self.carina_t = 0.6
        self.lung_texture = rng.normal(size=(10, 12, 12)).astype(np.float32)

    # Lung shape: an ellipse per side that narrows to the apex and is cut from below by a diaphragm dome.
    def lung_axes(self, t: float) -> tuple[float, float]:
        top = max(self.apex_t - t, 0.0) / max(self.apex_t - 0.65, 1e-3)
        scale = math.sqrt(min(top, 1.0))
        return self.lung_ax * (0.55 + 0.45 * scale) * (scale > 0), self.lung_ay * (0.45 + 0.55 * scale) * (scale > 0)

    def dome_t(self, side: str, x, y):
        sx = -1 if side == "right" else 1
        rx = (x - sx * self.lung_cx) / self.lung_ax
        ry = (y - self.lung_cy) / self.lung_ay
        return self.dome[side] - 0.12 * (rx * rx + ry * ry) - 0.05 * np.clip(ry, 0, None)

    def heart_axes_at(self, z_mm: float):
        h = self.heart
        dz = (z_mm - h["t"] * self.extent_z) / h["az"]
        if abs(dz) >= 1:
            return None
        s = math.sqrt(1 - dz * dz)
        return h["ax"] * s, h["ay"] * s

    def inside_lung(self, p, margin: float = 0.0) -> bool:
        """Point (x, y, z mm) inside a lung shape by at least `margin` mm, clear of heart and midline structures."""
        x, y, z = p
        t = z / self.extent_z
        side = "right" if x < 0 else "left"
        ax, ay = self.lung_axes(t)
        if ax <= margin or ay <= margin:
            return False
        sx = -1 if side == "right" else 1
        if float(_ellipse_sd(np.float64(x), np.float64(y), sx * self.lung_cx, self.lung_cy, ax, ay)) > -margin:
            return False
        if t - float(self.dome_t(side, x, y)) < margin / self.extent_z + 0.01:
            return False
        if abs(x) < 22 + margin:
            return False
        heart = self.heart_axes_at(z)
        if heart is not None:
            h = self.heart
            if float(_ellipse_sd(np.float64(x), np.float64(y), h["cx"], h["cy"], heart[0] + 8, heart[1] + 8)) < margin:
                return False
        return True


# ----------------------------------------------------------------------------------------------------------- findings

def draw_findings(rng: np.random.Generator, forced: list[str] | None) -> dict:
    """Which findings this phantom carries and their size parameters (positions are placed later)."""
    if forced is None:
        chosen = [t for t in FINDING_TYPES if rng.random() < FINDING_RATES[t]]
        if not chosen and rng.random() < 0.6:  # most phantoms carry at least one finding
            chosen = [str(rng.choice(["nodule", "nodule", "pleural_effusion", "emphysema"]))]
    else:
        chosen = list(forced)
    spec: dict = {}
    for kind in chosen:
        if kind == "nodule":
            n = int(rng.choice([1, 1, 1, 2, 2, 3]))
            spec["nodule"] = [dict(diameter=float(np.exp(rng.uniform(np.log(3.5), np.log(28)))),
                                   composition=str(rng.choice(["solid", "solid", "solid", "part-solid", "ground-glass"])),
                                   elongation=float(rng.uniform(1.0, 1.3)), angle=float(rng.uniform(0, np.pi)))
                              for _ in range(n)]
        elif kind == "calcified_granuloma":
            spec["calcified_granuloma"] = [dict(diameter=float(rng.uniform(3, 7)), composition="calcified",
                                                elongation=1.0, angle=0.0) for _ in range(int(rng.integers(1, 3)))]
        elif kind == "pleural_effusion":
            sides = [str(rng.choice(["right", "left"]))] if rng.random() < 0.7 else ["right", "left"]
            spec["pleural_effusion"] = [dict(side=s, depth=float(rng.uniform(18, 55)), height=float(rng.uniform(0.2, 0.45)))
                                        for s in sides]
        elif kind == "pericardial_effusion":
            spec["pericardial_effusion"] = dict(thickness=float(rng.uniform(6, 16)))
        elif kind == "emphysema":
            spec["emphysema"] = dict(fraction=float(rng.uniform(0.06, 0.35)), upper=float(rng.uniform(0.3, 1.0)))
        elif kind == "consolidation":
            spec["consolidation"] = dict(lobe=str(rng.choice(["RUL", "RML", "RLL", "LUL", "LLL"])),
                                         radius=float(rng.uniform(14, 26)))
        elif kind == "cardiomegaly":
            spec["cardiomegaly"] = float(rng.uniform(1.22, 1.38))
        else:
            raise PhantomError(f"findings: unknown type {kind!r}; expected one of {', '.join(FINDING_TYPES)} or none")
    return spec


def parse_findings(text: str | None) -> list[str] | None:
    """`--findings` value -> list of types (None = draw from the seed, [] = normal chest)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["none"]:
        return []
    bad = [t for t in items if t not in FINDING_TYPES]
    if bad or not items:
        raise PhantomError(f"--findings: unknown type(s) {bad or [text]}; expected a comma list of "
                           f"{', '.join(FINDING_TYPES)}, or none")
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------------------------------------- noise

def _noise_filter(size: int, pixel_mm: float) -> np.ndarray:
    """Amplitude filter for FBP-like noise: NPS ~ f * exp(-(f/f0)^2), peaking at mid frequencies (not white)."""
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2) / pixel_mm  # cycles/mm
    f0 = 0.35  # cycles/mm: a standard soft-tissue kernel
    nps = f * np.exp(-(f / f0) ** 2)
    amp = np.sqrt(nps)
    amp /= np.sqrt((amp ** 2).sum() * 2 / (size * size))  # unit variance after irfft2
    return amp.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------- render

def make_phantom(seed: int, findings: list[str] | None = None, cfg: PhantomConfig | None = None) -> Phantom:
    """Render a chest CT with the given findings (None = a seed-drawn realistic mix, [] = normal)."""
    import cv2
    from scipy import ndimage

    cfg = cfg or PhantomConfig()
    cfg.validate()
    rng = np.random.default_rng(seed)
    spec = draw_findings(rng, findings)
    chest = ChestModel(cfg, rng, {"cardiomegaly": spec.get("cardiomegaly", 1.0)})
    n, size, px, dz = cfg.slices, cfg.size, cfg.pixel_mm, cfg.thickness_mm
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * px
    X, Y = np.meshgrid(coords, coords)  # (Y, X) grids in mm, LPS
    zs = np.arange(n) * dz

    # Vessel and airway trees per lung, from each hilum.
    vessels: list[Segment] = []
    airways: list[Segment] = []
    hilum_t = 0.5
    for side, sx in (("right", -1), ("left", 1)):
        hilum = np.array([sx * 40.0, chest.lung_cy - 5, hilum_t * chest.extent_z])
        for d in ([0.2 * sx, -0.2, 1.0], [0.3 * sx, 0.5, -1.0], [1.0 * sx, -0.4, -0.3], [0.8 * sx, 0.3, 0.4],
                  [0.5 * sx, -0.8, -0.5]):
            _grow_tree(rng, hilum + np.array([sx * 8, 0, 0]), np.array(d, float), rng.uniform(3.0, 3.8), 0.55,
                       lambda p: chest.inside_lung(p, 1.0) or abs(p[0]) < 50, vessels)
        main = np.array([sx * 30.0, chest.lung_cy - 12, (hilum_t + 0.02) * chest.extent_z])
        carina = np.array([0.0, chest.lung_cy - 14, chest.carina_t * chest.extent_z])
        airways.append(Segment(carina, main, 7.0 if side == "right" else 6.0))
        for d in ([0.3 * sx, -0.1, 1.0], [0.4 * sx, 0.6, -1.0], [1.0 * sx, -0.5, -0.4]):
            _grow_tree(rng, main, np.array(d, float), 4.0, 1.6, lambda p: chest.inside_lung(p, 2.0) or abs(p[0]) < 45,
                       airways)

    consolidation = None
    if "consolidation" in spec:
        c = spec["consolidation"]
        side = "right" if c["lobe"].startswith("R") else "left"
        for _ in range(2000):
            p = np.array([rng.uniform(-chest.cav_ax, chest.cav_ax), rng.uniform(-chest.cav_ay, chest.cav_ay),
                          rng.uniform(0.1, 0.95) * chest.extent_z])
            if (p[0] > 0) == (side == "left") and chest.inside_lung(p, 8):
                # Overlapping blobs make an irregular airspace opacity; straight air tubes through it are the
                # air bronchograms that tell consolidation from a mass.
                bronchi = []
                for _ in range(3):
                    direction = rng.normal(size=3)
                    direction /= np.linalg.norm(direction)
                    bronchi.append(Segment(p - direction * c["radius"], p + direction * c["radius"],
                                           float(rng.uniform(1.3, 2.0))))
                consolidation = dict(center=p, radius=c["radius"], bronchi=bronchi,
                                     blobs=[p + rng.normal(scale=c["radius"] * 0.3, size=3) for _ in range(5)])
                break
    pleural = {e["side"]: e for e in spec.get("pleural_effusion", [])}

    def clear_spot(p, r):
        """Keep lesions out of effusions, consolidation and the hila, so their ground truth stays a parenchymal nodule."""
        side = "left" if p[0] > 0 else "right"
        e = pleural.get(side)
        if e is not None and p[2] / chest.extent_z < chest.dome[side] - 0.1 + e["height"] + 0.05 \
                and p[1] > chest.lung_cy + chest.lung_ay * 0.2 - e["depth"] - r - 10:
            return False
        if consolidation is not None and np.linalg.norm(p - consolidation["center"]) < consolidation["radius"] * 2 + r:
            return False
        # Parenchymal nodules only: the hila (lobar vessels and bronchi entering the lung) are kept clear.
        for sx in (-1, 1):
            if np.linalg.norm(p - np.array([sx * 40.0, chest.lung_cy - 5, hilum_t * chest.extent_z])) < HILUM_CLEAR_MM + r:
                return False
        return True

    # Place nodules and granulomas inside the lungs, clear of each other.
    lesions = []
    for kind in ("nodule", "calcified_granuloma"):
        for les in spec.get(kind, []):
            r = les["diameter"] / 2
            for _ in range(400):
                p = np.array([rng.uniform(-chest.cav_ax, chest.cav_ax), rng.uniform(-chest.cav_ay, chest.cav_ay),
                              rng.uniform(0.15, 0.95) * chest.extent_z])
                if chest.inside_lung(p, r + 6) and clear_spot(p, r) and all(np.linalg.norm(p - o["center"]) > r + o["diameter"] / 2 + 10
                                                       for o in lesions):
                    lesions.append({**les, "type": kind, "center": p})
                    break
    emph = spec.get("emphysema")
    emph_field = rng.normal(size=(12, 16, 16)).astype(np.float32) if emph else None
    if emph:
        small = ndimage.gaussian_filter(emph_field, 1.0)
        # Upper-lobe predominance: raise the field towards the apex before thresholding.
        small += emph["upper"] * np.linspace(-0.6, 0.6, small.shape[0])[:, None, None] * small.std()
        emph_field = small
        emph_threshold = float(np.quantile(small, 1 - emph["fraction"]))
    peri = spec.get("pericardial_effusion")

    hu_vol = np.empty((n, size, size), dtype=np.int16)
    lung_mask = np.zeros((n, size, size), dtype=bool)
    acc = {"pleural_right": 0.0, "pleural_left": 0.0, "pericardial": 0.0, "consolidation": 0.0}
    lesion_vox = [0.0] * len(lesions)
    noise_amp = _noise_filter(size, px)
    psf_px = cfg.psf_mm / px
    prev_noise = None
    seg_boxes = _segment_slices(vessels + airways, zs, dz)
    # Everything that does not change along z is drawn once.
    static = np.full((size, size), HU["air"], dtype=np.float32)
    table_y = chest.body_cy + chest.body_ay + 14  # patient table: a curved carbon slab under the back
    _paint(static, _occupancy(np.abs(Y - table_y - 0.0004 * X * X) - 4.0, px) * (np.abs(X) < 210), HU["table"])
    _paint(static, _occupancy(_ellipse_sd(X, Y, 0, chest.body_cy, chest.body_ax, chest.body_ay), px), HU["fat"])
    _paint(static, _occupancy(_ellipse_sd(X, Y, 0, chest.body_cy, chest.body_ax - chest.fat,
                                          chest.body_ay - chest.fat), px), HU["muscle"])
    cav_sd = _ellipse_sd(X, Y, 0, chest.body_cy, chest.cav_ax, chest.cav_ay)
    cavity = _occupancy(cav_sd, px)
    theta = np.arctan2(X, -(Y - chest.body_cy))  # 0 = anterior midline
    rib_shift = 18.0 * np.abs(np.sin(theta)) + 30.0 * (1 - np.cos(theta))
    rib_shell = _occupancy(np.abs(cav_sd - 5.0) - 4.0, px) * (np.abs(theta) > 0.25)
    rib_value = np.where(np.abs(theta) < 0.6, HU["cartilage"], HU["bone"]).astype(np.float32)
    sy = chest.spine_y
    fixed = {
        "vertebra": _occupancy(np.hypot(X, Y - sy) - 19, px), "marrow": _occupancy(np.hypot(X, Y - sy) - 16.5, px),
        "arch": _occupancy(np.hypot(X, Y - sy - 30) - 11, px), "canal": _occupancy(np.hypot(X, Y - sy - 30) - 7, px),
        "descending_aorta": _occupancy(np.hypot(X - 24, Y - sy + 24) - 12, px),
        "oesophagus": _occupancy(np.hypot(X - 6, Y - sy + 34) - 8, px),
        "sternum": _occupancy(_ellipse_sd(X, Y, 0, chest.body_cy - chest.cav_ay - 4, 17, 7), px),
        "ascending_aorta": _occupancy(np.hypot(X + 12, Y - chest.heart["cy"] + 8) - 15, px),
        "aortic_arch": _occupancy(_ellipse_sd(X, Y, 6, (chest.heart["cy"] + sy) / 2, 26, 36), px),
        "pulmonary_trunk": _occupancy(_ellipse_sd(X, Y, 10, chest.lung_cy - 14, 34, 14), px),
        "trachea_wall": _occupancy(np.hypot(X, Y - chest.lung_cy + 14) - 11, px),
        "trachea_lumen": _occupancy(np.hypot(X, Y - chest.lung_cy + 14) - 9, px),
    }
    for k, z in enumerate(zs):
        t = z / chest.extent_z
        hu = static.copy()
        # Ribs: oblique bands in the chest wall, crossing each axial slice as arcs; costal cartilage anteriorly.
        _paint(hu, rib_shell * ((((z + rib_shift) / 26.0) % 1.0) < 0.38), rib_value)
        _paint(hu, cavity, HU["fat"])  # mediastinal / thoracic fat; lungs and organs are painted over it
        # Mediastinum, spine and heart: computed first because they carve the lungs, painted after them.
        disc = ((z / 26.0) % 1.0) < 0.2
        med: list[tuple[np.ndarray, float]] = [(fixed["vertebra"], HU["muscle"] + 40 if disc else HU["cortex"])]
        if not disc:
            med.append((fixed["marrow"], 230.0))
        med += [(fixed["arch"], HU["bone"]), (fixed["canal"], 25.0), (fixed["descending_aorta"], HU["blood"]),
                (fixed["oesophagus"], 35.0)]
        if 0.35 < t < 0.95:
            med.append((fixed["sternum"], 300.0))
        if t > chest.heart["t"] + 0.12:
            med.append((fixed["ascending_aorta"], HU["blood"]))
            if abs(t - 0.7) < 0.04:
                med.append((fixed["aortic_arch"], HU["blood"]))
        if abs(t - hilum_t) < 0.06:
            med.append((fixed["pulmonary_trunk"], HU["blood"]))
        if t > chest.carina_t:
            med += [(fixed["trachea_wall"], 30.0), (fixed["trachea_lumen"], HU["air"])]
        heart = chest.heart_axes_at(z)
        peri_layer = None
        if heart is not None:  # pericardial fat, optional pericardial fluid, epicardial fat, heart
            h = chest.heart
            th = peri["thickness"] if peri else 0.0
            layers = [(th + 7, HU["fat"])] + ([(th + 3, HU["fluid"])] if peri else []) + [(3, HU["fat"]), (0, HU["blood"])]
            occs = [_occupancy(_ellipse_sd(X, Y, h["cx"], h["cy"], heart[0] + g, heart[1] + g), px) for g, _ in layers]
            med.extend(zip(occs, [v for _, v in layers]))
            if peri:
                peri_layer = occs[1] * (1 - occs[2])
        blocked = np.zeros_like(hu)
        for occ, _ in med:
            np.maximum(blocked, occ, out=blocked)
        # Lungs, with the upper abdomen under each diaphragm dome (liver right, spleen left).
        lung = np.zeros_like(hu)
        for side, sx in (("right", -1), ("left", 1)):
            ax, ay = chest.lung_axes(t)
            if ax <= 0:
                continue
            shape = _occupancy(_ellipse_sd(X, Y, sx * chest.lung_cx, chest.lung_cy, ax, ay), px)
            above = np.clip((t - chest.dome_t(side, X, Y)) * chest.extent_z / dz + 0.5, 0, 1)
            lung += shape * above * cavity * (1 - blocked)
            organ = shape * (1 - above) * cavity * ((X < 0) if side == "right" else (X >= 0))
            _paint(hu, organ, HU["liver"] if side == "right" else HU["spleen"])
        lung = np.clip(lung, 0, 1)
        gravity = 45.0 * np.clip((Y - chest.lung_cy) / chest.lung_ay, -1, 1)  # dependent lung is denser
        tex = cv2.resize(chest.lung_texture[min(int(t * 9.99), 9)], (size, size), interpolation=cv2.INTER_CUBIC)
        lung_hu = HU["lung"] + gravity + 12.0 * tex
        if emph:
            f = _field_slice(emph_field, t, size, cv2)
            emph_occ = np.clip((f - emph_threshold) / (0.15 * emph_field.std()) + 0.5, 0, 1)
            lung_hu = lung_hu * (1 - emph_occ) + (HU["emphysema"] + 8.0 * tex) * emph_occ
        hu *= 1 - lung
        hu += lung * lung_hu
        # Pleural effusion: dependent fluid layer in the posterior costophrenic region, replacing lung.
        for side, e in pleural.items():
            sx = -1 if side == "right" else 1
            base = chest.dome[side] - 0.1
            depth = e["depth"] * np.clip(1 - (t - base) / e["height"], 0, 1)
            if depth <= 0:
                continue
            ax, ay = chest.lung_axes(t)
            post = chest.lung_cy + ay - depth * (1 + 0.25 * np.abs((X - sx * chest.lung_cx) / max(ax, 1)))
            fluid = _occupancy(post - Y, px) * ((X < 0) if side == "right" else (X >= 0)) * lung
            _paint(hu, fluid, HU["fluid"], lung)
            acc[f"pleural_{side}"] += float(fluid.sum())
        if consolidation is not None:
            d = np.min([np.sqrt((X - b[0]) ** 2 + (Y - b[1]) ** 2 + (z - b[2]) ** 2) for b in consolidation["blobs"]],
                       axis=0)
            cons_occ = _occupancy(d - consolidation["radius"] * 0.8, px) * lung
            cons_occ *= (X >= 0) if consolidation["center"][0] > 0 else (X < 0)
            _paint(hu, cons_occ, HU["blood"] - 5)
            acc["consolidation"] += float(cons_occ.sum())
        for occ, value in med:
            _paint(hu, occ, value, lung)
        if peri_layer is not None:
            acc["pericardial"] += float(peri_layer.sum())
        # Airway and vessel trees inside the lungs.
        inside = np.clip(lung * 3, 0, 1)
        for idx in seg_boxes[k]:
            seg = (vessels + airways)[idx]
            is_airway = idx >= len(vessels)
            sub = _segment_patch(seg, X, Y, z, px, dz, wall=1.2 if is_airway else 0.0)
            if sub is None:
                continue
            sl, occ_outer, occ_inner = sub
            if is_airway:
                gate = 1.0 if seg.radius >= 5.5 else inside[sl]  # main bronchi run through the mediastinum
                _paint(hu[sl], occ_outer * gate, 20.0)
                lumen = occ_inner * gate
                _paint(hu[sl], lumen, HU["air"], lung[sl])  # airway lumen is not lung parenchyma
            else:
                _paint(hu[sl], occ_outer * inside[sl], HU["blood"])
        if consolidation is not None:  # the consolidation hides vessels; its bronchi stay air-filled
            hu = np.where((cons_occ > 0.5) & (hu > -900), np.maximum(hu, HU["blood"] - 5), hu)
            for seg in consolidation["bronchi"]:
                sub = _segment_patch(seg, X, Y, z, px, dz, wall=0.0)
                if sub is not None:
                    sl, occ, _ = sub
                    _paint(hu[sl], occ * (cons_occ[sl] > 0.5), HU["air"])
        # Nodules and granulomas: ellipsoids with partial volume; part-solid ones get a solid core.
        for li, les in enumerate(lesions):
            patch = _lesion_patch(les, X, Y, z, px, dz)
            if patch is None:
                continue
            sl, occ, occ_core = patch
            if les["type"] == "calcified_granuloma":
                value = 700.0
            elif les["composition"] == "solid":
                value = 30.0
            else:
                value = -600.0
            _paint(hu[sl], occ, value)
            if les["composition"] == "part-solid":
                _paint(hu[sl], occ_core, 25.0)
            lesion_vox[li] += float(occ.sum())
        lung_mask[k] = lung > 0.5
        # Scanner blur, then correlated noise (slightly correlated between neighbouring slices too).
        if psf_px > 0.05:
            hu = cv2.GaussianBlur(hu, (0, 0), psf_px)
        if cfg.noise_hu > 0:
            white = rng.standard_normal((size, size), dtype=np.float32)
            noise = np.fft.irfft2(np.fft.rfft2(white) * noise_amp, s=(size, size)).astype(np.float32)
            if prev_noise is not None:
                noise = 0.85 * noise + 0.527 * prev_noise  # 0.85^2 + 0.527^2 = 1: same variance, rho = 0.53
            prev_noise = noise
            hu += cfg.noise_hu * noise
        hu_vol[k] = np.clip(np.rint(hu), -1024, 3071)

    voxel_ml = px * px * dz / 1000.0
    truth = _ground_truth(chest, cfg, spec, lesions, lesion_vox, acc, voxel_ml, lung_mask, hu_vol, consolidation, peri)
    meta = _fake_identity(seed, rng, cfg)
    origin = (-(size - 1) / 2 * px, -(size - 1) / 2 * px, -200.0)
    volume = Volume(hu=hu_vol, spacing_zyx=(dz, px, px), origin_lps=origin, metadata=meta)
    from pipelines.ct.reference_report import reference_report

    truth["report"] = reference_report(truth["findings"], meta, cfg, np.random.default_rng(seed + 7919))
    return Phantom(volume=volume, ground_truth=truth, lung_mask=lung_mask)


def _field_slice(field, t, size, cv2):
    zf = t * (field.shape[0] - 1)
    k0 = int(np.floor(zf))
    k1 = min(k0 + 1, field.shape[0] - 1)
    w = zf - k0
    plane = field[k0] * (1 - w) + field[k1] * w
    return cv2.resize(plane, (size, size), interpolation=cv2.INTER_CUBIC)


def _segment_slices(segments: list[Segment], zs: np.ndarray, dz: float) -> list[list[int]]:
    out = [[] for _ in zs]
    for idx, s in enumerate(segments):
        lo = min(s.p0[2], s.p1[2]) - s.radius - 2.5 - dz
        hi = max(s.p0[2], s.p1[2]) + s.radius + 2.5 + dz
        for k in np.nonzero((zs >= lo) & (zs <= hi))[0]:
            out[k].append(idx)
    return out


def _box(X, Y, px, xmin, xmax, ymin, ymax):
    size = X.shape[0]
    x0 = X[0, 0]
    i0, i1 = int(max((xmin - x0) / px - 1, 0)), int(min((xmax - x0) / px + 2, size))
    j0, j1 = int(max((ymin - x0) / px - 1, 0)), int(min((ymax - x0) / px + 2, size))
    if i1 <= i0 or j1 <= j0:
        return None
    return np.s_[j0:j1, i0:i1]


def _segment_patch(seg: Segment, X, Y, z, px, dz, wall: float):
    """Coverage of a tube (and its lumen when `wall` > 0) on one slice, in the tube's bounding box."""
    r_out = seg.radius + wall
    lo, hi = np.minimum(seg.p0, seg.p1) - r_out - 1, np.maximum(seg.p0, seg.p1) + r_out + 1
    if z < lo[2] - dz or z > hi[2] + dz:
        return None
    sl = _box(X, Y, px, lo[0], hi[0], lo[1], hi[1])
    if sl is None:
        return None
    x, y = X[sl], Y[sl]
    d = seg.p1 - seg.p0
    L2 = float(d @ d) + 1e-9
    s = np.clip(((x - seg.p0[0]) * d[0] + (y - seg.p0[1]) * d[1] + (z - seg.p0[2]) * d[2]) / L2, 0, 1)
    vx, vy, vz = x - seg.p0[0] - s * d[0], y - seg.p0[1] - s * d[1], z - seg.p0[2] - s * d[2]
    dist = np.sqrt(vx * vx + vy * vy + vz * vz) + 1e-6
    # Box-filter width along the surface normal: a slice is thick in z, so tubes lying in-plane blur more.
    width = np.sqrt((px * vx / dist) ** 2 + (px * vy / dist) ** 2 + (dz * vz / dist) ** 2)
    outer = _occupancy(dist - r_out, width)
    inner = _occupancy(dist - seg.radius, width) if wall > 0 else None
    return sl, outer, inner


def _lesion_patch(les, X, Y, z, px, dz):
    c = les["center"]
    a = les["diameter"] / 2 * les["elongation"] ** 0.5  # long in-plane semi-axis
    b = les["diameter"] / 2 / les["elongation"] ** 0.5  # short in-plane semi-axis; (a + b) / 2 ~ diameter / 2
    cz = les["diameter"] / 2
    if abs(z - c[2]) > cz + dz:
        return None
    sl = _box(X, Y, px, c[0] - a - 2, c[0] + a + 2, c[1] - a - 2, c[1] + a + 2)
    if sl is None:
        return None
    ca, sa = math.cos(les["angle"]), math.sin(les["angle"])
    u = (X[sl] - c[0]) * ca + (Y[sl] - c[1]) * sa
    v = -(X[sl] - c[0]) * sa + (Y[sl] - c[1]) * ca
    w = np.float32(z - c[2])

    def coverage(scale):
        q = np.sqrt((u / (a * scale)) ** 2 + (v / (b * scale)) ** 2 + (w / (cz * scale)) ** 2) + 1e-9
        gu, gv, gw = u / (a * scale) ** 2 / q, v / (b * scale) ** 2 / q, w / (cz * scale) ** 2 / q
        g = np.sqrt(gu * gu + gv * gv + gw * gw) + 1e-9
        width = np.sqrt((px * gu / g) ** 2 + (px * gv / g) ** 2 + (dz * gw / g) ** 2)
        return _occupancy((q - 1) / g, width)

    core = coverage(0.5) if les["composition"] == "part-solid" else None
    return sl, coverage(1.0), core


def _lung_frame(lung_mask: np.ndarray, side_sel: np.ndarray):
    zz, yy, _ = np.nonzero(lung_mask & side_sel)
    return (int(yy.min()), int(yy.max()), int(zz.min()), int(zz.max())) if len(zz) else None


def _lobe_at(frames, side, zyx_vox):
    f = frames.get(side)
    if f is None:
        return None
    y0, y1, z0, z1 = f
    return lobe_of(side, (zyx_vox[1] - y0) / max(y1 - y0, 1), (zyx_vox[0] - z0) / max(z1 - z0, 1))


def _ground_truth(chest, cfg, spec, lesions, lesion_vox, acc, voxel_ml, lung_mask, hu_vol, consolidation, peri):
    size, px, dz = cfg.size, cfg.pixel_mm, cfg.thickness_mm
    half = (size - 1) / 2 * px
    xs = (np.arange(size) - (size - 1) / 2) * px
    right_sel = (xs < 0)[None, None, :]
    frames = {"right": _lung_frame(lung_mask, right_sel), "left": _lung_frame(lung_mask, ~right_sel)}

    def zyx_mm(p):
        return [round(float(p[2]), 2), round(float(p[1] + half), 2), round(float(p[0] + half), 2)]

    def zyx_vox(p):
        return (p[2] / dz, (p[1] + half) / px, (p[0] + half) / px)

    findings = []
    for les, vox in zip(lesions, lesion_vox):
        side = "left" if les["center"][0] > 0 else "right"
        a = les["diameter"] / 2 * les["elongation"] ** 0.5
        b = les["diameter"] / 2 / les["elongation"] ** 0.5
        item = {"type": les["type"], "side": side, "lobe": _lobe_at(frames, side, zyx_vox(les["center"])),
                "diameter_mm": round(a + b, 2), "long_axis_mm": round(2 * a, 2), "short_axis_mm": round(2 * b, 2),
                "volume_ml": round(4 / 3 * math.pi * a * b * les["diameter"] / 2 / 1000, 4),
                "composition": les["composition"], "center_zyx_mm": zyx_mm(les["center"])}
        if les["composition"] == "part-solid":
            item["solid_component_mm"] = round(a + b, 2) / 2
        findings.append(item)
    for e in spec.get("pleural_effusion", []):
        findings.append({"type": "pleural_effusion", "side": e["side"], "lobe": None,
                         "volume_ml": round(acc[f"pleural_{e['side']}"] * voxel_ml, 1)})
    if peri:
        findings.append({"type": "pericardial_effusion", "side": None, "lobe": None,
                         "volume_ml": round(acc["pericardial"] * voxel_ml, 1), "thickness_mm": round(peri["thickness"], 1)})
    lung_voxels = int(lung_mask.sum())
    laa = 100.0 * float(np.count_nonzero(hu_vol[lung_mask] < -950)) / max(lung_voxels, 1)
    if "emphysema" in spec:
        findings.append({"type": "emphysema", "side": "bilateral", "lobe": None, "laa950_percent": round(laa, 2),
                         "predominance": "upper lobe" if spec["emphysema"]["upper"] > 0.6 else "diffuse"})
    if consolidation is not None:
        p = consolidation["center"]
        side = "left" if p[0] > 0 else "right"
        findings.append({"type": "consolidation", "side": side, "lobe": _lobe_at(frames, side, zyx_vox(p)),
                         "volume_ml": round(acc["consolidation"] * voxel_ml, 1), "center_zyx_mm": zyx_mm(p)})
    if "cardiomegaly" in spec:
        findings.append({"type": "cardiomegaly", "side": None, "lobe": None,
                         "cardiothoracic_ratio": round(chest.heart["ax"] / chest.cav_ax, 3)})
    right_ml = float(lung_mask[:, :, xs < 0].sum()) * voxel_ml
    left_ml = float(lung_mask[:, :, xs >= 0].sum()) * voxel_ml
    return {
        "findings": findings,
        "lungs": {"right_volume_ml": round(right_ml, 1), "left_volume_ml": round(left_ml, 1),
                  "laa950_percent": round(laa, 3)},
        "cardiothoracic_ratio": round(chest.heart["ax"] / chest.cav_ax, 3),
        "geometry": {"shape_zyx": [cfg.slices, size, size], "spacing_zyx_mm": [dz, px, px],
                     "frame": "center_zyx_mm: mm from the centre of voxel (0, 0, 0) along z (inferior to superior), "
                              "y (anterior to posterior), x (patient right to left)"},
    }


def _fake_identity(seed: int, rng, cfg) -> SeriesMetadata:
    from pydicom.uid import generate_uid

    family = ["PHANTOM", "SYNTHETIC", "TESTCASE", "SAMPLE"][seed % 4]
    age = int(rng.integers(35, 85))
    return SeriesMetadata(
        patient_id=f"PH{seed:06d}", patient_name=f"{family}^CASE{seed}", patient_sex=str(rng.choice(["M", "F"])),
        patient_age=f"{age:03d}Y", study_uid=generate_uid(entropy_srcs=[f"study-{seed}"]),
        series_uid=generate_uid(entropy_srcs=[f"series-{seed}"]), study_description="CT CHEST WO CONTRAST",
        series_description=f"AXIAL {cfg.thickness_mm:g}MM LUNG", study_date="20250101", series_date="20250101",
        modality="CT", manufacturer="mmcore phantom", kvp=120.0, slice_thickness_mm=cfg.thickness_mm,
        kernel="STANDARD", contrast=False, image_type=["ORIGINAL", "PRIMARY", "AXIAL"])


# ----------------------------------------------------------------------------------------------------------- DICOM out

def write_series(volume: Volume, out_dir: str | Path, intercept: float = -1024.0) -> list[Path]:
    """One CT Image Storage file per slice (Explicit VR Little Endian, uint16 with RescaleIntercept)."""
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = volume.metadata
    dz, dy, dx = volume.spacing_zyx
    nz = volume.shape[0]
    frame_uid = generate_uid(entropy_srcs=[m.series_uid, "frame"])
    paths = []
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[m.series_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientAge = m.patient_name, m.patient_id, m.patient_sex, m.patient_age
        ds.PatientBirthDate = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = m.study_uid, m.series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = m.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.Modality, ds.Manufacturer = "CT", m.manufacturer
        ds.StudyDescription, ds.SeriesDescription = m.study_description, m.series_description
        ds.SeriesNumber = 2
        ds.InstanceNumber = nz - k  # scanners number head-first; ingest must not trust it
        ds.ImageType = m.image_type or ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = m.kvp if m.kvp is not None else 120
        ds.SliceThickness = dz
        ds.ConvolutionKernel = m.kernel or "STANDARD"
        ds.PatientPosition = "FFS"
        pos = volume.voxel_to_lps((k, 0, 0))
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*volume.direction[2], *volume.direction[1])]
        ds.SliceLocation = f"{pos[2]:.4f}"
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = (volume.hu[k].astype(np.int32) - int(intercept)).clip(0, 65535).astype("<u2").tobytes()
        path = out_dir / f"IM{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom(phantom: Phantom, out_dir: str | Path) -> Path:
    """Write the DICOM series and ground_truth.json into `out_dir` atomically (built in a sibling temp folder)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PhantomError(f"{out_dir}: output folder exists and is not empty; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write_series(phantom.volume, tmp)
        (tmp / "ground_truth.json").write_text(json.dumps(phantom.ground_truth, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
