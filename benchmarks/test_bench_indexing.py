"""Native stills indexing with the known cell, per hit, on one core: the 10 real thaumatin grid-scan hits
(spots found once, outside the timing), told the cell and space group as DIALS was for the reference
(`../shared/reference/indexing`). Baseline in the same run: spot finding + stats + score of one of those
frames (the reader's work before indexing), so the group's ratio says what indexing adds to a hit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intxr.images import read_cbf
from intxr.reader.indexing import IndexingParams, index_spots
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams
from intxr.testing import shared_path

HITS = [f"thau_3_2_{i:04d}" for i in range(1, 11)]
PARAMS = IndexingParams(target_unit_cell=(57.8, 57.8, 150.0, 90.0, 90.0, 90.0), target_space_group="P41212")


@pytest.fixture(scope="module")
def hits():
    out = []
    for name in HITS:
        image = read_cbf(str(shared_path("data", "cbf", "thaumatin_grid", f"{name}.cbf.bz2")))
        found = SpotFinder(SpotFinderParams(), image.geometry).find(np.asarray(image.data))
        out.append((name, image, found.spots.x.copy(), found.spots.y.copy()))
    return out


def test_index_thaumatin_hit(benchmark, hits):
    """One hit per call, cycling through the 10: the median is the time per hit."""
    benchmark.group = "index one thaumatin hit (known cell), per hit"
    benchmark.extra_info["role"] = "intxr"
    state = {"i": 0}

    def one():
        name, image, x, y = hits[state["i"] % len(hits)]
        state["i"] += 1
        return index_spots(image.geometry, x, y, PARAMS)

    result = benchmark(one)
    assert result.errors == [] or not result.indexed
    # Every hit once more, outside the timing: how many indexed, and DIALS's wall time for the record.
    indexed = sum(index_spots(image.geometry, x, y, PARAMS).indexed for _, image, x, y in hits)
    benchmark.extra_info["indexed_of_10"] = indexed
    dials = [json.loads(shared_path("reference", "indexing", f"{n}.indexing.json").read_text())["seconds_all_steps"]
             for n in HITS]
    benchmark.extra_info["dials_seconds_all_steps_median"] = float(np.median(dials))
    assert indexed >= 8


def test_spotfinding_same_hit(benchmark, hits):
    benchmark.group = "index one thaumatin hit (known cell), per hit"
    benchmark.extra_info["role"] = "baseline:spot finding + stats + score of the hit"
    _, image, _, _ = hits[4]
    finder = SpotFinder(SpotFinderParams(), image.geometry)
    data = np.asarray(image.data)
    result = benchmark(finder.find, data)
    assert len(result.spots) > 300


def test_index_thaumatin_hit_ab_initio(benchmark, hits):
    """No cell given (fft1d-style search first), one hit per call cycling through the 10."""
    benchmark.group = "index one thaumatin hit ab initio, per hit"
    benchmark.extra_info["role"] = "intxr"
    state = {"i": 0}

    def one():
        name, image, x, y = hits[state["i"] % len(hits)]
        state["i"] += 1
        return index_spots(image.geometry, x, y, IndexingParams())

    result = benchmark(one)
    assert result.method == "fft1d"


def test_spotfinding_same_hit_ab_initio_group(benchmark, hits):
    benchmark.group = "index one thaumatin hit ab initio, per hit"
    benchmark.extra_info["role"] = "baseline:spot finding + stats + score of the hit"
    _, image, _, _ = hits[4]
    finder = SpotFinder(SpotFinderParams(), image.geometry)
    result = benchmark(finder.find, np.asarray(image.data))
    assert len(result.spots) > 300


@pytest.fixture(scope="module")
def score_inputs(hits):
    """The known-cell search's coarse grid for the short axis (57.8 A) on one hit: its low-resolution rlps against
    the hemisphere's directions."""
    from intxr.reader.indexing import hemisphere, reciprocal_points

    _, image, x, y = hits[4]
    rlps, _ = reciprocal_points(image.geometry, x, y)
    return rlps[np.linalg.norm(rlps, axis=1) <= 0.3 / (57.8 * 0.03)], hemisphere(6981)


def test_direction_score_kernel(benchmark, score_inputs):
    from intxr.reader import indexing

    if indexing._lattice_score_kernel is None:
        pytest.skip("the latticescore kernel is not built (pip install -e . builds cython_ext/)")
    benchmark.group = "known-cell direction score, one axis, one hit"
    benchmark.extra_info["role"] = "intxr"
    rlps, dirs = score_inputs
    got = benchmark(indexing._lattice_score, rlps, dirs, 57.8)
    exact = np.cos(2 * np.pi * 57.8 * (rlps @ dirs.T)).sum(axis=0)
    assert np.abs(got - exact).max() < 1e-4 * len(rlps) + 1e-3  # float32 and the polynomial's 4e-5


def test_direction_score_numpy(benchmark, score_inputs):
    from intxr.reader import indexing

    benchmark.group = "known-cell direction score, one axis, one hit"
    benchmark.extra_info["role"] = "baseline:numpy reference (same polynomial)"
    rlps, dirs = score_inputs
    got = benchmark(indexing._lattice_score_numpy, rlps, dirs, 57.8)
    exact = np.cos(2 * np.pi * 57.8 * (rlps @ dirs.T)).sum(axis=0)
    assert np.abs(got - exact).max() < 1e-4 * len(rlps) + 1e-3
