"""Per-image statistics of a spot list, as DIALS computes them for the find_spots server.

This is DIALS's per-image analysis (dials/algorithms/spot_finding/per_image_analysis.py,
`stats_for_reflection_table` with `filter_ice=True, ice_rings_width=0.004`), written afresh in numpy:

- ice rings: spots within +-0.002 of an ice Ih powder ring in d*^2 = 1/d^2 (PowderRingFilter);
- `estimated_d_min`: equal-population bins in d*^2, Wilson outlier rejection in each, straight lines through
  the 10th / 90th percentile of ln(I/sigma(I)) per bin, and the highest-resolution spot under the upper line;
- `d_min_distl_method_1/2` and the noisiness values: Zhang et al. 2006, J. Appl. Cryst. 39:112, section 2.4.4.

Inputs are per spot: d*^2 in 1/A^2 (`intxr.geometry.d_star_sq` of the centroid) and the summed intensity
of the spot's strong pixels. Strong spots have no background, so sigma^2(I) = I and ln(I/sigma) = ln(I)/2; every
spot is expected to have I > 0. The order of the spots matters where intensities tie: give them in spot-finder
order, as DIALS's stable sorts keep ties in table order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Ice Ih: P6_3/mmc (space group 194), a = 4.498 A, c = 7.338 A (DIALS per_image_analysis.ice_rings_selection).
ICE_A = 4.498
ICE_C = 7.338


@dataclass(frozen=True)
class ImageStats:
    """DIALS's StatsSingleImage for one image; the five resolution fields are -1.0 when there are 10 or fewer
    spots off the ice rings."""

    n_spots_total: int
    n_spots_no_ice: int
    n_spots_4A: int  # spots with d > 4 A (lower resolution than 4 A), ice included: DIALS's definition
    total_intensity: float  # summed over the spots off the ice rings
    estimated_d_min: float
    d_min_distl_method_1: float
    d_min_distl_method_2: float
    noisiness_method_1: float
    noisiness_method_2: float

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Ice rings


def ice_ring_d_star_sq(d_min: float, half_width: float) -> np.ndarray:
    """d*^2 (1/A^2) of the ice Ih reflections out to 1/d_min^2 + half_width, sorted, one entry per Miller index.

    As DIALS's PowderRingFilter builds them (cctbx index_generator): the reciprocal asymmetric unit of 6/mmm,
    h >= k >= 0, l >= 0, without 000 and without the systematic absences of P6_3/mmc, which in that unit are
    h = k with l odd (hhl: l = 2n, 00l included). Hexagonal cell: d*^2 = 4/3 (h^2 + hk + k^2)/a^2 + l^2/c^2.
    """
    if d_min <= 0:
        raise ValueError(f"d_min must be positive, got {d_min}")
    # The filter widens the limit by half a ring width, going through d as cctbx does.
    d_min_rings = 1.0 / math.sqrt(1.0 / d_min**2 + half_width)
    d_star_sq_max = 1.0 / (d_min_rings * d_min_rings)

    # d*^2 >= 4/3 h^2/a^2 for k >= 0, and >= l^2/c^2.
    h_max = int(math.floor(ICE_A * math.sqrt(0.75 * d_star_sq_max))) + 1
    l_max = int(math.floor(ICE_C * math.sqrt(d_star_sq_max))) + 1
    h, k, l = np.meshgrid(np.arange(h_max + 1), np.arange(h_max + 1), np.arange(l_max + 1), indexing="ij")  # noqa: E741
    ring_d_star_sq = 4.0 / 3.0 * (h * h + h * k + k * k) / ICE_A**2 + l * l / ICE_C**2
    keep = (k <= h) & ((h + k + l) > 0) & ~((h == k) & (l % 2 == 1)) & (ring_d_star_sq <= d_star_sq_max)
    return np.sort(ring_d_star_sq[keep])


def ice_rings_selection(d_star_sq: np.ndarray, width: float = 0.004) -> np.ndarray:
    """True for spots within width/2 (strictly) of an ice ring in d*^2, DIALS's ice filter.

    The rings go out to the spots' own d_min (plus half a width).
    """
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    if d_star_sq.size == 0:
        return np.zeros(0, dtype=bool)
    half_width = width / 2.0
    d_min = float(np.min(1.0 / np.sqrt(d_star_sq)))
    rings = ice_ring_d_star_sq(d_min, half_width)
    return (np.abs(d_star_sq[:, None] - rings[None, :]) < half_width).any(axis=1)


# ---------------------------------------------------------------------------------------------------------
# estimated_d_min


def _nint(x: float) -> int:
    """libtbx.math_utils.nearest_integer: floor(x + 0.5)."""
    return int(math.floor(x + 0.5))


def _linear_regression(x: np.ndarray, y: np.ndarray, epsilon: float = 1e-15) -> tuple[float, float]:
    """(slope, intercept) of y on x by least squares, with scitbx's linear_regression rules for the degenerate
    cases: (0, 0) for no points, all x equal or a negligible x spread; slope 0 through the mean for all y equal.
    Sums run in order, as scitbx sums them (at most one point per bin here)."""
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    xs = [float(v) for v in x]
    ys = [float(v) for v in y]
    sum_x = sum_x2 = sum_y = sum_xy = 0.0
    for xi, yi in zip(xs, ys, strict=True):
        sum_x += xi
        sum_x2 += xi * xi
        sum_y += yi
        sum_xy += xi * yi
    min_x, max_x, min_y, max_y = min(xs), max(xs), min(ys), max(ys)
    if min_x == max_x:
        return 0.0, 0.0
    if min_y == max_y:
        return 0.0, min_y
    dx = max(abs(min_x - sum_x / n), abs(max_x - sum_x / n))
    dy = max(abs(min_y - sum_y / n), abs(max_y - sum_y / n))
    if dx == 0:
        return 0.0, 0.0
    if dy == 0:
        return 0.0, sum_y / n
    if dx < dy * epsilon:
        return 0.0, 0.0
    det = n * sum_x2 - sum_x * sum_x
    if det == 0:
        return 0.0, 0.0
    return (n * sum_xy - sum_x * sum_y) / det, (sum_x2 * sum_y - sum_x * sum_xy) / det


def _wilson_outliers(intensity: np.ndarray, ice_sel: np.ndarray, p_cutoff: float = 1e-2) -> np.ndarray:
    """Spots too strong for a Wilson distribution (Read 1999, Acta Cryst. D55:1759): normalised amplitude
    E = sqrt(I / <I>) >= sqrt(-ln p_cutoff), with <I> over the spots off the ice rings, repeated on the
    remaining spots until none is rejected."""
    e_cutoff = math.sqrt(-math.log(p_cutoff))
    outliers = np.zeros(len(intensity), dtype=bool)
    remaining = np.arange(len(intensity))
    while remaining.size:
        no_ice = intensity[remaining][~ice_sel[remaining]]
        mean_intensity = no_ice.sum() * (1.0 / no_ice.size)  # flex.mean
        rejected = np.sqrt(intensity[remaining]) / math.sqrt(mean_intensity) >= e_cutoff
        if not rejected.any():
            break
        outliers[remaining[rejected]] = True
        remaining = remaining[~rejected]
    return outliers


def estimate_resolution_limit(d_star_sq: np.ndarray, intensity: np.ndarray, ice_sel: np.ndarray | None = None) -> float:
    """DIALS's `estimated_d_min` in A, or -1.0 when the upper and lower lines are parallel or no spot lies under
    the upper line. Spots flagged in `ice_sel` take no part in the fits or the result but do fill the bins.

    Equal-population bins in d*^2 (5 to 20 bins of about 20 spots). In each bin with spots off the ice rings,
    Wilson outliers are rejected and the 10th and 90th percentile of ln(I/sigma) (stable order) are taken. An
    upper line is fitted through (d*^2 of the 10th-percentile spot, ln(I/sigma) of the 90th) and a lower one
    through the crossed pair, exactly as DIALS pairs them. The estimate is the highest-resolution spot (not ice,
    not an outlier) strictly under the upper line. Needs at least 5 spots (DIALS calls it with more than 10).
    """
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    intensity = np.asarray(intensity, dtype=np.float64)
    ice_sel = np.zeros(len(d_star_sq), dtype=bool) if ice_sel is None else np.asarray(ice_sel, dtype=bool)
    # sigma^2(I) = |I| for strong spots (no background). DIALS keeps variance > 0 (for strong spots: all) but
    # selects only I and the ice flags, not d*^2; here the selection applies to all three.
    variance = np.abs(intensity)
    keep = variance > 0
    d_star_sq, intensity, variance, ice_sel = d_star_sq[keep], intensity[keep], variance[keep], ice_sel[keep]
    n = len(d_star_sq)
    if n < 5:
        raise ValueError(f"estimate_resolution_limit needs at least 5 spots, got {n}")
    d = 1.0 / np.sqrt(d_star_sq)
    log_i_over_sigma = np.log(intensity / np.sqrt(variance))

    # binner_equal_population(d_star_sq, target_n_per_bin=20, max_slots=20, min_slots=5): bin i runs from
    # d_min_i (inclusive) up to d_max_i = d_min_{i-1} (exclusive), starting at the lowest-resolution spot.
    n_slots = max(min(n // 20, 20), 5)
    n_per_bin = n / n_slots
    d_sorted = 1.0 / np.sqrt(np.sort(d_star_sq))
    bin_d_min = [float(d_sorted[_nint((i + 1) * n_per_bin) - 1]) for i in range(n_slots)]
    bin_d_max = [float(d_sorted[0]), *bin_d_min[:-1]]

    outliers_all = np.zeros(n, dtype=bool)
    upper_x, upper_y, lower_x, lower_y = [], [], [], []
    for d_min, d_max in zip(bin_d_min, bin_d_max, strict=True):
        in_bin = (d < d_max) & (d >= d_min)
        if not (in_bin & ~ice_sel).any():
            continue
        members = np.flatnonzero(in_bin)
        outliers = _wilson_outliers(intensity[members], ice_sel[members])
        outliers_all[members] = outliers
        used = members[~outliers & ~ice_sel[members]]
        y = log_i_over_sigma[used]
        perm = np.argsort(y, kind="stable")  # flex.sort_permutation is stable: ties stay in table order
        i_lower = used[perm[int(math.floor(0.1 * len(perm)))]]
        i_upper = used[perm[int(math.floor(0.9 * len(perm)))]]
        # The crossed pairing is DIALS's: the upper line takes the 10th-percentile spot's d*^2.
        upper_x.append(d_star_sq[i_lower])
        upper_y.append(log_i_over_sigma[i_upper])
        lower_x.append(d_star_sq[i_upper])
        lower_y.append(log_i_over_sigma[i_lower])

    m_upper, c_upper = _linear_regression(np.array(upper_x), np.array(upper_y))
    m_lower, _ = _linear_regression(np.array(lower_x), np.array(lower_y))
    if m_upper == m_lower:
        return -1.0

    # points_below_line: the sign of the cross product against the line through (0, c) and (1, m + c).
    slope = (m_upper * 1 + c_upper) - c_upper
    side = d_star_sq * -slope + (log_i_over_sigma - c_upper)
    inside = (side < 0) & ~outliers_all & ~ice_sel
    if not inside.any():
        return -1.0
    return float(1.0 / math.sqrt(d_star_sq[inside].max()))


# ---------------------------------------------------------------------------------------------------------
# DISTL methods (Zhang, Sauter, van den Bedem, Snell & Deacon 2006, J. Appl. Cryst. 39:112, section 2.4.4)


def distl_method_1(d_star_sq: np.ndarray) -> tuple[float, float]:
    """(d_min, noisiness) by method 1: the knee of d*^3 against spot rank (low to high resolution).

    Every step-th spot by descending d (at most about 40 points), then: P_m = the point of steepest mean slope
    from the first (skipping the first three); the distances ("gaps") of the points before P_m from the line
    P_0 P_m; d_min at the last point past the largest gap whose gap is within half a standard deviation of it.
    Noisiness: fraction of slope pairs (i < j) that do not increase. Needs more than 10 spots.
    """
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    n_spots = len(d_star_sq)
    d = 1.0 / np.sqrt(d_star_sq)
    d_star_cubed = np.sqrt(d_star_sq) ** 3  # |rlp|^3

    step = 2
    while n_spots / step > 40:
        step += 1
    order = np.argsort(-d, kind="stable")  # descending d, ties in table order
    subset = order[: (n_spots // step) * step : step]
    ds3 = d_star_cubed[subset]
    d_subset = d[subset]
    n = len(ds3)
    if n < 5:
        raise ValueError(f"distl_method_1 needs at least 10 spots, got {n_spots}")

    # (i) mean slope from the first point; P_m at the steepest, not looking at the first three.
    slopes = (ds3[1:] - ds3[0]) / np.arange(1, n, dtype=np.float64)
    p_m = int(np.argmax(slopes[3:])) + 1 + 3

    # (ii) distances of points 1 .. p_m-1 to the line from P_0 = (0, ds3[0]) to P_m = (p_m, ds3[p_m]).
    vx, vy = ds3[p_m] - ds3[0], -float(p_m)
    norm = math.sqrt(vx * vx + vy * vy)
    vx, vy = vx / norm, vy / norm
    i = np.arange(1, p_m, dtype=np.float64)
    gaps = np.concatenate(([0.0], np.abs(vx * (0.0 - i) + vy * (ds3[0] - ds3[1:p_m]))))
    s = float(np.std(gaps, ddof=1))

    # (iii) the largest gap, then the last later point whose gap exceeds it minus s/2.
    p_k = int(np.argmax(gaps))
    later = np.flatnonzero(gaps[p_k + 1 :] > gaps[p_k] - 0.5 * s)
    p_g = p_k + 1 + int(later[-1]) if later.size else p_k

    pairs = np.triu(slopes[:, None] >= slopes[None, :], k=1)
    noisiness = pairs.sum() / ((n - 1) * (n - 2) / 2)
    return float(d_subset[p_g]), float(noisiness)


def distl_method_2(d_star_sq: np.ndarray) -> tuple[float, float]:
    """(d_min, noisiness) by method 2: spot counts in shells of equal volume (equal steps in d*^3).

    Shells are DIALS's binner_d_star_cubed (20 to 40 shells, the first holding about 5 % or 25 of the distinct
    d values); d_min is the high-resolution edge of the first shell that, with the next one, holds fewer than
    0.15 of the mean count of the first two. Noisiness: fraction of shell pairs (i < j) whose count does not
    fall. Needs more than 10 spots.
    """
    d = 1.0 / np.sqrt(np.asarray(d_star_sq, dtype=np.float64))

    # binner_d_star_cubed(d, target_n_per_bin=25, max_slots=40, min_slots=20), on the distinct d values.
    d_unique = np.unique(d)[::-1]  # descending d: ascending d*^3
    n_unique = len(d_unique)
    low_res_count = int(math.ceil(min(max(25, 0.05 * n_unique), 0.25 * n_unique)))
    if low_res_count >= n_unique:
        raise ValueError(f"distl_method_2 needs more distinct spot resolutions, got {n_unique}")
    ds3_first = (1 / float(d_unique[0])) ** 3
    ds3_last = (1 / float(d_unique[-1])) ** 3
    step = (1 / float(d_unique[low_res_count])) ** 3 - ds3_first
    if not step > 0:
        raise ValueError("distl_method_2: no spread in d*^3")
    n_slots = min(max(int(math.ceil((ds3_last - ds3_first) / step)), 20), 40)
    step = (ds3_last - ds3_first) / n_slots
    shell_d_min, shell_d_max = [], []
    ds3_max = ds3_first
    for i in range(n_slots):
        ds3_min = ds3_first + (i + 1) * step
        shell_d_min.append(1 / ds3_min ** (1 / 3))
        shell_d_max.append(1 / ds3_max ** (1 / 3))
        ds3_max = ds3_min
    shell_d_min = np.array(shell_d_min)
    shell_d_max = np.array(shell_d_max)

    # Counts of all spots, repeated d values included.
    counts = ((d[None, :] < shell_d_max[:, None]) & (d[None, :] >= shell_d_min[:, None])).sum(axis=1)

    t0 = (counts[0] + counts[1]) / 2
    mu = 0.15
    low = counts < mu * t0
    both_low = np.flatnonzero(low[:-1] & low[1:])
    i_stop = int(both_low[0]) if both_low.size else n_slots - 2  # the scan ends on the last pair

    m = len(counts)
    pairs = np.triu(counts[:, None] <= counts[None, :], k=1)
    noisiness = pairs.sum() / (0.5 * m * (m - 1))
    return float(shell_d_min[i_stop]), float(noisiness)


# ---------------------------------------------------------------------------------------------------------


def per_image_stats(d_star_sq: np.ndarray, intensity: np.ndarray) -> ImageStats:
    """DIALS's stats_for_reflection_table(filter_ice=True, ice_rings_width=0.004) for one image's spots, given
    in spot-finder order. Spots at d*^2 = 0 (the direct beam) are left out, as DIALS drops |rlp| = 0."""
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    intensity = np.asarray(intensity, dtype=np.float64)
    keep = d_star_sq > 0
    d_star_sq, intensity = d_star_sq[keep], intensity[keep]

    ice_sel = ice_rings_selection(d_star_sq, width=0.004)
    n_spots_no_ice = int((~ice_sel).sum())
    d = 1.0 / np.sqrt(d_star_sq)

    if n_spots_no_ice > 10:
        estimated_d_min = estimate_resolution_limit(d_star_sq, intensity, ice_sel)
        # Both DISTL methods keep the spots with sigma^2(I) = |I| > 0: all strong spots.
        has_variance = intensity != 0
        d_min_1, noisiness_1 = distl_method_1(d_star_sq[has_variance])
        d_min_2, noisiness_2 = distl_method_2(d_star_sq[has_variance])
    else:
        estimated_d_min = d_min_1 = noisiness_1 = d_min_2 = noisiness_2 = -1.0

    return ImageStats(
        n_spots_total=len(d_star_sq),
        n_spots_no_ice=n_spots_no_ice,
        n_spots_4A=int((d > 4).sum()),
        total_intensity=float(intensity[~ice_sel].sum()),
        estimated_d_min=estimated_d_min,
        d_min_distl_method_1=d_min_1,
        d_min_distl_method_2=d_min_2,
        noisiness_method_1=noisiness_1,
        noisiness_method_2=noisiness_2,
    )
