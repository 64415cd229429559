"""Digitally reconstructed radiographs (DRRs): a chest CT volume projected into a radiograph.

Why: the drawn radiographs (`cxr_image.py`) and the CT cohort (`chest_ct.py`) otherwise show two
unrelated bodies. Projecting the same warped real anatomy, findings included, gives radiographs
whose shadows come from real organs, so image and CT models learn one patient population.

Why parallel beam: a radiograph is the line integral of linear attenuation along each ray. With
parallel rays along the anterior-posterior axis that integral is a sum along one array axis
(milliseconds for a 64x128x128 volume); diffdrr's Siddon cone-beam ray tracer took 9.5 s per
256x256 image on 2 cores, too slow for a cohort. What parallel beam gives up is magnification
(the heart looks larger on an AP film): PA and AP give the same image here.

Display orientation (as a PA chest film is read, facing the patient): row 0 is superior, so the
volume's z (inferior -> superior) is flipped; column 0 is the patient's RIGHT, on the viewer's
left, which is the volume's x index 0 (LPS x runs patient right -> left), so x is NOT flipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Final

import numpy as np

from .chest_ct import axis_weights, resample_axis

__all__ = ["MU_WATER_PER_MM", "REFERENCE_WATER_MM", "VIEWS", "render_drr"]

logger = logging.getLogger(__name__)

MU_WATER_PER_MM: Final[float] = 0.02
"""Linear attenuation of water at ~70 keV, the effective energy of a chest radiograph beam."""
REFERENCE_WATER_MM: Final[float] = 300.0
"""The output's unit: 1.0 is the attenuation of this much water (a thick mediastinum)."""
VIEWS: Final[tuple[str, ...]] = ("PA", "AP")


def render_drr(
    hu: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    view: str = "PA",
    rows: int,
    cols: int,
) -> np.ndarray:
    """Project a (z, y, x) LPS volume in HU into a (rows, cols) float32 frontal radiograph.

    Each pixel is the line integral of mu = mu_water * (1 + HU/1000) (floored at 0) along y
    (anterior-posterior), i.e. -log of the transmitted intensity, in units of
    ``REFERENCE_WATER_MM`` of water: 0 where the ray meets only air, higher = more attenuation
    (bone and mediastinum bright, aerated lung dark), as a radiograph is displayed. The
    projection is box-averaged (or linearly interpolated) to one square pixel size that fits
    both its height and width into the matrix, and centred with zero (air) padding on the
    other axis, so anatomy keeps its physical aspect. ``view`` ("PA" or "AP") does not change
    the image (parallel beam has no magnification); it is accepted so callers state the view.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if hu.ndim != 3:
        raise ValueError(f"hu must be a (z, y, x) volume, got shape {hu.shape}")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
    dz, dy, dx = (float(v) for v in spacing_mm)
    mu = np.asarray(hu, dtype=np.float32) * np.float32(MU_WATER_PER_MM / 1000.0)
    mu += np.float32(MU_WATER_PER_MM)
    np.maximum(mu, 0.0, out=mu)
    scale = np.float32(dy / (MU_WATER_PER_MM * REFERENCE_WATER_MM))
    proj = mu.sum(axis=1, dtype=np.float32) * scale  # (z, x)
    proj = proj[::-1]  # row 0 = superior; x index 0 (patient right) stays on the viewer's left
    nz, nx = proj.shape
    pixel = max(nz * dz / rows, nx * dx / cols)  # one square pixel that fits both extents
    out_r = min(rows, max(1, math.floor(nz * dz / pixel + 0.5)))
    out_c = min(cols, max(1, math.floor(nx * dx / pixel + 0.5)))
    proj = resample_axis(proj, 0, axis_weights(nz, dz, out_r, nz * dz / out_r))
    proj = resample_axis(proj, 1, axis_weights(nx, dx, out_c, nx * dx / out_c))
    out = np.zeros((rows, cols), dtype=np.float32)
    r0, c0 = (rows - out_r) // 2, (cols - out_c) // 2
    out[r0 : r0 + out_r, c0 : c0 + out_c] = proj
    logger.debug("DRR %s: %dx%d image, %.3f mm pixels", view, rows, cols, pixel)
    return out
