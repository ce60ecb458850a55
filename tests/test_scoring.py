"""The original Interceptor frame score, rule by rule, and on DIALS's spot lists of the real frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intxr.geometry import d_star_sq
from intxr.images import read_cbf
from intxr.reader.scoring import (
    FrameScore,
    count_ice_rings,
    ice_ring_points,
    max_intensity_4_to_15,
    resolution_points,
    score_frame,
    shape_points,
    shape_ratios,
    strength_points,
)
from intxr.reader.stats import ice_ring_d_star_sq
from intxr.testing import shared_path


def reference_frame(frame: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d*^2, intensity and bbox of DIALS's dispersion spots on a thaumatin frame."""
    reference = json.loads(shared_path("reference", "thaumatin_grid", f"thau_3_2_{frame}.dispersion.json").read_text())
    geometry = read_cbf(str(shared_path(reference["source"]))).geometry
    spots = reference["spots"]
    x = np.array([s["x"] for s in spots], dtype=np.float64)
    y = np.array([s["y"] for s in spots], dtype=np.float64)
    intensity = np.array([s["intensity"] for s in spots], dtype=np.float64)
    bbox = np.array([s["bbox"] for s in spots], dtype=np.int64).reshape(-1, 4)
    return d_star_sq(geometry, x, y), intensity, bbox


# (frame, n_spots, score, hres, n_ice_rings, mean_shape_ratio): the spec's table, derived by the original rules
# from DIALS's spot lists (not the original program's output).
DERIVED = [
    ("0001", 253, 6, 2.19, 3, 1.81),
    ("0003", 1219, 11, 1.65, 5, 1.88),
    ("0010", 844, 8, 1.81, 4, 1.77),
]


@pytest.mark.parametrize(("frame", "n_spots", "score", "hres", "n_ice_rings", "mean_shape_ratio"), DERIVED)
def test_real_frames(frame, n_spots, score, hres, n_ice_rings, mean_shape_ratio):
    result = score_frame(*reference_frame(frame))
    assert result.n_spots == n_spots
    assert result.score == score
    assert f"{result.hres:.2f}" == f"{hres:.2f}"
    assert result.n_ice_rings == n_ice_rings
    assert f"{result.mean_shape_ratio:.2f}" == f"{mean_shape_ratio:.2f}"
    assert result.n_overloads == 0 and result.errors == ()


@pytest.mark.parametrize(("frame", "n_found"), [("0016", 0), ("0017", 1)])
def test_real_frames_below_min_bragg_peaks(frame, n_found):
    result = score_frame(*reference_frame(frame))
    assert result == FrameScore(n_found, 0, 0, 99.0, 0, 0.0, (f"Too few ({n_found}) spots found!",))
    assert f"{result.hres:.2f} {result.mean_shape_ratio:.2f}" == "99.00 0.00"


def test_real_frame_0001_hres_is_its_highest_resolution_good_spot():
    # The first spot DIALS finds on 0001 sits at 2.1938 A (geometry checked against dxtbx).
    result = score_frame(*reference_frame("0001"))
    assert result.hres == pytest.approx(2.19382802039144, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Rule by rule


@pytest.mark.parametrize(
    ("hres", "points"),
    [
        (99.9, -2), (20.0001, -2), (20.0, 0), (19.99, 1), (8.0, 1), (7.99, 2), (5.0, 2), (4.99, 3), (4.0, 3),
        (3.99, 4), (3.2, 4), (3.19, 5), (2.7, 5), (2.69, 7), (2.4, 7), (2.39, 8), (2.0, 8), (1.99, 10), (1.7, 10),
        (1.69, 12), (1.5, 12), (1.49, 14), (0.8, 14), (-1.0, 14),
    ],
)  # fmt: skip
def test_resolution_points(hres, points):
    assert resolution_points(hres) == points


@pytest.mark.parametrize(("max_intensity", "points"), [(0, 0), (14999, 0), (15000, 1), (39999, 1), (40000, 2)])
def test_strength_points(max_intensity, points):
    assert strength_points(max_intensity) == points


@pytest.mark.parametrize(("n_rings", "points"), [(0, 0), (1, -1), (2, -2), (3, -2), (4, -3), (9, -3)])
def test_ice_ring_points(n_rings, points):
    assert ice_ring_points(n_rings) == points


@pytest.mark.parametrize(
    ("mean", "median", "std", "points"),
    [
        (1.5, 1.5, 0.5, 0),
        (2.01, 1.5, 0.5, -2),  # elongated on average
        (2.0, 1.5, 0.5, 0),
        (1.5, 1.5, 1.01, -2),  # widely spread
        (2.5, 2.0, 1.5, -4),
        (1.2, 1.34, 0.39, 2),  # round spots
        (1.2, 1.35, 0.39, 0),
        (1.2, 1.34, 0.4, 0),
    ],
)
def test_shape_points(mean, median, std, points):
    assert shape_points(mean, median, std) == points


def test_shape_ratios_from_half_open_bbox():
    bbox = np.array([[0, 3, 0, 1], [10, 12, 5, 9], [4, 7, 4, 7]])
    assert shape_ratios(bbox).tolist() == [3.0, 2.0, 1.0]


def test_max_intensity_between_4_and_15_A():
    # d = 2, 4, 8 and 16 A (d*^2 exact in binary): 4 A is in, 2 and 16 A are out.
    spot_d_star_sq = np.array([1 / 4, 1 / 16, 1 / 64, 1 / 256])
    assert max_intensity_4_to_15(spot_d_star_sq, np.array([9e4, 100.0, 50.0, 8e4])) == 100.0
    assert max_intensity_4_to_15(spot_d_star_sq[[0, 3]], np.array([9e4, 8e4])) == 0.0


def test_count_ice_rings_five_percent_of_all_spots():
    ring = ice_ring_d_star_sq(1 / np.sqrt(0.315), 0.01)[3]  # (102) at 2.67 A
    anchor = np.array([0.315])  # sets d_min, off every ring window
    five = np.full(5, ring + 0.009)  # inside the +-0.01 window (the spot filter's +-0.002 would miss them)
    assert count_ice_rings(np.concatenate([five, anchor]), n_observed=100) == 1
    assert count_ice_rings(np.concatenate([five[:4], anchor]), n_observed=100) == 0
    assert count_ice_rings(np.concatenate([five, anchor]), n_observed=101) == 0
    assert count_ice_rings(np.concatenate([np.full(5, ring + 0.01), anchor]), n_observed=100) == 0  # strict


def test_count_ice_rings_windows_overlap():
    rings = ice_ring_d_star_sq(1 / np.sqrt(0.315), 0.01)
    between = (rings[0] + rings[1]) / 2  # (100) and (002) are 0.0084 apart: one spot counts for both
    spots = np.concatenate([np.full(10, between), [0.315]])
    assert count_ice_rings(spots) == 2
    assert count_ice_rings(np.array([])) == 0


# ---------------------------------------------------------------------------------------------------------
# score_frame with crafted spots


def low_resolution_frame(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n spots between 9.5 and 18.5 A (far from ice), modest intensities, 2x2 (round) bounding boxes."""
    rng = np.random.default_rng(seed)
    d = np.linspace(9.5, 18.5, n)
    intensity = rng.integers(50, 5000, n).astype(np.float64)
    bbox = np.tile([0, 2, 0, 2], (n, 1))
    return 1 / d**2, intensity, bbox


def test_few_good_spots_score_the_floor_at_low_resolution():
    # 10 good spots: hres 99.9 (-2); round spots (+2); total 0, floored to 0 as hres > 20.
    result = score_frame(*low_resolution_frame(10))
    assert result == FrameScore(10, 0, 0, 99.9, 0, 1.0, ())


def test_floor_is_one_when_the_resolution_is_known():
    # 30 spots at 9.5-18.5 A: hres in 8-20 A (+1); elongated, spread boxes (-2, -2): total -3, floored to 1.
    spot_d_star_sq, intensity, bbox = low_resolution_frame(30)
    bbox[:] = [0, 6, 0, 1]
    bbox[::3] = [0, 2, 0, 2]
    result = score_frame(spot_d_star_sq, intensity, bbox)
    assert 9.5 <= result.hres <= 18.5
    assert result.mean_shape_ratio == pytest.approx((20 * 6 + 10 * 1) / 30)
    assert result.score == 1


def test_score_adds_the_terms():
    # hres 8-20 A (+1), strongest spot 40000 at 4-15 A (+2), round spots (+2): 5.
    spot_d_star_sq, intensity, bbox = low_resolution_frame(30)
    intensity[0] = 40000.0  # the 9.5 A spot
    result = score_frame(spot_d_star_sq, intensity, bbox)
    assert 8 <= result.hres <= 20
    assert result.score == 1 + 2 + 2


def test_ice_rings_lower_the_score():
    spot_d_star_sq, intensity, bbox = low_resolution_frame(30)
    rings = ice_ring_d_star_sq(1 / np.sqrt(0.09), 0.01)
    # Two spots each 0.005 beyond (100) and (101): off DIALS's ice filter, inside the ring windows (2/34 > 5 %).
    ring_spots = np.array([rings[0] - 0.005, rings[0] - 0.005, rings[2] + 0.005, rings[2] + 0.005])
    with_rings = score_frame(
        np.concatenate([spot_d_star_sq, ring_spots]),
        np.concatenate([intensity, np.full(4, 100.0)]),
        np.concatenate([bbox, np.tile([0, 2, 0, 2], (4, 1))]),
    )
    assert (with_rings.n_spots, with_rings.n_ice_rings) == (34, 2)
    # The ring spots (3.4-4.0 A) also move hres to 3.2-4 A (+4); two ice rings (-2), round spots (+2).
    assert 3.2 <= with_rings.hres < 4
    assert with_rings.score == 4 - 2 + 2


def test_no_score_calculated():
    frame = low_resolution_frame(30)
    scored = score_frame(*frame)
    result = score_frame(*frame, calculate_score=False)
    assert result.score == -999
    assert (result.n_ice_rings, result.mean_shape_ratio) == (0, 1.0)
    assert (result.n_spots, result.hres) == (scored.n_spots, scored.hres)


def test_min_bragg_peaks():
    frame = low_resolution_frame(9)
    result = score_frame(*frame, n_overloads=3)
    assert result == FrameScore(9, 0, 0, 99.0, 0, 0.0, ("Too few (9) spots found!",))
    # At the threshold the frame is scored; below the threshold of good spots the error still shows.
    assert score_frame(*frame, min_bragg_peaks=9).errors == ()
    assert score_frame(*frame, min_bragg_peaks=9).hres == 99.9


def test_too_few_good_spots_reports_the_raw_count():
    spot_d_star_sq, intensity, bbox = low_resolution_frame(8)
    rings = ice_ring_d_star_sq(1 / np.sqrt(0.15), 0.002)
    on_ice = rings[:4]  # exactly on (100), (002), (101), (102): removed by the ice filter
    result = score_frame(
        np.concatenate([spot_d_star_sq, on_ice]),
        np.concatenate([intensity, np.full(4, 100.0)]),
        np.concatenate([bbox, np.tile([0, 2, 0, 2], (4, 1))]),
    )
    assert result.n_spots == 8
    assert result.errors == ("Too few (12) spots found!",)
    assert result.n_ice_rings == 4  # each ring holds 1/12 of the spots
    # Without the ice filter all 12 count.
    unfiltered = score_frame(
        np.concatenate([spot_d_star_sq, on_ice]),
        np.concatenate([intensity, np.full(4, 100.0)]),
        np.concatenate([bbox, np.tile([0, 2, 0, 2], (4, 1))]),
        ice_filter=False,
    )
    assert unfiltered.n_spots == 12 and unfiltered.errors == ()


def test_resolution_window_is_inclusive():
    spot_d_star_sq, intensity, bbox = low_resolution_frame(30)
    d = 1 / np.sqrt(spot_d_star_sq)
    d_min, d_max = float(d[5]), float(d[20])  # the spots' own d: both ends inclusive
    result = score_frame(spot_d_star_sq, intensity, bbox, d_min=d_min, d_max=d_max)
    assert result.n_spots == int(((d >= d_min) & (d <= d_max)).sum()) == 16
    # The window changes n_spots only: hres is estimated on all ice-free spots.
    assert result.hres == score_frame(spot_d_star_sq, intensity, bbox).hres
    assert score_frame(spot_d_star_sq, intensity, bbox, d_min=d_min, d_max=d_max, good_spots_only=False).n_spots == 30
    # Default window 0.1-99 A: a spot beyond 99 A is not good.
    far = score_frame(
        np.concatenate([spot_d_star_sq, [1 / 120.0**2]]),
        np.concatenate([intensity, [10.0]]),
        np.vstack([bbox, bbox[0]]),
    )
    assert far.n_spots == 30


def test_n_overloads_is_the_callers():
    assert score_frame(*low_resolution_frame(30), n_overloads=4).n_overloads == 4
