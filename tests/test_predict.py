"""Predicted spots of an indexed still (intxr.reader.predict): against a brute-force search over every h, against
spots simulated from a lattice, on multi-panel and tilted detectors, bad input, and a real thaumatin hit indexed
with its known cell."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from intxr.geometry import Geometry, Panel
from intxr.reader.indexing import orth_matrix, predict_xy
from intxr.reader.predict import HALF_MOSAICITY, WIDTH, detector_d_star_max, predict_spots
from intxr.testing import shared_path

PIXEL = 0.172
# A PILATUS 6M-like still: 2463 x 2527 pixels of 0.172 mm, 250 mm, 1 A.
GEOMETRY = Geometry.simple(wavelength=1.0, distance=250.0, beam_center=(1231.5, 1263.5), pixel_size=(PIXEL, PIXEL),
                           image_size=(2463, 2527))
TILTED = Geometry.simple(wavelength=0.9, distance=180.0, beam_center=(400.0, 1263.5), pixel_size=(PIXEL, PIXEL),
                         image_size=(2463, 2527), two_theta=25.0, two_theta_axis=(0.0, 1.0, 0.0))


def two_panels(gap: int = 37) -> Geometry:
    """Two 1000 x 2000 panels side by side, `gap` pixels apart in the frame and on the detector."""
    size = (1000, 2000)
    panels = []
    for k in range(2):
        x0 = k * (size[0] + gap)
        origin = ((x0 - 1018.5) * PIXEL, 1000.0 * PIXEL, -200.0)
        panels.append(Panel(f"p{k}", origin, (1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (PIXEL, PIXEL), size, (x0, 0)))
    return Geometry(wavelength=0.98, panels=tuple(panels), distance=200.0, beam_center=(1018.5, 1000.0))


def orientation(cell, seed: int) -> np.ndarray:
    """A = UB of the cell in a random orientation: columns a*, b*, c* in the lab frame."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    u = q * np.sign(np.linalg.det(q))
    return np.linalg.inv(orth_matrix(cell) @ u.T)


def brute_force(geometry: Geometry, a_mat: np.ndarray, d_min: float | None = None) -> dict[tuple, np.ndarray]:
    """Every h of the box |h_i| <= d*_max |a_i| within the band and the resolution, placed on the panel its ray
    meets: h -> (x, y)."""
    d_star_max = detector_d_star_max(geometry)
    if d_min is not None:
        d_star_max = min(d_star_max, 1 / d_min)
    n = np.floor(d_star_max * np.linalg.norm(np.linalg.inv(a_mat), axis=1)).astype(int)
    hkl = np.stack([g.ravel() for g in np.meshgrid(*(np.arange(-m, m + 1) for m in n), indexing="ij")], axis=1)
    r = hkl @ a_mat.T
    q = np.linalg.norm(r, axis=1)
    e = np.linalg.norm(r + geometry.s0, axis=1) - np.linalg.norm(geometry.s0)
    keep = (q > 0) & (q <= d_star_max) & (np.abs(e) <= WIDTH + q * HALF_MOSAICITY)
    hkl, r = hkl[keep], r[keep]
    out = {}
    for i, panel in enumerate(geometry.panels):
        xy = predict_xy(geometry, r, np.full(len(r), i))
        on = np.isfinite(xy).all(axis=1)
        on[on] = panel.contains(xy[on, 0], xy[on, 1])
        for h, p in zip(hkl[on], xy[on], strict=True):
            out.setdefault(tuple(int(v) for v in h), p)
    return out


CASES = [  # (cell, geometry)
    ((57.8, 57.8, 150.0, 90, 90, 90), GEOMETRY),
    ((40.0, 50.0, 60.0, 80.0, 95.0, 105.0), GEOMETRY),
    ((80.0, 80.0, 60.0, 90, 90, 120.0), TILTED),
    ((45.0, 55.0, 70.0, 90, 100.0, 90), two_panels()),
]


@pytest.mark.parametrize("cell,geometry", CASES, ids=["tP", "aP", "hP-tilted", "mP-two-panels"])
def test_every_reflection_in_the_band_is_predicted_where_a_brute_force_search_puts_it(cell, geometry):
    for seed in (1, 2):
        a_mat = orientation(cell, seed)
        want = brute_force(geometry, a_mat)
        got = predict_spots(geometry, a_mat.tolist())
        assert got.reason is None and len(want) > 300, (got.reason, len(want))
        found = {tuple(int(v) for v in h): xy for h, xy in zip(got.miller, got.xy, strict=True)}
        assert set(found) == set(want)
        assert max(np.hypot(*(found[h] - want[h])) for h in want) < 1e-6
        # Nothing off the detector: every position on the panel it names (none in the gap between two).
        for i, panel in enumerate(geometry.panels):
            on = got.panel == i
            assert panel.contains(got.xy[on, 0], got.xy[on, 1]).all()
        fast, slow = geometry.frame_size
        assert (got.xy >= 0).all() and (got.xy[:, 0] < fast).all() and (got.xy[:, 1] < slow).all()
        assert (np.abs(got.excitation_error) <= WIDTH + HALF_MOSAICITY * np.linalg.norm(
            got.miller @ a_mat.T, axis=1) + 1e-12).all()
    if len(geometry.panels) == 2:  # reflections do fall on both panels, and the gap stays empty
        gap = (got.xy[:, 0] >= 1000) & (got.xy[:, 0] < 1037)
        assert not gap.any() and set(got.panel.tolist()) == {0, 1}


def test_spots_simulated_from_a_lattice_are_all_predicted_within_half_a_pixel():
    """A still simulated from a lattice (every rlp within 0.0015 1/A of the sphere and d >= 2 A, placed by the
    stills predictor, 0.2 px noise): each spot has a predicted position within 0.5 px."""
    cell = (57.8, 57.8, 150.0, 90, 90, 90)
    rng = np.random.default_rng(7)
    a_mat = orientation(cell, 7)
    n = [int(np.ceil(v / 2.0)) for v in cell[:3]]
    hkl = np.stack([g.ravel() for g in np.meshgrid(*(np.arange(-m, m + 1) for m in n), indexing="ij")], axis=1)
    r = hkl @ a_mat.T
    q = np.linalg.norm(r, axis=1)
    e = np.linalg.norm(r + GEOMETRY.s0, axis=1) - 1.0
    r = r[(q > 0) & (q <= 0.5) & (np.abs(e) < 0.0015)]
    xy = predict_xy(GEOMETRY, r, np.zeros(len(r), dtype=np.int64))
    on = np.isfinite(xy).all(axis=1) & GEOMETRY.panels[0].contains(xy[:, 0], xy[:, 1])
    spots = xy[on] + rng.normal(scale=0.2, size=(int(on.sum()), 2)) / np.sqrt(2)
    assert len(spots) > 200
    got = predict_spots(GEOMETRY, a_mat)
    nearest = np.array([np.hypot(*(got.xy - s).T).min() for s in spots])
    assert (nearest < 0.5).mean() > 0.99 and np.median(nearest) < 0.3
    # The prediction reaches the detector's edge (2 A limits the simulation, not the prediction).
    assert len(got.xy) > 1.5 * len(spots)
    limited = predict_spots(GEOMETRY, a_mat, d_min=2.0)
    d = 1 / np.linalg.norm(limited.miller @ a_mat.T, axis=1)
    assert d.min() >= 2.0 - 1e-9 and len(limited.xy) < len(got.xy)


@pytest.mark.parametrize("matrix,reason", [
    (None, "not indexed"),
    ([[0.01, 0, 0], [0, 0.01, 0], [0, 0, 0]], "singular"),
    ([[0.01, 0, 0], [0, float("nan"), 0], [0, 0, 0.01]], "finite"),
    ([[0.01, 0], [0, 0.01]], "3x3"),
    ([["a", 0, 0], [0, 0.01, 0], [0, 0, 0.01]], "3x3"),
    (np.eye(3) * 1e-4, "too large"),  # a cell of 10^4 A: refused at once, not enumerated for minutes
])
def test_nothing_is_predicted_for_a_missing_or_unusable_matrix(matrix, reason):
    t = time.perf_counter()
    got = predict_spots(GEOMETRY, matrix)
    assert len(got.xy) == 0 and got.xy.shape == (0, 2) and reason in got.reason
    assert time.perf_counter() - t < 1.0


def test_nothing_is_predicted_without_a_geometry():
    got = predict_spots(Geometry.unknown("series info without geometry"), orientation((50, 60, 70, 90, 90, 90), 1))
    assert len(got.xy) == 0 and "geometry" in got.reason


# The real thaumatin hit (PILATUS 6M, 0.97 A), its spots found and indexed with the known cell as a reader does.


@pytest.fixture(scope="module")
def thaumatin_hit():
    from intxr.images import open_source
    from intxr.reader.indexing import IndexingParams, index_spots
    from intxr.reader.spotfinder import SpotFinder, SpotFinderParams

    path = shared_path("data") / "cbf" / "thaumatin_grid" / "thau_3_2_0005.cbf.bz2"
    image = open_source(str(path)).read(0)
    found = SpotFinder(SpotFinderParams(), image.geometry).find(np.asarray(image.data), skip_prescreen=True)
    result = index_spots(image.geometry, found.spots.x, found.spots.y,
                         IndexingParams(target_unit_cell=(57.8, 57.8, 150, 90, 90, 90), target_space_group="P41212"))
    assert result.indexed, result.errors
    return image.geometry, np.stack([found.spots.x, found.spots.y], axis=1), result


def test_thaumatin_hit_found_spots_lie_on_predicted_ones(thaumatin_hit):
    geometry, spots, result = thaumatin_hit
    got = predict_spots(geometry, result.orientation_matrix)
    assert got.reason is None
    indexed = spots[result.indexed_mask]
    nearest = np.array([np.hypot(*(got.xy - s).T).min() for s in indexed])
    within = float((nearest <= 2.0).mean())
    print(f"thaumatin hit: {len(got.xy)} predicted, {len(spots)} found, {len(indexed)} indexed; "
          f"{within:.0%} of the indexed within 2 px of a prediction (median {np.median(nearest):.2f} px)")
    assert within >= 0.75, within
    # A predicted spot is where the found one is, not merely near one of thousands: shifted by 6 px, few match.
    shifted = np.array([np.hypot(*(got.xy + 6.0 - s).T).min() for s in indexed])
    assert (shifted <= 2.0).mean() < 0.4 * within
    # The set resembles the found spots: within their resolution, a few predictions per found spot, not 20.
    d_found = 1 / np.sqrt(((np.asarray(result.miller[result.indexed_mask]) @ np.array(result.orientation_matrix).T)
                           ** 2).sum(axis=1)).max()
    limited = predict_spots(geometry, result.orientation_matrix, d_min=d_found)
    assert len(spots) < len(limited.xy) < 6 * len(spots), (len(limited.xy), len(spots))


def test_thaumatin_hit_predicts_well_under_50_ms(thaumatin_hit):
    geometry, _spots, result = thaumatin_hit
    times = []
    for _ in range(7):
        t = time.perf_counter()
        predict_spots(geometry, result.orientation_matrix)
        times.append(time.perf_counter() - t)
    print(f"predict_spots on a 6M frame: median {statistics.median(times) * 1000:.1f} ms")
    assert statistics.median(times) < 0.05
