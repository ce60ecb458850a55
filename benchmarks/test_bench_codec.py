"""Frame decoding on the reader's hot path: a real PILATUS 6M frame as the detector sends it.

Baselines in the same run: h5py + hdf5plugin reading the same bytes as an HDF5 chunk (bitshuffle's
own SIMD code), and DECTRIS's dectris-compression."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest
from dectris.compression import decompress as dectris_decompress

from intxr import codec
from intxr.images import read_cbf
from intxr.simulate import pixels_for


@pytest.fixture(scope="module", params=["bs32-lz4", "bs16-lz4"])
def encoded_frame(request, thaumatin_frame_path):
    pixels = pixels_for(read_cbf(str(thaumatin_frame_path)).data, request.param)
    encoding = codec.v1_encoding("bslz4", pixels.dtype)
    return request.param, pixels, codec.encode(pixels, encoding), encoding


def test_bslz4_decode_intxr(benchmark, encoded_frame):
    name, pixels, blob, encoding = encoded_frame
    benchmark.group = f"decode {name} 6M frame"
    benchmark.extra_info["role"] = "intxr"
    out = np.empty_like(pixels)
    benchmark(codec.decode_into, blob, encoding, out)
    assert np.array_equal(out, pixels)


def test_bslz4_decode_h5py_hdf5plugin(benchmark, encoded_frame):
    name, pixels, blob, _ = encoded_frame
    benchmark.group = f"decode {name} 6M frame"
    benchmark.extra_info["role"] = "baseline:h5py+hdf5plugin"
    f = h5py.File("in-memory.h5", "w", driver="core", backing_store=False)
    ds = f.create_dataset(
        "data",
        shape=(1, *pixels.shape),
        dtype=pixels.dtype,
        chunks=(1, *pixels.shape),
        **hdf5plugin.Bitshuffle(cname="lz4"),
    )
    ds.id.write_direct_chunk((0, 0, 0), blob)
    out = np.empty((1, *pixels.shape), dtype=pixels.dtype)
    benchmark(ds.read_direct, out)
    f.close()
    assert np.array_equal(out[0], pixels)


def test_bslz4_decode_dectris_compression(benchmark, encoded_frame):
    name, pixels, blob, _ = encoded_frame
    benchmark.group = f"decode {name} 6M frame"
    benchmark.extra_info["role"] = "baseline:dectris-compression"
    raw = benchmark(dectris_decompress, blob, "bslz4", elem_size=pixels.itemsize)
    assert np.array_equal(np.frombuffer(raw, pixels.dtype).reshape(pixels.shape), pixels)


def test_bslz4_encode_intxr(benchmark, encoded_frame):
    name, pixels, _, encoding = encoded_frame
    benchmark.group = f"encode {name} 6M frame"
    benchmark.extra_info["role"] = "intxr"
    blob = benchmark(codec.encode, pixels, encoding)
    assert np.array_equal(codec.decode(blob, encoding, pixels.dtype, pixels.shape), pixels)


def test_bslz4_encode_h5py_hdf5plugin(benchmark, encoded_frame):
    name, pixels, _, _ = encoded_frame
    benchmark.group = f"encode {name} 6M frame"
    benchmark.extra_info["role"] = "baseline:h5py+hdf5plugin"
    f = h5py.File("in-memory-w.h5", "w", driver="core", backing_store=False)
    ds = f.create_dataset(
        "data",
        shape=(1, *pixels.shape),
        dtype=pixels.dtype,
        chunks=(1, *pixels.shape),
        **hdf5plugin.Bitshuffle(cname="lz4"),
    )
    benchmark(ds.write_direct, pixels[np.newaxis])
    f.close()


# ---------------------------------------------------------------------------------------------
# A blank raster frame as a reader meets it: decode the stream blob and pre-screen it (the frame is
# blank, so nothing else runs). intxr bins inside the decoder's pass (prescreen.decode_and_bin) and
# runs the dispersion test on the binned frame in Rust. Baselines in the same run: the path before
# (decode, then the Cython binning reading the frame back, then the Cython dispersion kernel on the
# binned frame) and DECTRIS's decoder followed by the same Rust pre-screen.

EIGER_16M = (4362, 4148)


def _tiled_16m(frame: np.ndarray) -> np.ndarray:
    reps = (-(-EIGER_16M[0] // frame.shape[0]), -(-EIGER_16M[1] // frame.shape[1]))
    return np.ascontiguousarray(np.tile(frame, reps)[: EIGER_16M[0], : EIGER_16M[1]])


@pytest.fixture(scope="module", params=["bs16-lz4 6M", "bs32-lz4 6M", "bs16-lz4 16M", "bs32-lz4 16M"])
def blank_frame(request):
    from intxr.reader.threshold import trusted_range_for
    from intxr.testing import shared_path

    encoding, size = request.param.split()
    blank = read_cbf(str(shared_path("data", "cbf", "thaumatin_grid", "thau_3_2_0016.cbf.bz2")))
    pixels = pixels_for(blank.data if size == "6M" else _tiled_16m(blank.data), encoding)
    name = codec.v1_encoding("bslz4", pixels.dtype)
    trusted = trusted_range_for(pixels, blank.geometry.count_cutoff)
    return request.param, pixels, codec.encode(pixels, name), name, trusted


def test_blank_decode_prescreen_intxr(benchmark, blank_frame):
    from intxr.reader.prescreen import decode_and_bin, prescreen

    label, pixels, blob, name, trusted = blank_frame
    out = np.empty_like(pixels)
    # As a reader does: the frame buffer and the binned arrays are allocated once per series.
    bins = (np.empty((pixels.shape[0] // 4, pixels.shape[1] // 4), np.uint32),
            np.empty((pixels.shape[0] // 4, pixels.shape[1] // 4), np.uint8))

    def decode_and_prescreen():
        image, binned = decode_and_bin(blob, name, out, trusted, 4, None, bins)
        return prescreen(image, None, trusted, binned=binned)

    benchmark.group = f"blank decode+prescreen {label}"
    benchmark.extra_info["role"] = "intxr"
    result = benchmark(decode_and_prescreen)
    assert np.array_equal(out, pixels)
    # The real blank frame has 3 spot-like features (below DIALS's spots); tiled to 16M they add up
    # past the pass mark, so only the 6M frame is blank by the decision. The cost is the same.
    assert result.passed == label.endswith("16M")
    assert result == prescreen(pixels, None, trusted)


def test_blank_decode_prescreen_previous_path(benchmark, blank_frame):
    """Before: decode into memory, bin by reading it back (Cython), the Cython dispersion kernel on
    the binned frame (the candidate check after it is the same in both and not timed here)."""
    from intxr._kernels.prescreen import bin_frame as cython_bin

    from intxr.reader.threshold import ThresholdParams, find_strong_pixels

    label, pixels, blob, name, trusted = blank_frame
    out = np.empty_like(pixels)
    test = ThresholdParams(algorithm="dispersion", sigma_background=6.0, sigma_strong=3.0)

    def previous():
        image = codec.decode_into(blob, name, out)
        sums, valid = cython_bin(image, None, float(trusted[0]), float(trusted[1]), 4)
        return find_strong_pixels(sums, valid, (0.0, np.inf), test)

    benchmark.group = f"blank decode+prescreen {label}"
    benchmark.extra_info["role"] = "baseline:decode then Cython bin + dispersion"
    benchmark(previous)


def test_blank_decode_prescreen_dectris_compression(benchmark, blank_frame):
    """DECTRIS's decoder (a new bytes object, as its API gives), then the same Rust pre-screen."""
    from intxr.reader.prescreen import bin_frame, prescreen

    label, pixels, blob, _, trusted = blank_frame

    def dectris_then_prescreen():
        raw = dectris_decompress(blob, "bslz4", elem_size=pixels.itemsize)
        image = np.frombuffer(raw, pixels.dtype).reshape(pixels.shape)
        return prescreen(image, None, trusted, binned=bin_frame(image, None, trusted, 4))

    benchmark.group = f"blank decode+prescreen {label}"
    benchmark.extra_info["role"] = "baseline:dectris-compression + prescreen"
    benchmark(dectris_then_prescreen)
