"""The frame score of the original SSRL Interceptor (ssrl-px/interceptor, connector/processor.py, ImageScorer,
0.28 to 0.33 with use_ai off), written afresh in numpy. It "more or less replicates the scoring approach from
libdistl": points for resolution and for the strongest spot, penalties for ice rings and for elongated spots.

Per spot the inputs are d*^2 (1/A^2), the summed intensity and the bounding box, in spot-finder order.
Defaults are those of the original processing.cfg: spf_calculate_score=True, spf_d_min/spf_d_max=None,
spf_good_spots_only=True, spf_ice_filter=True, min_Bragg_peaks=10.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intxr.reader.stats import estimate_resolution_limit, ice_ring_d_star_sq, ice_rings_selection

# (hres below this, points): the smallest threshold above hres gives the points (ImageScorer.calculate_score).
RESOLUTION_POINTS = ((20, 1), (8, 2), (5, 3), (4, 4), (3.2, 5), (2.7, 7), (2.4, 8), (2.0, 10), (1.7, 12), (1.5, 14))

# What a frame reports when it is not scored, as the original's result defaults (connector.py).
UNSCORED_HRES = 99.0
# hres when there are 10 or fewer good spots to estimate it from.
NO_ESTIMATE_HRES = 99.9


@dataclass(frozen=True)
class FrameScore:
    """What the original Interceptor reports for a frame's spots."""

    n_spots: int  # good spots: off the ice rings and in the resolution window (raw count below min_Bragg_peaks)
    n_overloads: int
    score: int  # -999 when the score is not calculated
    hres: float  # A; 99.9 with 10 or fewer good spots, 99.0 below min_Bragg_peaks, -1.0 when the estimate fails
    n_ice_rings: int
    mean_shape_ratio: float
    errors: tuple[str, ...] = ()


def resolution_points(hres: float) -> int:
    """-2 beyond 20 A; otherwise the points of the smallest threshold T with hres < T (0 for hres = 20 exactly).
    A failed estimate (-1) therefore scores the most."""
    if hres > 20:
        return -2
    points = 0
    for threshold, increment in RESOLUTION_POINTS:
        if hres < threshold:
            points = increment
    return points


def strength_points(max_intensity: float) -> int:
    """+2 for a spot of 40000 counts or more between 4 and 15 A, +1 for 15000 or more."""
    if max_intensity >= 40000:
        return 2
    if max_intensity >= 15000:
        return 1
    return 0


def ice_ring_points(n_ice_rings: int) -> int:
    """-1 for one ice ring, -2 for two or three, -3 for four or more."""
    if n_ice_rings >= 4:
        return -3
    if n_ice_rings >= 2:
        return -2
    if n_ice_rings == 1:
        return -1
    return 0


def shape_points(mean: float, median: float, std: float) -> int:
    """-2 for a mean shape ratio over 2, -2 for a spread over 1, +2 for round spots (median < 1.35, std < 0.4)."""
    points = 0
    if mean > 2.0:
        points -= 2
    if std > 1.0:
        points -= 2
    if median < 1.35 and std < 0.4:
        points += 2
    return points


def max_intensity_4_to_15(d_star_sq: np.ndarray, intensity: np.ndarray) -> float:
    """The strongest spot with 4 <= d <= 15 A, ice included; 0 when there is none."""
    d = 1.0 / np.sqrt(np.asarray(d_star_sq, dtype=np.float64))
    intensity = np.asarray(intensity, dtype=np.float64)
    in_range = (d >= 4) & (d <= 15)
    return float(np.max(intensity[in_range])) if in_range.any() else 0.0


def count_ice_rings(d_star_sq: np.ndarray, n_observed: int | None = None, width: float = 0.02) -> int:
    """Ice Ih reflections (one per Miller index out to the spots' d_min) with at least 5 % of the spots within
    width/2 of them in d*^2. The original's unit is the index, not the physical ring, and neighbouring windows
    overlap, so one spot can count for several; the 5 % is of all spots found (`n_observed`, default all)."""
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    if d_star_sq.size == 0:
        return 0
    n_observed = len(d_star_sq) if n_observed is None else n_observed
    half_width = width / 2
    d_min = float(np.min(1.0 / np.sqrt(d_star_sq)))
    rings = ice_ring_d_star_sq(d_min, half_width)
    counts = (np.abs(d_star_sq[:, None] - rings[None, :]) < half_width).sum(axis=0)
    return int((counts / n_observed * 100 >= 5).sum())


def shape_ratios(bbox: np.ndarray) -> np.ndarray:
    """Long over short side of each spot's bounding box (x0, x1, y0, y1, half-open), the shoebox axis ratio."""
    bbox = np.asarray(bbox, dtype=np.int64).reshape(-1, 4)
    width = bbox[:, 1] - bbox[:, 0]
    height = bbox[:, 3] - bbox[:, 2]
    return np.maximum(width, height) / np.minimum(width, height)


def too_few_spots(n_observed: int) -> str:
    return f"Too few ({n_observed}) spots found!"


def score_frame(
    d_star_sq: np.ndarray,
    intensity: np.ndarray,
    bbox: np.ndarray,
    *,
    n_overloads: int = 0,
    min_bragg_peaks: int = 10,
    calculate_score: bool = True,
    d_min: float | None = None,
    d_max: float | None = None,
    good_spots_only: bool = True,
    ice_filter: bool = True,
) -> FrameScore:
    """Score one frame's spots as the original Interceptor does (ImageScorer and ZMQProcessor.process).

    With fewer than `min_bragg_peaks` spots nothing is scored: n_spots is the raw count and the rest are the
    result defaults (hres 99.0, score 0, no ice rings, shape 0, no overloads). Otherwise:
    - good spots: off the ice rings (DIALS's filter, +-0.002 in d*^2) if `ice_filter`, and with
      d_min <= d <= d_max (None: 0.1 and 99 A) if `good_spots_only`; n_spots is their number;
    - hres: DIALS's estimate_resolution_limit on the ice-free spots (no resolution window, no ice selection) when
      n_spots > 10, else 99.9;
    - score (when `calculate_score`, else -999 and no ice rings, shape 1): resolution points, strength points
      from the strongest spot at 4-15 A, ice-ring penalty, spot-shape penalty/bonus over all spots, floored at
      0 beyond 20 A and at 1 otherwise.
    The "Too few (N) spots found!" error (N the raw count) is added whenever n_spots < min_bragg_peaks.
    n_overloads is the caller's count, reported as it is.
    """
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    intensity = np.asarray(intensity, dtype=np.float64)
    n_observed = len(d_star_sq)
    if n_observed < min_bragg_peaks:
        return FrameScore(
            n_spots=n_observed,
            n_overloads=0,
            score=0,
            hres=UNSCORED_HRES,
            n_ice_rings=0,
            mean_shape_ratio=0.0,
            errors=(too_few_spots(n_observed),),
        )

    # ImageScorer.calculate_stats
    no_ice = ~ice_rings_selection(d_star_sq) if ice_filter else np.ones(n_observed, dtype=bool)
    good = no_ice.copy()
    if good_spots_only:
        d = 1.0 / np.sqrt(d_star_sq)
        good &= (d >= (0.1 if d_min is None else float(d_min))) & (d <= (99 if d_max is None else float(d_max)))
    n_spots = int(good.sum())
    hres = estimate_resolution_limit(d_star_sq[no_ice], intensity[no_ice]) if n_spots > 10 else NO_ESTIMATE_HRES

    if calculate_score:
        n_ice_rings = count_ice_rings(d_star_sq, n_observed, width=0.02)
        ratios = shape_ratios(bbox)
        mean_shape_ratio = float(np.mean(ratios))
        score = (
            resolution_points(hres)
            + strength_points(max_intensity_4_to_15(d_star_sq, intensity))
            + ice_ring_points(n_ice_rings)
            + shape_points(mean_shape_ratio, float(np.median(ratios)), float(np.std(ratios)))
        )
        if score <= 0:
            score = 0 if hres > 20 else 1
    else:
        score, n_ice_rings, mean_shape_ratio = -999, 0, 1.0

    errors = (too_few_spots(n_observed),) if n_spots < min_bragg_peaks else ()
    return FrameScore(
        n_spots=n_spots,
        n_overloads=n_overloads,
        score=score,
        hres=float(hres),
        n_ice_rings=n_ice_rings,
        mean_shape_ratio=mean_shape_ratio,
        errors=errors,
    )
