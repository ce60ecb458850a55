"""Pixel -> resolution for a flat detector.

The detector plane is taken normal to the beam at `distance` (the miniCBF, stream-header and NXmx
geometries the readers get: no two-theta offset). A point at (x, y) pixels lies at radius
r = |(x, y) - beam centre| * pixel size from the direct beam, at scattering angle 2theta =
atan(r / distance), and Bragg's law gives d = wavelength / (2 sin theta).

Parallax: a photon is absorbed at some depth in the sensor, so the pixel it lands in is displaced
outwards from where the ray crossed the sensor surface. dxtbx corrects pixel -> mm for pixel-array
detectors (ParallaxCorrectedPxMmStrategy; Hülsen, Brönnimann & Eikenberry 2005, J. Appl. Cryst. 38,
488): with u the unit ray to the uncorrected point, cos t = u . normal and mu the sensor's linear
attenuation coefficient, the mean absorption depth along the ray gives the offset
o = 1/mu - (t0/cos t + 1/mu) exp(-mu t0 / cos t), and the corrected point is (X, Y) - o (u.fast, u.slow).
DIALS computes spot resolutions (per-image analysis) and its resolution mask that way, so we do too.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from intxr.models import Geometry

# Mass attenuation coefficients of silicon, mu/rho in cm^2/g against photon energy in MeV (NIST,
# Hubbell & Seltzer, X-ray mass attenuation coefficients, Table 3, Z = 14), log-log interpolated.
_SI_ENERGY_MEV = np.array(
    [
        0.001,
        0.0015,
        0.0018389,
        0.0018389,
        0.002,
        0.003,
        0.004,
        0.005,
        0.006,
        0.008,
        0.010,
        0.015,
        0.020,
        0.030,
        0.040,
        0.050,
        0.060,
        0.080,
        0.100,
    ]
)
_SI_MU_RHO = np.array(
    [
        1570.0,
        535.5,
        309.2,
        3192.0,
        2777.0,
        978.4,
        452.9,
        245.0,
        147.0,
        64.68,
        33.89,
        10.34,
        4.464,
        1.436,
        0.7012,
        0.4385,
        0.3207,
        0.2228,
        0.1835,
    ]
)
_SI_DENSITY = 2.33  # g/cm^3


def attenuation_coefficient(geometry: Geometry) -> float | None:
    """Linear attenuation coefficient of the sensor in 1/mm at the beam energy; None when unknown."""
    if geometry.sensor_material.lower() not in ("si", "silicon"):
        return None
    energy = geometry.energy_ev / 1e6
    if not _SI_ENERGY_MEV[0] <= energy <= _SI_ENERGY_MEV[-1]:
        return None
    i = int(np.searchsorted(_SI_ENERGY_MEV, energy, side="right")) - 1
    i = min(i, len(_SI_ENERGY_MEV) - 2)
    x0, x1 = np.log(_SI_ENERGY_MEV[i]), np.log(_SI_ENERGY_MEV[i + 1])
    y0, y1 = np.log(_SI_MU_RHO[i]), np.log(_SI_MU_RHO[i + 1])
    mu_rho = np.exp(y0 + (y1 - y0) * (np.log(energy) - x0) / (x1 - x0))
    return float(mu_rho * _SI_DENSITY / 10.0)


def _radial_mm(geometry: Geometry, x, y, parallax: bool) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (mm) from the direct beam in the detector plane, parallax-corrected when asked and known."""
    g = geometry
    rx = np.asarray(x, dtype=np.float64) * g.pixel_size_x - g.beam_center_x * g.pixel_size_x
    ry = np.asarray(y, dtype=np.float64) * g.pixel_size_y - g.beam_center_y * g.pixel_size_y
    mu = attenuation_coefficient(g) if parallax and g.parallax else None
    if mu is not None and g.sensor_thickness > 0:
        length = np.sqrt(rx * rx + ry * ry + g.distance * g.distance)
        cos_t = g.distance / length
        t0 = g.sensor_thickness
        o = 1.0 / mu - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
        rx = rx - rx / length * o
        ry = ry - ry / length * o
    return rx, ry


def d_star_sq(geometry: Geometry, x, y, parallax: bool = True) -> np.ndarray:
    """1/d^2 (1/A^2) at pixel coordinates x (fast), y (slow), DIALS's convention (pixel i spans [i, i+1)),
    with dxtbx's parallax correction for silicon sensors."""
    rx, ry = _radial_mm(geometry, x, y, parallax)
    two_theta = np.arctan2(np.hypot(rx, ry), geometry.distance)
    return (2.0 * np.sin(two_theta / 2.0) / geometry.wavelength) ** 2


def d_spacing(geometry: Geometry, x, y) -> np.ndarray:
    """d in Angstrom at pixel coordinates (inf at the beam centre)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(d_star_sq(geometry, x, y))


@lru_cache(maxsize=8)
def _resolution_mask(
    geometry: Geometry, shape: tuple[int, int], d_min: float | None, d_max: float | None
) -> np.ndarray:
    ny, nx = shape
    # Pixel centres, as dials.find_spots evaluates its resolution filter; it masks d <= d_min and
    # d >= d_max (dials/util/masking.h), so the kept range is open at both ends.
    y, x = np.ogrid[0:ny, 0:nx]
    d = d_spacing(geometry, x + 0.5, y + 0.5)
    keep = np.ones(shape, dtype=bool)
    if d_min is not None:
        keep &= d > d_min
    if d_max is not None:
        keep &= d < d_max
    keep.setflags(write=False)
    return keep


def resolution_mask(geometry: Geometry, shape: tuple[int, int], d_min: float | None, d_max: float | None) -> np.ndarray:
    """True where d_min < d < d_max at the pixel centre (cached per geometry and range)."""
    return _resolution_mask(geometry, tuple(shape), d_min, d_max)
