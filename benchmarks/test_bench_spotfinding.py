"""Per-frame spot finding on one core: real PILATUS 6M frames and a 16M frame tiled from them.

The threshold kernels run on every path this CPU has (scalar, SSE2, AVX2, AVX-512; forced one at a
time). Baselines in the same run: the plain numpy implementation of the same tests (float64
summed-area tables, as DIALS computes them) and real DIALS when it is importable (it is not on PyPI;
`mxspots`, the PyPI peer, is not installed here and does a different test, so it is not timed).
DIALS's own figures on this kind of machine (../shared/FACTS.md) are printed next to ours when it
is absent. Peak memory per frame is recorded as the rise of the process's peak resident set (the C
kernels allocate outside numpy, so tracemalloc would not see them)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from intxr import codec
from intxr.images import read_cbf
from intxr.reader.prescreen import prescreen
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams
from intxr.reader.threshold import ThresholdParams, find_strong_pixels, strong_mask_reference, trusted_range_for
from intxr.simulate import pixels_for
from intxr.testing import shared_path

EIGER_16M = (4362, 4148)


def tiled_16m(frame: np.ndarray) -> np.ndarray:
    reps = (-(-EIGER_16M[0] // frame.shape[0]), -(-EIGER_16M[1] // frame.shape[1]))
    return np.ascontiguousarray(np.tile(frame, reps)[: EIGER_16M[0], : EIGER_16M[1]])


@pytest.fixture(scope="module")
def frames():
    hit = read_cbf(str(shared_path("data", "cbf", "thaumatin_grid", "thau_3_2_0005.cbf.bz2")))
    blank = read_cbf(str(shared_path("data", "cbf", "thaumatin_grid", "thau_3_2_0016.cbf.bz2")))
    return {
        "6M": (hit.data, hit.geometry),
        "16M": (tiled_16m(hit.data), hit.geometry),
        "blank 6M": (blank.data, blank.geometry),
        "blank 16M": (tiled_16m(blank.data), blank.geometry),
    }


# ../shared/FACTS.md: DIALS 3.25, one core, image in memory, median of 5 (threshold + labelling).
DIALS_FACTS_MS = {
    ("dispersion", "6M"): 130.0,
    ("dispersion_extended", "6M"): 170.0,
    ("dispersion", "16M"): 400.0,
    ("dispersion_extended", "16M"): 500.0,
}
KERNEL_PATHS = ("scalar", "sse2", "avx2", "avx512")
_medians: dict[tuple[str, str, str], float] = {}
_dials_medians: dict[tuple[str, str], float] = {}  # real DIALS, same run


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mb(fn) -> float:
    """How far one call raises the process's peak resident set above what it held before (Linux:
    the peak is reset through /proc/self/clear_refs, freed heap pages are first handed back with
    glibc's malloc_trim); tracemalloc's numpy-only peak elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so new ones count again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS")
        fn()
        return round((_rss_kb("VmHWM") - before) / 1e3, 1)
    except OSError:
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return round(peak / 1e6, 1)


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request):
    from intxr._kernels import dispersion

    if request.param not in dispersion.available_kernels():
        pytest.skip(f"this CPU does not run the {request.param} path")
    dispersion.set_kernel(request.param)
    yield request.param
    dispersion.set_kernel(None)


@pytest.fixture(scope="module", autouse=True)
def print_against_dials_facts(request):
    """After the module: each threshold path against DIALS (same run when importable, else FACTS)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not _medians or reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line("")
        reporter.write_line(
            "threshold per kernel path vs real DIALS in this run where it ran, else DIALS 3.25's figures "
            "from ../shared/FACTS.md (same kind of machine):"
        )
        for (algorithm, size, path), median in sorted(_medians.items()):
            same_run = _dials_medians.get((algorithm, size))
            dials = DIALS_FACTS_MS[(algorithm, size)] if same_run is None else same_run
            source = "FACTS" if same_run is None else "same run"
            reporter.write_line(
                f"  {algorithm} {size} {path}: {median:.1f} ms, DIALS ({source}) {dials:.0f} ms, x{dials / median:.1f}"
            )


def _record(benchmark, key, into: dict = _medians) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.rounds:
        into[key] = stats.stats.median * 1e3


@pytest.mark.parametrize("size", ["6M", "16M"])
@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_threshold_intxr(benchmark, frames, size, algorithm, kernel_path):
    """The threshold on one kernel path; the best path this CPU has is `intxr`, the others
    `intxr:<path>` (the summary prints the best path's speed-up over each)."""
    from intxr._kernels import dispersion

    image, geometry = frames[size]
    trusted = trusted_range_for(image, geometry.count_cutoff)
    params = ThresholdParams(algorithm=algorithm)
    benchmark.group = f"threshold {algorithm} {size}"
    best = dispersion.available_kernels()[-1]
    benchmark.extra_info["role"] = "intxr" if kernel_path == best else f"intxr:{kernel_path}"
    benchmark.extra_info["kernel"] = kernel_path
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(lambda: find_strong_pixels(image, None, trusted, params))
    strong, _ = benchmark(find_strong_pixels, image, None, trusted, params)
    _record(benchmark, (algorithm, size, kernel_path))
    dispersion.set_kernel("scalar")
    assert strong.tolist() == find_strong_pixels(image, None, trusted, params)[0].tolist()
    assert len(strong) > 0


@pytest.mark.parametrize("size", ["6M", "16M"])
@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_threshold_numpy_reference(benchmark, frames, size, algorithm):
    image, geometry = frames[size]
    trusted = trusted_range_for(image, geometry.count_cutoff)
    params = ThresholdParams(algorithm=algorithm)
    benchmark.group = f"threshold {algorithm} {size}"
    benchmark.extra_info["role"] = "baseline:numpy"
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(lambda: strong_mask_reference(image, None, trusted, params))
    mask = benchmark.pedantic(strong_mask_reference, args=(image, None, trusted, params), rounds=2, iterations=1)
    assert mask.sum() == len(find_strong_pixels(image, None, trusted, params)[0])


@pytest.mark.parametrize("size", ["6M", "16M"])
@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_threshold_dials(benchmark, frames, size, algorithm):
    """DIALS's own threshold call, as its DispersionThresholdStrategy makes it: the image already a
    flex.double and the mask a flex.bool (dxtbx hands them over so), only the C++ algorithm timed."""
    threshold = pytest.importorskip("dials.algorithms.image.threshold", reason="DIALS is not installed (not on PyPI)")
    from scitbx.array_family import flex

    image, geometry = frames[size]
    trusted = trusted_range_for(image, geometry.count_cutoff)
    t = ThresholdParams(algorithm=algorithm)
    values = np.ascontiguousarray(image, dtype=np.float64)
    im = flex.double(values)
    mk = flex.bool(np.ascontiguousarray((values >= trusted[0]) & (values <= trusted[1])))
    cls = threshold.DispersionExtendedThreshold if algorithm == "dispersion_extended" else threshold.DispersionThreshold
    dials = cls(im.all(), t.kernel_size, t.sigma_background, t.sigma_strong, float(t.global_threshold), t.min_local)

    def run():
        out = flex.bool(flex.grid(im.all()), False)
        dials(im, mk, out)
        return out

    benchmark.group = f"threshold {algorithm} {size}"
    benchmark.extra_info["role"] = "baseline:dials"
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(run)
    out = benchmark.pedantic(run, rounds=5, iterations=1)
    _record(benchmark, (algorithm, size), into=_dials_medians)
    ours = find_strong_pixels(image, None, trusted, t)[0]
    assert np.flatnonzero(out.as_numpy_array().ravel()).tolist() == ours.tolist()


@pytest.mark.parametrize("size", ["6M", "16M"])
def test_find_spots_with_stats_intxr(benchmark, frames, size):
    """The whole per-frame analysis a reader runs on a hit (pre-screen off): threshold, spots, stats, score."""
    image, geometry = frames[size]
    finder = SpotFinder(SpotFinderParams(threshold=ThresholdParams(algorithm="dispersion"), prescreen=False), geometry)
    benchmark.group = f"find-spots dispersion {size}"
    benchmark.extra_info["role"] = "intxr"
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(lambda: finder.find(image))
    result = benchmark(finder.find, image)
    assert len(result.spots) > 100


@pytest.mark.parametrize("size", ["6M", "16M"])
def test_find_spots_with_stats_numpy_reference(benchmark, frames, size):
    from intxr.geometry import d_star_sq
    from intxr.reader.spots import filter_spots, label_reference
    from intxr.reader.stats import per_image_stats

    image, geometry = frames[size]
    trusted = trusted_range_for(image, geometry.count_cutoff)
    params = ThresholdParams(algorithm="dispersion")

    def reference():
        spots = filter_spots(label_reference(strong_mask_reference(image, None, trusted, params), image))
        return per_image_stats(d_star_sq(geometry, spots.x, spots.y), spots.intensity)

    benchmark.group = f"find-spots dispersion {size}"
    benchmark.extra_info["role"] = "baseline:numpy"
    benchmark.pedantic(reference, rounds=1, iterations=1)


@pytest.mark.parametrize("size", ["blank 6M", "blank 16M"])
@pytest.mark.parametrize("encoding", ["bs16-lz4", "bs32-lz4"])
def test_blank_decode_and_prescreen_intxr(benchmark, frames, size, encoding):
    """What a blank raster frame costs a reader: decode the stream blob, pre-screen, done."""
    image, geometry = frames[size]
    pixels = pixels_for(image, encoding)
    name = codec.v1_encoding("bslz4", pixels.dtype)
    blob = codec.encode(pixels, name)
    trusted = trusted_range_for(pixels, geometry.count_cutoff)
    out = np.empty_like(pixels)

    def decode_and_prescreen():
        return prescreen(codec.decode_into(blob, name, out), None, trusted)

    benchmark.group = f"blank decode+prescreen {encoding} {size}"
    benchmark.extra_info["role"] = "intxr"
    result = benchmark(decode_and_prescreen)
    # The real blank frame has 3 spot-like features (below DIALS's spots); tiled to 16M they add up
    # past the pass mark, so only the 6M frame is asserted blank. The cost is the same either way.
    assert result.passed == (size == "blank 16M")


@pytest.mark.parametrize("size", ["blank 6M", "blank 16M"])
@pytest.mark.parametrize("encoding", ["bs16-lz4", "bs32-lz4"])
def test_blank_decode_and_full_threshold(benchmark, frames, size, encoding):
    """Baseline: the same blank frame decoded and thresholded in full (what a reader without a pre-screen does)."""
    image, geometry = frames[size]
    pixels = pixels_for(image, encoding)
    name = codec.v1_encoding("bslz4", pixels.dtype)
    blob = codec.encode(pixels, name)
    trusted = trusted_range_for(pixels, geometry.count_cutoff)
    out = np.empty_like(pixels)
    params = ThresholdParams(algorithm="dispersion")

    def decode_and_threshold():
        return find_strong_pixels(codec.decode_into(blob, name, out), None, trusted, params)

    benchmark.group = f"blank decode+prescreen {encoding} {size}"
    benchmark.extra_info["role"] = "baseline:full threshold"
    benchmark(decode_and_threshold)
