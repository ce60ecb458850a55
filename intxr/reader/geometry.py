"""Pixel -> resolution for a flat detector.

The detector plane is taken normal to the beam at `distance` (the miniCBF, stream-header and NXmx
geometries the readers get: no two-theta offset). A point at (x, y) pixels lies at radius
r = |(x, y) - beam centre| * pixel size from the direct beam, at scattering angle 2theta =
atan(r / distance), and Bragg's law gives d = wavelength / (2 sin theta).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from intxr.models import Geometry


def d_spacing(geometry: Geometry, x, y) -> np.ndarray:
    """d in Angstrom at pixel coordinates x (fast), y (slow), in DIALS's convention (pixel i spans [i, i+1))."""
    g = geometry
    dx = (np.asarray(x, dtype=np.float64) - g.beam_center_x) * g.pixel_size_x
    dy = (np.asarray(y, dtype=np.float64) - g.beam_center_y) * g.pixel_size_y
    two_theta = np.arctan2(np.hypot(dx, dy), g.distance)
    with np.errstate(divide="ignore"):
        return g.wavelength / (2.0 * np.sin(two_theta / 2.0))


def inverse_d_squared(geometry: Geometry, x, y) -> np.ndarray:
    """1/d^2 in 1/A^2 (0 at the beam centre), the variable ice rings and binning use."""
    g = geometry
    dx = (np.asarray(x, dtype=np.float64) - g.beam_center_x) * g.pixel_size_x
    dy = (np.asarray(y, dtype=np.float64) - g.beam_center_y) * g.pixel_size_y
    two_theta = np.arctan2(np.hypot(dx, dy), g.distance)
    return (2.0 * np.sin(two_theta / 2.0) / g.wavelength) ** 2


@lru_cache(maxsize=8)
def _resolution_mask(geometry: Geometry, shape: tuple[int, int], d_min: float | None, d_max: float | None) -> np.ndarray:
    ny, nx = shape
    # Pixel centres, as dials.find_spots evaluates the resolution filter.
    y, x = np.ogrid[0:ny, 0:nx]
    inv_d2 = inverse_d_squared(geometry, x + 0.5, y + 0.5)
    keep = np.ones(shape, dtype=bool)
    if d_min is not None:
        keep &= inv_d2 <= 1.0 / d_min**2
    if d_max is not None:
        keep &= inv_d2 >= 1.0 / d_max**2
    keep.setflags(write=False)
    return keep


def resolution_mask(geometry: Geometry, shape: tuple[int, int], d_min: float | None, d_max: float | None) -> np.ndarray:
    """True where d_min <= d <= d_max at the pixel centre (cached per geometry and range)."""
    return _resolution_mask(geometry, tuple(shape), d_min, d_max)
