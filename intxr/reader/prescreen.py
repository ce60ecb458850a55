"""Pre-screen: can this frame hold Bragg spots at all? Decided in a few milliseconds so blank frames
of a raster scan cost almost nothing.

The frame is binned 4 x 4 (sums of trusted counts; a sum of Poisson counts is Poisson) and DIALS's
dispersion test runs on the binned frame. A Bragg spot, a few pixels across, lands in one or two
bins and stays an outlier there; Poisson background does not. Blocks touching an untrusted pixel
are left out, so module gaps do not pass as structure. A strong bin is a spot candidate when its
block (with a one-pixel margin) holds at least `min_spot_pixels` pixels clearly above the local
background (the neighbouring bins' mean): a DIALS spot needs 3 strong pixels, so single hot
pixels and cosmic-ray hits are not candidates. The frame passes at `min_candidates` candidates.

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
    sigma_background: float = 6.0  # DIALS's sigmas on the binned frame
    sigma_strong: float = 3.0
    pixel_sigma: float = 2.0  # a candidate's pixels: above local background + 2 sigma (looser than DIALS's 3)
    min_spot_pixels: int = 3  # DIALS's min_spot_size for pixel-array detectors
    min_candidates: int = 5  # half of the default min_Bragg_peaks: one candidate per spot passes a hit


@dataclass(frozen=True)
class PrescreenResult:
    passed: bool
    n_binned_strong: int
    n_candidates: int  # counted until the pass mark is reached


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
    candidates = 0
    f = params.factor
    for index in strong:
        bj, bi = divmod(int(index), sums.shape[1])
        rows, cols = slice(max(bj - 1, 0), bj + 2), slice(max(bi - 1, 0), bi + 2)
        ok = valid[rows, cols].astype(bool)
        ok[min(bj, 1), min(bi, 1)] = False  # the bin itself is not background
        if not ok.any():
            continue
        background = float(sums[rows, cols][ok].mean()) / (f * f)
        level = background + params.pixel_sigma * np.sqrt(max(background, 1.0))
        rows, cols = slice(max(bj * f - 1, 0), bj * f + f + 1), slice(max(bi * f - 1, 0), bi * f + f + 1)
        block = image[rows, cols]
        bright = (block > level) & (block >= trusted_range[0]) & (block <= trusted_range[1])
        if mask is not None:
            bright &= mask[rows, cols] > 0
        if np.count_nonzero(bright) >= params.min_spot_pixels:
            candidates += 1
            if candidates >= params.min_candidates:
                break
    return PrescreenResult(candidates >= params.min_candidates, int(len(strong)), candidates)
