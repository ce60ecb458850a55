"""The pre-screen on real frames: it never hides a hit, and blank frames are cheap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intxr.images import SyntheticSource, read_cbf
from intxr.reader.prescreen import bin_frame, bin_frame_reference, prescreen
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams
from intxr.reader.threshold import trusted_range_for
from intxr.testing import shared_path


def test_every_real_hit_passes_and_the_blanks_do_not(thaumatin_cbfs):
    """Recall 100% on the real frames where DIALS finds at least min_Bragg_peaks (10) spots."""
    reference = shared_path("reference", "thaumatin_grid")
    hits, blanks = [], []
    for path in thaumatin_cbfs:
        frame = read_cbf(path)
        name = path.rsplit("/", 1)[1].replace(".cbf.bz2", "")
        n_dials = max(
            json.loads((reference / f"{name}.{alg}.json").read_text())["n_spots"]
            for alg in ("dispersion", "dispersion_extended")
        )
        result = prescreen(frame.data, None, trusted_range_for(frame.data, frame.geometry.count_cutoff))
        (hits if n_dials >= 10 else blanks).append(result.passed)
    assert len(hits) == 10 and all(hits)
    assert len(blanks) == 2 and not any(blanks)  # false-positive rate on these blanks: 0 of 2


def test_synthetic_raster_line_blank_ends_fail_and_the_crystal_passes():
    source = SyntheticSource("synthetic:1100x1100:10:3")
    passed = []
    for i in range(10):
        image = source.read(i)
        trusted = trusted_range_for(image.data, image.geometry.count_cutoff)
        passed.append(prescreen(image.data, None, trusted).passed)
    spots = [source.read(i).extra["n_spots_simulated"] for i in range(10)]
    assert passed[0] is False and passed[-1] is False  # no crystal at the ends of the line
    assert all(p for p, n in zip(passed, spots, strict=True) if n >= 20)


def test_binning_kernel_equals_numpy():
    rng = np.random.default_rng(4)
    image = rng.poisson(3, size=(130, 101)).astype(np.int32)
    image[5, 7] = -1
    image[60, 60] = 99999
    mask = rng.random(image.shape) > 0.02
    trusted = (0.0, 5000.0)
    sums, valid = bin_frame(image, mask.astype(np.uint8), trusted, 4)
    ref_sums, ref_valid = bin_frame_reference(image, mask, trusted, 4)
    assert sums.shape == (32, 25) and np.array_equal(valid, ref_valid)
    assert np.array_equal(sums[valid > 0], ref_sums[valid > 0])


def test_a_prescreened_blank_still_produces_a_result(thaumatin_cbfs):
    frame = read_cbf(thaumatin_cbfs[-1])  # thau_3_2_0017: blank
    result = SpotFinder(SpotFinderParams(prescreen=True), frame.geometry).find(frame.data)
    assert result.prescreened and len(result.spots) == 0 and result.stats.n_spots_total == 0
    assert result.score.score == 0 and "threshold" not in result.timing and "prescreen" in result.timing
    assert result.score.errors == ("Too few (0) spots found!",)


@pytest.mark.parametrize("index", [0, 4])
def test_prescreen_does_not_change_results_on_hits(thaumatin_cbfs, index):
    frame = read_cbf(thaumatin_cbfs[index])
    screened = SpotFinder(SpotFinderParams(prescreen=True), frame.geometry).find(frame.data)
    full = SpotFinder(SpotFinderParams(prescreen=False), frame.geometry).find(frame.data)
    assert not screened.prescreened and len(screened.spots) == len(full.spots) > 100
