"""Per-image statistics against DIALS's own results on the real frames, and the rules one by one."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import numpy as np
import pytest

from intxr.geometry import Geometry, d_star_sq
from intxr.images import read_cbf
from intxr.reader.stats import (
    ImageStats,
    distl_method_1,
    distl_method_2,
    estimate_resolution_limit,
    ice_ring_d_star_sq,
    ice_rings_selection,
    per_image_stats,
)
from intxr.testing import shared_path

THAUMATIN_FRAMES = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010", "0016", "0017"]
REFERENCES = (
    [f"thaumatin_grid/thau_3_2_{frame}.{algorithm}.json" for frame in THAUMATIN_FRAMES
     for algorithm in ("dispersion", "dispersion_extended")]
    + ["thaumatin_grid/thau_3_2_0003.dispersion.dmin4.5_dmax40.json",
       "thaumatin_grid/thau_3_2_0010.dispersion.dmin4.5_dmax40.json"]
    + ["stream_v1/dls_eiger2_roi4m_frame44.dispersion.json",
       "stream_v1/dls_eiger2_roi4m_frame44.dispersion_extended.json"]
)  # fmt: skip

# The DLS EIGER2 stream frame: geometry from its stream-v1 header (dheader config of
# data/stream_v1/dls_eiger2_16m_roi4m/header), as DIALS was given it (reference input_notes). Its stats match
# only without the parallax correction (DIALS evidently had no sensor model for this frame); with the correction
# one more spot falls off an ice ring. The header's own wavelength matters too: the float32 0.9762458 of the
# NeXus master gives 1e-9 relative differences, the header's value 4e-16.
DLS_GEOMETRY = Geometry.simple(
    wavelength=0.9762458012141636,
    distance=337.0,
    beam_center=(1041.2470038560409, 1115.7474063453324),
    pixel_size=(0.075, 0.075),
    image_size=(2068, 2162),
)  # no sensor model: no parallax


@lru_cache(maxsize=16)
def cbf_geometry(source: str) -> Geometry:
    return read_cbf(str(shared_path(source))).geometry


def reference_spots(name: str, geometry: Geometry | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """The reference JSON, d*^2 of its spots (miniCBF geometry with parallax, or the one given) and intensities."""
    reference = json.loads(shared_path("reference", name).read_text())
    if geometry is None:
        geometry = DLS_GEOMETRY if name.startswith("stream_v1/") else cbf_geometry(reference["source"])
    spots = reference["spots"]
    x = np.array([s["x"] for s in spots], dtype=np.float64)
    y = np.array([s["y"] for s in spots], dtype=np.float64)
    intensity = np.array([s["intensity"] for s in spots], dtype=np.float64)
    return reference, d_star_sq(geometry, x, y), intensity


def assert_stats_equal(ours: ImageStats, expected: dict) -> None:
    ours = ours.as_dict()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        if key.startswith("n_spots"):
            assert ours[key] == value, key
        elif value == -1:
            assert ours[key] == -1.0, key
        else:
            assert ours[key] == pytest.approx(value, rel=1e-6, abs=0), key


@pytest.mark.parametrize("name", REFERENCES)
def test_stats_match_dials(name):
    reference, spot_d_star_sq, intensity = reference_spots(name)
    assert_stats_equal(per_image_stats(spot_d_star_sq, intensity), reference["stats"])


def test_dls_stats_need_no_parallax_correction():
    name = "stream_v1/dls_eiger2_roi4m_frame44.dispersion.json"
    panel = dataclasses.replace(DLS_GEOMETRY.panels[0], thickness=0.45, material="Si")
    with_parallax = dataclasses.replace(DLS_GEOMETRY, panels=(panel,))
    reference, spot_d_star_sq, intensity = reference_spots(name, with_parallax)
    stats = per_image_stats(spot_d_star_sq, intensity)
    assert stats.n_spots_no_ice == reference["stats"]["n_spots_no_ice"] + 1


# ---------------------------------------------------------------------------------------------------------
# Ice rings


def test_ice_ring_positions():
    # Ice Ih (100), (002), (101), (102), (110), ... to 1.366 A; d*^2 to 5 decimals.
    expected = [0.06590, 0.07429, 0.08447, 0.14019, 0.19771, 0.23304, 0.26361, 0.27199, 0.28218, 0.29714,
                0.33789, 0.36304, 0.43075, 0.46132, 0.47989, 0.49485, 0.53019, 0.53560]  # fmt: skip
    rings = ice_ring_d_star_sq(1.36, 0.002)
    assert rings == pytest.approx(expected, abs=5.1e-6)
    assert 1.0 / np.sqrt(rings[:3]) == pytest.approx([3.895, 3.669, 3.441], abs=5e-4)
    assert np.all(np.diff(rings) >= 0)


def test_ice_ring_list_follows_d_min_and_excludes_absences():
    # Out to 1/d_min^2 + half_width only.
    assert ice_ring_d_star_sq(4.0, 0.002).size == 0
    assert ice_ring_d_star_sq(3.9, 0.002).size == 1  # (100) at 3.895 A, within the half width
    assert ice_ring_d_star_sq(3.0, 0.002).size == 3
    rings = ice_ring_d_star_sq(1.0, 0.002)
    assert rings.max() <= 1.0 + 0.002
    # (001) and (003) are absent in P6_3/mmc (00l: l = 2n), (002) and (004) are not.
    c = 7.338
    assert not np.isclose(rings, 1 / c**2, rtol=0, atol=1e-12).any()
    assert not np.isclose(rings, 9 / c**2, rtol=0, atol=1e-12).any()
    assert np.isclose(rings, 4 / c**2, rtol=0, atol=1e-12).any()
    assert np.isclose(rings, 16 / c**2, rtol=0, atol=1e-12).any()


def test_ice_selection_boundary_is_strict():
    # A width of 2^-8 makes the half width 2^-9 and the spot-ring differences exact.
    width = 2.0**-8
    anchor = 0.5  # the highest-resolution spot sets the ring list
    ring = ice_ring_d_star_sq(1 / np.sqrt(anchor), width / 2)[0]
    on_edge_above = ring + width / 2
    on_edge_below = ring - width / 2
    assert on_edge_above - ring == width / 2 and ring - on_edge_below == width / 2
    spots = np.array([on_edge_above, np.nextafter(on_edge_above, 0), on_edge_below, np.nextafter(on_edge_below, 1),
                      ring, anchor])  # fmt: skip
    assert ice_rings_selection(spots, width).tolist()[:5] == [False, True, False, True, True]


def test_ice_selection_default_width_and_empty_input():
    ring = ice_ring_d_star_sq(1.5, 0.002)[0]
    spots = np.array([ring + 0.0019, ring - 0.0019, ring + 0.0021, 0.4])
    assert ice_rings_selection(spots).tolist()[:3] == [True, True, False]
    assert ice_rings_selection(np.array([])).shape == (0,)


# ---------------------------------------------------------------------------------------------------------
# per_image_stats


def off_ice_spots(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n spots between 10 and 4.2 A (below the first ice ring) with varied intensities."""
    spot_d_star_sq = np.linspace(0.01, 0.055, n)
    intensity = rng.integers(20, 2000, n).astype(np.float64)
    return spot_d_star_sq, intensity


def test_ten_spots_off_ice_give_minus_one():
    rng = np.random.default_rng(1)
    spot_d_star_sq, intensity = off_ice_spots(10, rng)
    # Spots on ice rings count in n_spots_total but not in n_spots_no_ice or total_intensity.
    rings = ice_ring_d_star_sq(1 / np.sqrt(0.0845), 0.002)
    spot_d_star_sq = np.concatenate([spot_d_star_sq, rings[:3]])
    intensity = np.concatenate([intensity, [1e6, 1e6, 1e6]])
    stats = per_image_stats(spot_d_star_sq, intensity)
    assert (stats.n_spots_total, stats.n_spots_no_ice, stats.n_spots_4A) == (13, 10, 10)
    assert stats.total_intensity == intensity[:10].sum()
    for key in ("estimated_d_min", "d_min_distl_method_1", "d_min_distl_method_2", "noisiness_method_1",
                "noisiness_method_2"):  # fmt: skip
        assert getattr(stats, key) == -1.0

    stats = per_image_stats(*off_ice_spots(11, rng))
    assert stats.n_spots_no_ice == 11
    assert stats.estimated_d_min > 0 and stats.d_min_distl_method_1 > 0 and stats.d_min_distl_method_2 > 0
    assert 0 <= stats.noisiness_method_1 <= 1 and 0 <= stats.noisiness_method_2 <= 1


def test_n_spots_4A_counts_lower_resolution_than_4A():
    rng = np.random.default_rng(2)
    spot_d_star_sq = np.array([1 / 4.0**2, 1 / 4.01**2, 1 / 3.99**2, 1 / 10.0**2])
    stats = per_image_stats(spot_d_star_sq, rng.integers(10, 100, 4))
    assert stats.n_spots_4A == 2  # d > 4 strictly


def test_empty_input_and_direct_beam():
    stats = per_image_stats(np.array([]), np.array([]))
    assert stats == ImageStats(0, 0, 0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0)
    assert isinstance(stats.total_intensity, float)
    # A spot at d*^2 = 0 (on the direct beam) is dropped, as DIALS drops |rlp| = 0.
    assert per_image_stats(np.array([0.0, 0.02]), np.array([5.0, 7.0])).n_spots_total == 1


def test_equal_intensities_give_parallel_lines():
    # ln(I/sigma) all equal: both fits are flat, the lines never cross, and DIALS returns -1.
    spot_d_star_sq = np.linspace(0.01, 0.055, 30)
    assert estimate_resolution_limit(spot_d_star_sq, np.full(30, 100.0)) == -1.0


def test_ice_spots_fill_bins_but_never_set_the_estimate():
    rng = np.random.default_rng(3)
    spot_d_star_sq, intensity = off_ice_spots(60, rng)
    ice_sel = np.zeros(60, dtype=bool)
    ice_sel[-5:] = True  # the five highest-resolution spots
    # Without the flags the highest-resolution spot is the estimate; with them, the highest one off the ice.
    assert estimate_resolution_limit(spot_d_star_sq, intensity) == 1 / np.sqrt(spot_d_star_sq[-1])
    assert estimate_resolution_limit(spot_d_star_sq, intensity, ice_sel) == 1 / np.sqrt(spot_d_star_sq[-6])


def test_distl_methods_on_a_falling_spot_density():
    # 400 spots uniform in d*^3 to 2.5 A, then 20 sparse ones to 1.5 A: both methods put d_min near 2.5 A.
    ds3 = np.concatenate([np.linspace(0.001, 1 / 2.5**3, 400), np.linspace(1 / 2.45**3, 1 / 1.5**3, 20)])
    spot_d_star_sq = ds3 ** (2 / 3)
    d_min_1, noisiness_1 = distl_method_1(spot_d_star_sq)
    d_min_2, noisiness_2 = distl_method_2(spot_d_star_sq)
    assert 2.3 <= d_min_1 <= 2.6
    assert 2.3 <= d_min_2 <= 2.6
    assert 0 <= noisiness_1 <= 1 and 0 <= noisiness_2 <= 1
