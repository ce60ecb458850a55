"""miniCBF byte-offset decompression of a real PILATUS 6M frame: the Cython kernel against fabio's
plain-numpy and Cython versions, in the same run."""

from __future__ import annotations

import bz2

import fabio.compression
import numpy as np
import pytest

from intxr.images import CBF_BINARY_START, byte_offset_decode


@pytest.fixture(scope="module")
def payload(thaumatin_frame_path):
    raw = bz2.decompress(thaumatin_frame_path.read_bytes())
    start = raw.find(CBF_BINARY_START) + 4
    return raw[start:], 2463 * 2527


def test_byte_offset_intxr(benchmark, payload):
    data, n = payload
    benchmark.group = "byte-offset decode 6M frame"
    benchmark.extra_info["role"] = "intxr"
    out = benchmark(byte_offset_decode, data, n)
    assert out.shape == (n,)


def test_byte_offset_fabio_numpy(benchmark, payload):
    data, n = payload
    benchmark.group = "byte-offset decode 6M frame"
    benchmark.extra_info["role"] = "baseline:fabio numpy"
    out = benchmark(fabio.compression.decByteOffset_numpy, data, n)
    assert np.array_equal(out[:n], byte_offset_decode(data, n))


def test_byte_offset_fabio_cython(benchmark, payload):
    data, n = payload
    benchmark.group = "byte-offset decode 6M frame"
    benchmark.extra_info["role"] = "baseline:fabio cython"
    out = benchmark(fabio.compression.decByteOffset_cython, data, n)
    assert np.array_equal(out[:n], byte_offset_decode(data, n))
