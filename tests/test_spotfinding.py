"""Spot finding against real DIALS results on real frames, and the kernels against plain numpy."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from intxr import codec
from intxr.geometry import Geometry
from intxr.images import read_cbf
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams, find_spots
from intxr.reader.spots import label_reference, label_strong_pixels
from intxr.reader.threshold import ThresholdParams, find_strong_pixels, strong_mask_reference
from intxr.testing import shared_path

STATS_INT = ("n_spots_total", "n_spots_no_ice", "n_spots_4A")
STATS_FLOAT = (
    "total_intensity",
    "estimated_d_min",
    "d_min_distl_method_1",
    "d_min_distl_method_2",
    "noisiness_method_1",
    "noisiness_method_2",
)


def reference_files() -> list[Path]:
    root = shared_path("reference")
    # Spot-finding results only: reference/indexing/ holds DIALS's indexing of the same frames.
    return sorted(p for p in root.glob("*/*.json") if p.parent.name != "indexing")


def dls_frame(shared: Path):
    """The DLS EIGER2 stream frame and its geometry, as the reference was computed (input_notes)."""
    parts = msgpack.unpackb((shared / "data/stream_v1/dls_eiger2_16m_roi4m/image000044").read_bytes())
    header = json.loads(parts[1])
    width, height = header["shape"]
    image = codec.decode(parts[2], header["encoding"], header["type"], (height, width))
    config = json.loads(msgpack.unpackb((shared / "data/stream_v1/dls_eiger2_16m_roi4m/header").read_bytes())[1])
    geometry = Geometry.simple(  # the reference used a flat detector without a sensor model: no parallax
        wavelength=config["wavelength"],
        distance=config["detector_distance"] * 1000,
        beam_center=(config["beam_center_x"], config["beam_center_y"]),
        pixel_size=(config["x_pixel_size"] * 1000, config["y_pixel_size"] * 1000),
        image_size=(width, height),
        count_cutoff=config["countrate_correction_count_cutoff"],
    )
    return image, geometry


def small_geometry(width: int, height: int) -> Geometry:
    return Geometry.simple(
        wavelength=1.0,
        distance=200.0,
        beam_center=(width / 2, height / 2),
        pixel_size=(0.075, 0.075),
        image_size=(width, height),
    )


def params_for(reference: dict, name: str) -> SpotFinderParams:
    p = reference["parameters"]
    threshold = ThresholdParams(
        algorithm=p["threshold"],
        gain=p["gain"],
        kernel_size=tuple(p["kernel_size"]),
        sigma_background=p["sigma_background"],
        sigma_strong=p["sigma_strong"],
        min_local=p["min_local"],
        global_threshold=p["global_threshold"],
    )
    d_min, d_max = (4.5, 40.0) if "dmin4.5_dmax40" in name else (None, None)
    return SpotFinderParams(
        threshold=threshold,
        min_spot_size=p["min_spot_size"],
        max_spot_size=p["max_spot_size"],
        max_separation=p["max_separation"],
        d_min=d_min,
        d_max=d_max,
        prescreen=False,
    )


@pytest.mark.parametrize("name", [p.name for p in reference_files()] if shared_path else [])
def test_matches_dials_on_real_frames(name, kernel_path):
    """Identical strong-pixel and spot counts, centroids within 0.01 px, equal intensities, DIALS's stats."""
    path = next(p for p in reference_files() if p.name == name)
    reference = json.loads(path.read_text())
    shared = shared_path()
    if path.parent.name == "stream_v1":
        image, geometry = dls_frame(shared)
    else:
        frame = read_cbf(str(shared / reference["source"]))
        image, geometry = frame.data, frame.geometry
    result = SpotFinder(params_for(reference, name), geometry).find(image)
    assert result.n_strong_pixels == reference["n_strong_pixels"]
    assert len(result.spots) == reference["n_spots"]
    ref_spots = reference["spots"]
    if ref_spots:
        assert np.abs(result.spots.x - [s["x"] for s in ref_spots]).max() < 0.01
        assert np.abs(result.spots.y - [s["y"] for s in ref_spots]).max() < 0.01
        assert result.spots.intensity.tolist() == [s["intensity"] for s in ref_spots]
        assert result.spots.npix.tolist() == [s["npix"] for s in ref_spots]
        assert result.spots.bbox.tolist() == [s["bbox"] for s in ref_spots]
    stats = result.stats.as_dict()
    for key in STATS_INT:
        assert stats[key] == reference["stats"][key], key
    for key in STATS_FLOAT:
        assert stats[key] == pytest.approx(reference["stats"][key], rel=1e-6), key


KERNEL_PATHS = ("scalar", "sse2", "avx2", "avx512")


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request):
    """Force one path of the threshold kernel (skipped where this CPU lacks it), then restore the default."""
    from intxr._kernels import dispersion

    if request.param not in dispersion.available_kernels():
        pytest.skip(f"this CPU does not run the {request.param} path ({dispersion.available_kernels()})")
    dispersion.set_kernel(request.param)
    yield request.param
    dispersion.set_kernel(None)


def random_frame(seed: int, shape=(60, 75), dtype=np.int32):
    """Poisson background with spots (some on the edges), saturated pixels above the trusted range (4000),
    very bright pixels inside it, pixels at or above 2^24 (left out of the window sums) for 32-bit types,
    a random mask with a gap."""
    rng = np.random.default_rng(seed)
    background = rng.choice([rng.uniform(0.05, 1.0), rng.uniform(0.3, 20.0), rng.uniform(50, 500)])
    frame = rng.poisson(background, size=shape).astype(np.float64)
    for _ in range(rng.integers(0, 12)):  # spots, some on the edges
        j, i = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        frame[max(0, j - 1) : j + 2, max(0, i - 1) : i + 2] += rng.uniform(5, 300)
    frame[rng.random(shape) < 0.01] = 5000  # saturated pixels above the trusted range
    frame = np.round(frame)  # detector counts: integers, whatever the array type
    mask = rng.random(shape) > 0.05
    mask[:, rng.integers(0, shape[1])] = False  # a gap
    return frame.astype(dtype), mask.astype(np.uint8)


def bright_frame(seed: int, shape, dtype):
    """As random_frame, with a trusted range up to 2^26 so that very bright pixels count: some of 1e4-3e6
    (window sums of squares beyond 2^32) and, for 32-bit types, some at or above 2^24 (valid, but out of
    the window sums), plus pixels above the trusted range."""
    rng = np.random.default_rng(seed)
    image, mask = random_frame(seed, shape, np.float64)
    image[image == 5000] = 2**27  # above the trusted range
    top = 65535 if dtype == np.uint16 else 3e6
    bright = rng.random(shape) < 0.01
    image[bright] = np.round(rng.uniform(1e4 if dtype != np.uint16 else 2000, top, bright.sum()))
    if dtype != np.uint16:
        image[rng.random(shape) < 0.005] = 2**24 + rng.integers(0, 3)
        image[image > 2**26] = 2**27
    else:
        image[image > 65535] = 65535
    return image.astype(dtype), mask, (0.0, float(2**26) if dtype != np.uint16 else 65533.0)


def random_params(rng, algorithm):
    return ThresholdParams(
        algorithm=algorithm,
        kernel_size=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
        sigma_background=float(rng.choice([6.0, 3.0, 1.0, 0.0])),
        sigma_strong=float(rng.choice([3.0, 2.0, 1.0, 0.0])),
        min_local=int(rng.choice([2, 0, 5])),
        gain=[None, 1.0, 1.7, 0.5][int(rng.integers(0, 4))],
        global_threshold=float(rng.choice([0.0, 4.0])),
    )


def assert_kernel_matches_reference(image, mask, trusted, params):
    strong, overloaded = find_strong_pixels(image, mask, trusted, params)
    expected = strong_mask_reference(image, mask, trusted, params)
    assert strong.tolist() == np.flatnonzero(expected).tolist()
    usable = np.ones(image.shape, bool) if mask is None else mask > 0
    assert overloaded.tolist() == np.flatnonzero((image > trusted[1]) & usable).tolist()
    return strong, expected


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
@pytest.mark.parametrize("seed", range(12))
def test_kernel_equals_numpy_reference(algorithm, seed, kernel_path):
    rng = np.random.default_rng(100 + seed)
    dtype = [np.int32, np.uint16, np.uint32, np.float64][seed % 4]
    image, mask = random_frame(seed, dtype=dtype)
    params = random_params(rng, algorithm)
    trusted = (0.0, 4000.0)
    strong, expected = assert_kernel_matches_reference(image, mask, trusted, params)
    spots = label_strong_pixels(strong, image)
    ref = label_reference(expected, image)
    assert spots.npix.tolist() == ref.npix.tolist()
    assert spots.bbox.tolist() == ref.bbox.tolist()
    np.testing.assert_allclose(spots.x, ref.x, rtol=1e-6)
    np.testing.assert_allclose(spots.intensity, ref.intensity, rtol=1e-6)
    assert spots.peak_x.tolist() == ref.peak_x.tolist() and spots.peak_y.tolist() == ref.peak_y.tolist()


def edge_case_frame(seed: int, rng_seed: int, max_shape: tuple[int, int], algorithm: str):
    """Random shape (down to frames narrower and shorter than the window), dtype, parameters; bright
    and over-2^24 pixels on odd seeds; no mask on every fifth."""
    rng = np.random.default_rng(rng_seed)
    dtype = [np.int32, np.uint16, np.uint32][seed % 3]
    shape = (int(rng.integers(1, max_shape[0])), int(rng.integers(1, max_shape[1])))
    if seed % 2:
        image, mask, trusted = bright_frame(seed, shape, dtype)
    else:
        image, mask = random_frame(seed, shape, dtype)
        trusted = (0.0, 4000.0)
    return image, None if seed % 5 == 0 else mask, trusted, random_params(rng, algorithm)


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
@pytest.mark.parametrize("seed", range(40))
def test_every_kernel_path_equals_numpy_reference_on_edge_cases(algorithm, seed, kernel_path):
    """Random shapes (down to frames narrower and shorter than the window), dtypes, parameters (sigmas of
    0 make exact ties), with or without a mask, bright and over-2^24 pixels, all as the numpy reference."""
    image, mask, trusted, params = edge_case_frame(seed, 1000 + seed, (40, 90), algorithm)
    strong, expected = assert_kernel_matches_reference(image, mask, trusted, params)
    if seed == 1:  # the bright case must exercise the strong test, not pass vacuously
        assert expected.any()


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
@pytest.mark.parametrize("seed", range(24))
def test_every_kernel_path_equals_real_dials_on_random_frames(algorithm, seed, kernel_path):
    """The same random frames, masks and parameters given to DIALS's own DispersionThreshold /
    DispersionExtendedThreshold (its C++ classes, on the image as double, as dxtbx hands it over)."""
    pytest.importorskip("dials.algorithms.image.threshold", reason="DIALS is not installed (not on PyPI)")
    from intxr.reader import dials_backend

    image, mask, trusted, params = edge_case_frame(seed, 2000 + seed, (60, 120), algorithm)
    strong, _ = find_strong_pixels(image, mask, trusted, params)
    dials = dials_backend.strong_pixels(image, mask, trusted, SpotFinderParams(threshold=params))
    assert strong.tolist() == dials.tolist()


@pytest.mark.parametrize("kernel_size", [(1, 1), (1, 5), (5, 1), (2, 4), (5, 5)])
@pytest.mark.parametrize("shape", [(1, 129), (4, 63), (11, 64), (12, 65), (70, 127), (9, 128), (33, 257)])
def test_extended_erosion_across_words_and_rows(shape, kernel_size, kernel_path):
    """The extended threshold erodes in bits, 64 pixels a word, a few rows behind its first pass:
    spots straddling word boundaries (columns 63/64, 127/128) and the frame's edges, frames shorter than
    the erosion window and widths around multiples of 64, as the numpy reference."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + kernel_size[0] * 7 + kernel_size[1])
    image = rng.poisson(3.0, size=shape).astype(np.int32)
    # spots at every column from 56 to 71 and 120 to 135 (rows apart), so that the edges of the eroded
    # region fall on each side of a word boundary somewhere
    for t, i in enumerate([0, shape[1] - 1, *range(56, 72), *range(120, 136)]):
        if i < shape[1]:
            j = (5 + 7 * t) % shape[0]
            half = int(rng.integers(0, 3))
            image[max(0, j - half) : j + half + 1, max(0, i - half) : i + half + 1] += int(rng.integers(20, 400))
    mask = (rng.random(shape) > 0.03).astype(np.uint8)
    for sigmas in ((6.0, 3.0), (1.0, 1.0)):  # DIALS's defaults; loose ones, whose strong pixels reach the edges
        params = ThresholdParams(
            algorithm="dispersion_extended",
            kernel_size=kernel_size,
            sigma_background=sigmas[0],
            sigma_strong=sigmas[1],
        )
        strong, expected = assert_kernel_matches_reference(image, mask, (0.0, 4000.0), params)
        if shape[0] >= 9:
            assert expected.any()


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_window_sums_of_squares_above_2_to_the_31(algorithm, kernel_path):
    """Lone pixels of 46341-65535 counts on a dark background: the window's sum of squares passes 2^31
    (the float bound reads it as int32 and leaves those windows to the exact test) while its sum stays
    below 65536 (where the sum of squares is kept exactly); as the numpy reference."""
    rng = np.random.default_rng(31)
    image = rng.poisson(0.5, size=(60, 150)).astype(np.uint32)
    ys, xs = rng.integers(0, 60, 80), rng.integers(0, 150, 80)
    image[ys, xs] = rng.integers(46341, 65536, 80)
    for params in (ThresholdParams(algorithm=algorithm), ThresholdParams(algorithm=algorithm, gain=1.5)):
        strong, expected = assert_kernel_matches_reference(image, None, (0.0, 1e6), params)
        assert expected[ys, xs].sum() > 40


@functools.cache  # the same spikes for every kernel path
def spikes_at_the_strong_boundary(seed: int, c_range, sigma_s: float, gain: float, count: int):
    """Background levels c and spike heights v (one pixel above a 7x7 window whose other 48 pixels sum
    to 48 c) for which DIALS's b > d holds by the smallest margins among up to 2 million levels: b = 49 v -
    x = 48 (v - c), d = sigma_s sqrt(g x 49), x = 48 c + v, in double as DIALS computes them (local.h).
    Returns c, v and b - d relative to b."""
    c = np.unique(np.random.default_rng(seed).integers(*c_range, size=2_000_000)).astype(np.float64)
    k = 49.0 * sigma_s**2 * gain  # 48 t > sqrt(k (49 c + t)) for t = v - c, as a quadratic in t
    t0 = np.floor((k + np.sqrt(k * k + 4 * 2304 * 49 * k * c)) / (2 * 2304)) - 1
    best_v, gap = np.full(c.shape, np.nan), np.full(c.shape, np.nan)
    for step in range(4):  # the smallest integer v that passes, among t0 - 1 .. t0 + 2
        v = c + t0 + step
        x = 48 * c + v
        b, d = 49 * v - x, sigma_s * np.sqrt(gain * x * 49)
        first = (b > d) & np.isnan(best_v)
        best_v[first], gap[first] = v[first], ((b - d) / b)[first]
    tightest = np.argsort(gap)[:count]
    return c[tightest], best_v[tightest], gap[tightest]


@pytest.mark.parametrize("sigma_s", [1.0, 3.0])
@pytest.mark.parametrize(
    ("dtype", "c_range", "hi"),
    [(np.int32, (300_000, 1_360_000), 2**26 // 49), (np.uint32, (2_000_000, 16_000_000), 2**26)],
    ids=["packed", "unpacked"],
)
def test_dispersion_float_bound_keeps_pixels_at_the_boundary(dtype, c_range, hi, sigma_s, kernel_path):
    """`dispersion` looks for candidates with a float32 bound before the exact test: spikes that pass
    DIALS's b > d by less than 2^-20 of b must all be found, on the packed (int32 up to 2^26 / 49) and
    the unpacked (uint32) first pass. Each spike's background is a checkerboard c +- delta (the window
    still sums to 48 c), so the index of dispersion passes and b > d decides; with a small sigma_s, b
    is a small difference of large sums, where float32's rounding is largest."""
    gain = 1.7
    c, v, gap = spikes_at_the_strong_boundary(19, c_range, sigma_s, gain, 64)
    assert gap.max() < 2**-20  # float32's rounding, well inside the bound's margin (DISP_UP)
    blocks = np.repeat(np.repeat(np.arange(64).reshape(8, 8), 15, axis=0), 15, axis=1)
    delta = np.ceil(np.sqrt(2 * gain * c))  # 49 * 48 delta^2 > g x (48 + sigma_b sqrt(96))
    parity = 1 - 2 * (np.indices(blocks.shape).sum(axis=0) % 2)  # the centres (7 + 15 n, 7 + 15 m): +1
    image = (c[blocks] + delta[blocks] * parity).astype(dtype)
    centres = (np.arange(8)[:, None] * 15 + 7, np.arange(8)[None, :] * 15 + 7)
    image[centres] = v.reshape(8, 8).astype(dtype)
    params = ThresholdParams(algorithm="dispersion", kernel_size=(3, 3), sigma_background=0.5,
                             sigma_strong=sigma_s, gain=gain, min_local=2)
    strong, expected = assert_kernel_matches_reference(image, None, (0.0, float(hi)), params)
    assert expected[centres].all()


@pytest.mark.parametrize("hi", [2**26 // 49, 2**26 // 49 + 1, 2**26 // 63, 2**26 // 63 + 1, 2**26 // 30])
@pytest.mark.parametrize("kernel_size", [(3, 3), (3, 4), (4, 4)])
@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_packed_first_pass_sums_at_their_limit(hi, kernel_size, algorithm, kernel_path):
    """The first pass packs count and value into one uint32 column sum when the window (at most 63
    pixels) times the trusted maximum stays below 2^26; frames of counts at and near that maximum,
    on both sides of the limit and of the window size (2^26 / 30 would overflow packed), give the numpy
    reference's strong pixels."""
    rng = np.random.default_rng(hi % 1000 + kernel_size[1])
    image = rng.integers(hi - 3000, hi + 1, size=(50, 70)).astype(np.int32)
    image[rng.random(image.shape) < 0.2] = rng.integers(0, 50)  # low counts among the bright ones
    image[10:13, 20:23] = hi  # a spot at the trusted maximum
    image[30, 40] = hi + 1  # above the trusted range
    params = ThresholdParams(algorithm=algorithm, kernel_size=kernel_size)
    strong, expected = assert_kernel_matches_reference(image, None, (0.0, float(hi)), params)
    assert expected.any()


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint32])
@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_unmasked_packed_frames_of_every_pixel_type(dtype, algorithm, kernel_path):
    """The row update's most common case (no mask, packed sums: a detector's frame with its gaps marked
    in the pixels), which AVX-512 runs in intrinsics 16 pixels a step: widths around multiples of 16,
    gap pixels at the type's top (and -1 for int32), counts above the trusted range."""
    for width in (15, 16, 17, 47, 529):
        image, _mask = random_frame(width, (41, width), np.float64)
        top = np.iinfo(dtype).max
        image[20:23, width // 2 - 1 : width // 2 + 2] += 300  # a spot
        image[:, 5::11] = top  # gap columns, as EIGERs mark them
        if dtype == np.int32:
            image[7::9, :] = -1  # PILATUS gap rows
        image = image.astype(dtype)
        params = ThresholdParams(algorithm=algorithm)
        _strong, expected = assert_kernel_matches_reference(image, None, (0.0, 4000.0), params)
        assert expected.any()


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_every_kernel_path_on_a_large_frame(algorithm, kernel_path):
    """A frame wider than any vector and not a multiple of one, bright pixels, many strong ones."""
    image, mask, trusted = bright_frame(7, (157, 523), np.int32)
    strong, expected = assert_kernel_matches_reference(image, mask, trusted, ThresholdParams(algorithm=algorithm))
    assert len(strong) > 100


def test_generic_path_outside_the_fast_kernels_domain():
    """Windows above 127 pixels (13x13) and a negative trusted minimum take the generic Cython path."""
    image, mask = random_frame(3, (50, 61), np.int32)
    image[::7, ::5] *= -1
    for params, trusted in (
        (ThresholdParams(algorithm="dispersion", kernel_size=(6, 6)), (0.0, 4000.0)),
        (ThresholdParams(algorithm="dispersion_extended", kernel_size=(6, 6)), (0.0, 4000.0)),
        (ThresholdParams(algorithm="dispersion"), (-20.0, 4000.0)),
        (ThresholdParams(algorithm="dispersion_extended"), (-20.0, 4000.0)),
    ):
        assert_kernel_matches_reference(image, mask, trusted, params)


def test_kernel_choice_is_made_at_run_time():
    """The best path this CPU has by default; INTXR_DISPERSION_KERNEL and set_kernel force one."""
    import subprocess
    import sys

    from intxr._kernels import dispersion

    available = dispersion.available_kernels()
    assert available[:2] == ["scalar", "sse2"] or available == ["scalar"]
    assert dispersion.kernel() == available[-1]
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert ("avx2" in available) == (" avx2" in flags)
    code = "from intxr._kernels import dispersion; print(dispersion.kernel())"
    for forced, expected in (("scalar", "scalar"), ("sse2", "sse2"), ("avx512", available[-1])):
        env = dict(os.environ, INTXR_DISPERSION_KERNEL=forced)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
    with pytest.raises(ValueError, match="expected one of"):
        dispersion.set_kernel("avx3")
    if "avx512" not in available:
        with pytest.raises(ValueError, match="does not run"):
            dispersion.set_kernel("avx512")


def test_labelling_is_4_connected_and_ordered_by_first_pixel():
    mask = np.zeros((7, 8), dtype=bool)
    mask[0, 5:7] = True  # spot A, first pixel (0, 5)
    mask[1, 1] = mask[2, 1] = mask[2, 2] = True  # spot B: an L, first pixel (1, 1)
    mask[3, 3] = True  # diagonal to B: a separate spot C
    mask[5, 0:8] = True  # a full row
    mask[6, 7] = True  # below the row's end: joins it
    image = np.arange(56, dtype=np.int32).reshape(7, 8) + 1
    spots = label_strong_pixels(np.flatnonzero(mask), image)
    assert spots.npix.tolist() == [2, 3, 1, 9]
    assert spots.bbox.tolist() == [[5, 7, 0, 1], [1, 3, 1, 3], [3, 4, 3, 4], [0, 8, 5, 7]]
    assert spots.x[2] == 3.5 and spots.y[2] == 3.5


def test_bad_input_is_a_clear_error_or_an_empty_result():
    geometry = small_geometry(40, 40)
    with pytest.raises(ValueError, match="dtype"):
        find_spots(np.zeros((40, 40), dtype=np.complex64), geometry)
    with pytest.raises(ValueError, match="mask shape"):
        find_spots(np.zeros((40, 40), dtype=np.int32), geometry, mask=np.ones((40, 41), bool))
    with pytest.raises(ValueError, match="NaN"):
        find_spots(np.full((40, 40), np.nan), geometry)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        find_spots(np.zeros((0, 0), dtype=np.int32), geometry)
    all_masked = find_spots(np.full((40, 40), 7, dtype=np.int32), geometry, mask=np.zeros((40, 40), bool))
    assert all_masked.n_strong_pixels == 0 and len(all_masked.spots) == 0
    assert all_masked.stats.estimated_d_min == -1
    zeros = find_spots(np.zeros((40, 40), dtype=np.uint16), geometry)
    assert zeros.n_strong_pixels == 0 and zeros.score.score == 0
    with pytest.raises(ValueError, match="min_local"):
        find_spots(
            np.zeros((40, 40), dtype=np.int32), geometry, SpotFinderParams(threshold=ThresholdParams(min_local=100))
        )


def test_too_many_strong_pixels_is_reported_not_crashed():
    image = np.zeros((64, 64), dtype=np.int32)
    image[::2, ::2] = 1000  # a dense lattice: half the pixels' windows are wildly dispersed
    params = SpotFinderParams(max_strong_pixel_fraction=0.01, prescreen=False)
    result = find_spots(image, small_geometry(64, 64), params)
    assert result.n_strong_pixels > 41 and len(result.spots) == 0
    assert "max_strong_pixel_fraction" in result.errors[0]


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_dials_backend_matches_native_when_dials_is_installed(thaumatin_cbfs, algorithm):
    """`spf_backend = dials` and ours give the same strong pixels and spots on every real frame."""
    pytest.importorskip("dials.algorithms.image.threshold", reason="DIALS is not installed (not on PyPI)")
    for path in thaumatin_cbfs:
        frame = read_cbf(path)
        threshold = ThresholdParams(algorithm=algorithm)
        native = find_spots(frame.data, frame.geometry, SpotFinderParams(threshold=threshold, prescreen=False))
        dials = find_spots(
            frame.data, frame.geometry, SpotFinderParams(threshold=threshold, prescreen=False, backend="dials")
        )
        assert dials.n_strong_pixels == native.n_strong_pixels, path
        assert dials.spots.bbox.tolist() == native.spots.bbox.tolist(), path
        assert dials.spots.intensity.tolist() == native.spots.intensity.tolist(), path


def test_dials_backend_without_dials_is_a_clear_error():
    from intxr.reader import dials_backend

    if dials_backend.available():
        pytest.skip("DIALS is installed here; the error path cannot occur")
    with pytest.raises(ValueError, match="spf_backend = dials needs DIALS"):
        SpotFinder(SpotFinderParams(backend="dials"), Geometry())


def test_spots_touching_saturated_pixels_same_with_many_pixels():
    """The summed-area path (many saturated pixels) agrees with the direct comparison."""
    from intxr.reader.spots import Spots, spots_touching

    rng = np.random.default_rng(5)
    n, width, height = 400, 300, 200
    x0 = rng.integers(0, width - 5, n)
    y0 = rng.integers(0, height - 5, n)
    bbox = np.stack([x0, x0 + rng.integers(1, 5, n), y0, y0 + rng.integers(1, 5, n)], axis=1)
    z = np.zeros(n)
    spots = Spots(z, z, z, np.ones(n, np.int64), bbox, z, z)
    few = np.sort(rng.choice(width * height, 50, replace=False))
    many = np.sort(rng.choice(width * height, 6000, replace=False))
    for pixels in (few, many):
        py, px = np.divmod(pixels, width)
        direct = (
            (px[None, :] >= bbox[:, 0:1] - 1)
            & (px[None, :] <= bbox[:, 1:2])
            & (py[None, :] >= bbox[:, 2:3] - 1)
            & (py[None, :] <= bbox[:, 3:4])
        ).any(axis=1)
        np.testing.assert_array_equal(spots_touching(spots, pixels, width), direct)
    assert spots_touching(spots, many, width).sum() > 0
