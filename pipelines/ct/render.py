"""PNG of one axial slice through a window preset, with optional mask overlay and finding boxes (for the UI)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pipelines.ct.volume import Volume, window_to_uint8

OVERLAY_RGB = (255, 64, 64)
BOX_RGB = (255, 215, 0)


def slice_rgb(volume: Volume, z: int, window: str = "lung", mask: np.ndarray | None = None,
              boxes: list[tuple[int, int, int, int]] | None = None, alpha: float = 0.35) -> np.ndarray:
    """(Y, X, 3) uint8 image of slice `z`; `mask` is a (Y, X) or (Z, Y, X) bool overlay, `boxes` are (y0, x0, y1, x1)."""
    import cv2

    if not 0 <= z < volume.shape[0]:
        raise ValueError(f"z: expected a slice index in 0..{volume.shape[0] - 1}, found {z}")
    grey = window_to_uint8(volume.hu[z], window)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if mask is not None:
        m = mask[z] if mask.ndim == 3 else mask
        if m.shape != grey.shape:
            raise ValueError(f"mask: expected shape {grey.shape} per slice, found {m.shape}")
        colour = np.array(OVERLAY_RGB, dtype=np.float32)
        rgb[m] = (rgb[m] * (1 - alpha) + colour * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, OVERLAY_RGB, 1)
    for y0, x0, y1, x1 in boxes or []:
        cv2.rectangle(rgb, (int(x0), int(y0)), (int(x1), int(y1)), BOX_RGB, 1)
    return rgb


def render_slice_png(volume: Volume, z: int, path: str | Path, window: str = "lung", mask: np.ndarray | None = None,
                     boxes: list[tuple[int, int, int, int]] | None = None) -> Path:
    """Write the slice as PNG atomically (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    rgb = slice_rgb(volume, z, window, mask, boxes)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent or ".")
    os.close(fd)
    try:
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
