"""Lobe assignment shared by the phantom (ground truth) and the measurements (from a segmented lung).

A lung is described by its bounding box; a point inside it gets normalised coordinates
    u = anterior -> posterior fraction (0 = most anterior voxel of that lung, 1 = most posterior),
    t = inferior -> superior fraction (0 = lowest point of the lung base, 1 = apex),
and the fissures are planes in (u, t): the oblique fissure climbs from the anterior base to the posterior third of
the lung height; on the right the horizontal fissure splits the upper lobe from the middle lobe.
"""

from __future__ import annotations

LOBES = {"right": ("RUL", "RML", "RLL"), "left": ("LUL", "LLL")}
LOBE_NAMES = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
              "LUL": "left upper lobe", "LLL": "left lower lobe"}


def oblique_fissure_t(u: float) -> float:
    """Height fraction of the oblique fissure at anterior-posterior fraction u (0.05 at the front, 0.65 at the back)."""
    return 0.05 + 0.6 * u


def lobe_of(side: str, u: float, t: float) -> str:
    if side not in LOBES:
        raise ValueError(f"side: expected 'right' or 'left', found {side!r}")
    u = min(max(u, 0.0), 1.0)
    t = min(max(t, 0.0), 1.0)
    if t < oblique_fissure_t(u):
        return "RLL" if side == "right" else "LLL"
    if side == "right" and t < 0.5 and u < 0.6:  # horizontal fissure: middle lobe is anterior and below mid-height
        return "RML"
    return "RUL" if side == "right" else "LUL"


def side_of_x(x_lps_offset: float) -> str:
    """LPS +x points to the patient's left: a positive offset from the body midline is the left side."""
    return "left" if x_lps_offset > 0 else "right"
