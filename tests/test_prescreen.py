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


# The Rust kernels (binning inside the bitshuffle-LZ4 decoder, the dispersion test on the binned
# frame) against the Cython kernels and numpy: the pre-screen's decision rests on these being equal.

_DTYPES = (np.uint8, np.uint16, np.uint32, np.int32)


def _cython_bin(image, mask, trusted, factor):
    from intxr._kernels.prescreen import bin_frame as kernel

    from intxr.reader.threshold import _checked

    image, mask = _checked(image, mask)
    return kernel(image, mask, float(trusted[0]), float(trusted[1]), int(factor))


def _random_frame(rng, shape, dtype):
    image = rng.poisson(rng.uniform(0.5, 30), size=shape).astype(np.int64)
    for _ in range(6):  # spots: a few bright pixels together
        j, i = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        image[j : j + 3, i : i + 3] += rng.integers(50, 3000)
    info = np.iinfo(dtype)
    image = np.clip(image, info.min, info.max).astype(dtype)
    flat = image.reshape(-1)
    flat[rng.choice(flat.size, 20)] = info.max  # gaps / dead pixels (untrusted)
    if dtype == np.int32:
        flat[rng.choice(flat.size, 5)] = -2
    if dtype == np.uint32:
        flat[rng.choice(flat.size, 5)] = (1 << 26) + 7  # trusted but above DIALS's 2^24 sum limit
    return image


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_rust_binning_equals_the_cython_kernel_and_numpy(dtype, factor):
    rng = np.random.default_rng(factor * 7 + np.dtype(dtype).itemsize)
    for shape in ((64, 96), (131, 101), (37, 250)):
        image = _random_frame(rng, shape, dtype)
        mask = (rng.random(shape) > 0.01).astype(np.uint8)
        top = float(np.iinfo(dtype).max - 2) if np.dtype(dtype).kind == "u" else 1e7
        for trusted in ((0.0, top), (0.0, np.inf), (1.5, 250.0), (-10.0, 1e30), (5.0, 2.0)):
            for m in (None, mask):
                sums, valid = bin_frame(image, m, trusted, factor)
                ref_sums, ref_valid = _cython_bin(image, m, trusted, factor)
                assert sums.dtype == np.uint32 and valid.dtype == np.uint8
                assert np.array_equal(valid, ref_valid), (shape, trusted)
                assert np.array_equal(sums, ref_sums), (shape, trusted)  # even untrusted blocks' sums
                np_sums, np_valid = bin_frame_reference(image, m, trusted, factor)
                np_sums = np.minimum(np_sums, 0xFFFFFFFF)  # the kernels saturate
                assert np.array_equal(valid, np_valid) and np.array_equal(sums[valid > 0], np_sums[valid > 0])


@pytest.mark.parametrize("dtype", _DTYPES)
def test_decoding_and_binning_in_one_pass_equals_decode_then_bin(dtype):
    from intxr import codec
    from intxr.reader.prescreen import decode_and_bin

    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    for shape in ((257, 199), (40, 1030)):  # blocks end mid-row; partial trailing block
        image = _random_frame(rng, shape, dtype)
        mask = (rng.random(shape) > 0.02).astype(np.uint8)
        trusted = trusted_range_for(image, 60000)
        encodings = ["bslz4", "lz4<", "none"] + ([codec.v1_encoding("bslz4", dtype)] if dtype != np.int32 else [])
        # A reader's arrays, refilled frame after frame (stale contents must not leak through).
        binned_shape = (shape[0] // 4, shape[1] // 4)
        bins = (np.full(binned_shape, 7, np.uint32), np.full(binned_shape, 9, np.uint8))
        for encoding in encodings:
            blob = codec.encode(image, encoding)
            for m, reuse in ((None, None), (mask, None), (None, bins), (mask, bins)):
                out = np.zeros_like(image)
                decoded, (sums, valid) = decode_and_bin(blob, encoding, out, trusted, 4, m, reuse)
                if reuse is not None and encoding.startswith("bs"):
                    assert sums is bins[0] and valid is bins[1]
                assert decoded is out and np.array_equal(out, image)
                ref_sums, ref_valid = _cython_bin(image, m, trusted, 4)
                assert np.array_equal(sums, ref_sums) and np.array_equal(valid, ref_valid), encoding
    out = np.zeros((257, 199), dtype)
    with pytest.raises(codec.DecodeError):  # a truncated blob is an error, as decode_into says
        decode_and_bin(codec.encode(image, "bslz4")[:-100], "bslz4", np.zeros_like(image), trusted, 4)


def _strong_bins_reference(sums, valid):
    """The numpy reference of DIALS's `dispersion` test (float64 summed-area tables) on the bins."""
    from intxr.reader.threshold import ThresholdParams, strong_mask_reference

    params = ThresholdParams(algorithm="dispersion", sigma_background=6.0, sigma_strong=3.0)
    return np.flatnonzero(strong_mask_reference(sums, valid, (0.0, np.inf), params))


def test_strong_bins_equal_the_numpy_reference_on_random_binned_frames():
    from intxr.reader.prescreen import strong_bins

    rng = np.random.default_rng(11)
    found = 0
    for trial in range(40):
        shape = (int(rng.integers(1, 90)), int(rng.integers(1, 140)))
        sums = rng.poisson(rng.uniform(0.2, 400), size=shape).astype(np.uint32)
        for _ in range(int(rng.integers(0, 12))):
            sums[rng.integers(0, shape[0]), rng.integers(0, shape[1])] += int(rng.integers(20, 5000))
        if trial % 5 == 0:
            sums.reshape(-1)[rng.choice(sums.size, 3)] = (1 << 24) + int(rng.integers(0, 1000))
        valid = (rng.random(shape) > rng.uniform(0, 0.3)).astype(np.uint8)
        strong = strong_bins(sums, valid)
        assert np.array_equal(strong, _strong_bins_reference(sums, valid)), trial
        found += len(strong)
    assert found > 20  # the comparison saw strong bins, not only empty lists


def test_the_pre_screen_decides_as_before_on_every_real_frame(thaumatin_cbfs):
    """The Rust binning equals the Cython binning, the strong bins equal the numpy reference's, frame
    by frame, and the fused decode gives the same result as pre-screening the decoded frame."""
    from intxr import codec
    from intxr.reader.prescreen import PrescreenParams, decode_and_bin, strong_bins

    for path in thaumatin_cbfs:
        frame = read_cbf(path)
        for dtype in (np.uint16, np.uint32):
            image = np.clip(frame.data, 0, np.iinfo(dtype).max).astype(dtype)
            trusted = trusted_range_for(image, frame.geometry.count_cutoff)
            ref_sums, ref_valid = _cython_bin(image, None, trusted, 4)
            sums, valid = bin_frame(image, None, trusted, 4)
            assert np.array_equal(sums, ref_sums) and np.array_equal(valid, ref_valid)
            assert np.array_equal(strong_bins(sums, valid, PrescreenParams()), _strong_bins_reference(sums, valid))
            plain = prescreen(image, None, trusted)
            blob = codec.encode(image, codec.v1_encoding("bslz4", dtype))
            out = np.empty_like(image)
            _, binned = decode_and_bin(blob, codec.v1_encoding("bslz4", dtype), out, trusted, 4)
            assert prescreen(out, None, trusted, binned=binned) == plain


def test_a_reader_decodes_and_prescreens_in_one_pass_with_the_same_result(thaumatin_cbfs):
    from intxr import codec
    from intxr.reader.source import ServedFrame

    for index in (0, 4, 11):  # hits and the last blank
        frame = read_cbf(thaumatin_cbfs[index])
        image = frame.data.astype(np.uint32)
        mask = np.ones(image.shape, bool)
        mask[100:300, 200:900] = False
        finder = SpotFinder(SpotFinderParams(prescreen=True), frame.geometry, static_mask=mask)
        meta = {"series": 1, "frame": 1, "shape": list(image.shape), "type": "uint32", "encoding": "bs32-lz4<"}
        served = ServedFrame(meta, {}, memoryview(codec.encode(image, "bs32-lz4<")), 0.0)
        served.binning = finder.binning_for(served.dtype, served.shape)
        decoded = served.pixels(np.empty_like(image))
        assert served.binned is not None and np.array_equal(decoded, image)
        fused = finder.find(decoded, binned=served.binned)
        plain = finder.find(image)
        assert fused.prescreened == plain.prescreened == (index == 11)
        assert fused.prescreen == plain.prescreen and len(fused.spots) == len(plain.spots)
    assert finder.binning_for(served.dtype, served.shape, skip_prescreen=True) is None


_KERNEL_SCRIPT = """
import json, sys
import numpy as np
from intxr import codec
from intxr.reader.prescreen import decode_and_bin, strong_bins
rng = np.random.default_rng(5)
image = rng.poisson(4, size=(515, 1031)).astype(np.uint16)
image[rng.integers(0, 515, 40), rng.integers(0, 1031, 40)] = 3000
image[7, 7] = 65535
out = np.empty_like(image)
_, (sums, valid) = decode_and_bin(codec.encode(image, "bs16-lz4<"), "bs16-lz4<", out, (0.0, 65533.0), 4)
print(json.dumps([sums.tolist(), valid.tolist(), strong_bins(sums, valid).tolist(), bool((out == image).all())]))
"""


def test_every_kernel_path_bins_and_thresholds_alike():
    """The AVX-512, GFNI, AVX2 and portable paths (forced with INTXR_BSLZ4_KERNEL in fresh processes; a path the
    CPU lacks falls back) give the same binned frame as the Cython kernel, and the strong bins of the
    numpy reference."""
    import json
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    image = rng.poisson(4, size=(515, 1031)).astype(np.uint16)
    image[rng.integers(0, 515, 40), rng.integers(0, 1031, 40)] = 3000
    image[7, 7] = 65535
    ref_sums, ref_valid = _cython_bin(image, None, (0.0, 65533.0), 4)
    expected = [ref_sums.tolist(), ref_valid.tolist(), _strong_bins_reference(ref_sums, ref_valid).tolist(), True]
    assert len(expected[2]) > 5
    for kernel in ("scalar", "sse2", "avx2", "gfni", "avx512"):
        env = dict(os.environ, INTXR_BSLZ4_KERNEL=kernel)
        run = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], env=env, capture_output=True, text=True,
                             check=True)
        assert json.loads(run.stdout) == expected, kernel


@pytest.mark.parametrize("wrong", ["sums", "valid"])
def test_binning_entry_points_refuse_outputs_of_the_wrong_size(wrong):
    """The Rust entry points write through raw pointers: an output one bin short is refused, named."""
    from intxr import _splitter

    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    blob = _splitter.bslz4_compress(image.tobytes(), 2)
    bins = 16 * 16 - (1 if wrong == "sums" else 0), 16 * 16 - (1 if wrong == "valid" else 0)
    sums, valid = np.zeros(bins[0], np.uint32), np.zeros(bins[1], np.uint8)
    out = np.zeros_like(image)
    with pytest.raises(ValueError, match=wrong):
        _splitter.bin_frame_into(image.reshape(-1).view(np.uint8), 2, False, 64, 64, 4, 0, 65534,
                                 sums.view(np.uint8), valid)
    with pytest.raises(ValueError, match=wrong):
        _splitter.bslz4_decompress_bin_into(blob, out.reshape(-1).view(np.uint8), 2, False, 64, 64, 4, 0, 65534,
                                            sums.view(np.uint8), valid)
