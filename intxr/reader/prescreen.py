"""Pre-screen: can this frame hold Bragg spots at all? Decided in a few milliseconds so blank frames
of a raster scan cost almost nothing.

The frame is binned 4 x 4 (sums of trusted counts; a sum of Poisson counts is Poisson) and DIALS's
dispersion test runs on the binned frame. A Bragg spot,
a few pixels across, lands in one or two bins and stays an outlier there; Poisson background does
not. The frame passes when at least `min_binned_strong` bins are strong. Blocks touching an
untrusted pixel are left out, so module gaps do not pass as structure.

Measured on the real frames in ../shared (tests/test_prescreen.py): every frame on which DIALS finds
min_Bragg_peaks spots passes; the blank ones do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intxr.reader.threshold import ThresholdParams, _checked


@dataclass(frozen=True)
class PrescreenParams:
    factor: int = 4
    sigma_background: float = 6.0  # DIALS's sigmas: binned hits stay far above the pass mark
    sigma_strong: float = 3.0
    min_binned_strong: int = 5  # half of the default min_Bragg_peaks: one bin per spot would already pass


@dataclass(frozen=True)
class PrescreenResult:
    passed: bool
    n_binned_strong: int


def bin_frame(image: np.ndarray, mask: np.ndarray | None, trusted_range: tuple[float, float], factor: int):
    from intxr._kernels.prescreen import bin_frame as kernel

    image, mask = _checked(image, mask)
    return kernel(image, mask, float(trusted_range[0]), float(trusted_range[1]), int(factor))


def bin_frame_reference(image: np.ndarray, mask: np.ndarray | None, trusted_range: tuple[float, float], factor: int):
    """Plain numpy version of `bin_frame`."""
    values = np.asarray(image, dtype=np.float64)
    trusted = (values >= trusted_range[0]) & (values <= trusted_range[1])
    if mask is not None:
        trusted &= mask.astype(bool)
    h, w = values.shape[0] // factor, values.shape[1] // factor
    blocks = np.where(trusted, values, 0.0)[: h * factor, : w * factor].reshape(h, factor, w, factor)
    ok = trusted[: h * factor, : w * factor].reshape(h, factor, w, factor).all(axis=(1, 3))
    return blocks.sum(axis=(1, 3)), ok.astype(np.uint8)


def prescreen(
    image: np.ndarray,
    mask: np.ndarray | None,
    trusted_range: tuple[float, float],
    params: PrescreenParams = PrescreenParams(),
) -> PrescreenResult:
    from intxr.reader.threshold import find_strong_pixels

    sums, valid = bin_frame(image, mask, trusted_range, params.factor)
    test = ThresholdParams(
        algorithm="dispersion", sigma_background=params.sigma_background, sigma_strong=params.sigma_strong
    )
    strong, _ = find_strong_pixels(sums, valid, (0.0, np.inf), test)
    return PrescreenResult(len(strong) >= params.min_binned_strong, int(len(strong)))
