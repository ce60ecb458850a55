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
