"""Frame codecs (Rust core) against real detector blobs and independent decoders."""

from __future__ import annotations

import glob
import struct

import h5py
import hdf5plugin
import msgpack
import numpy as np
import pytest
from dectris.compression import decompress as dectris_decompress

from intxr import codec
from intxr.codec import DecodeError


def random_frame(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    frame = rng.poisson(3.0, size=shape).astype(dtype)
    frame[::7, ::5] = np.iinfo(dtype).max  # masked pixels
    frame[shape[0] // 2, shape[1] // 3] = np.iinfo(dtype).max - 5  # a bright pixel
    return frame


@pytest.mark.parametrize(
    "encoding,dtype",
    [
        ("bs32-lz4<", np.uint32),
        ("bs16-lz4<", np.uint16),
        ("bs8-lz4<", np.uint8),
        ("lz4<", np.uint32),
        ("lz4<", np.uint16),
        ("bslz4", np.uint32),
        ("bslz4", np.uint16),
        ("lz4", np.uint32),
    ],
)
@pytest.mark.parametrize("shape", [(97, 131), (512, 1028), (3, 5)])
def test_round_trip(encoding, dtype, shape):
    frame = random_frame(shape, dtype)
    blob = codec.encode(frame, encoding)
    assert np.array_equal(codec.decode(blob, encoding, dtype, shape), frame)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_bslz4_blob_decodes_with_dectris_compression(dtype):
    """DECTRIS's own decoder accepts our bitshuffle-LZ4 blobs, header included."""
    frame = random_frame((515, 1030), dtype, seed=3)
    blob = codec.encode(frame, "bslz4")
    raw = dectris_decompress(blob, "bslz4", elem_size=np.dtype(dtype).itemsize)
    assert np.array_equal(np.frombuffer(raw, dtype).reshape(frame.shape), frame)


def test_bslz4_blob_is_a_valid_hdf5_chunk(tmp_path):
    """A blob written unchanged with a direct chunk write reads back through the HDF5 bitshuffle filter."""
    frame = random_frame((257, 1030), np.uint16, seed=4)
    path = tmp_path / "chunk.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "data",
            shape=(1, *frame.shape),
            dtype=frame.dtype,
            chunks=(1, *frame.shape),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        ds.id.write_direct_chunk((0, 0, 0), codec.encode(frame, "bs16-lz4<"))
    with h5py.File(path) as f:
        assert np.array_equal(f["data"][0], frame)


def test_real_stream_v1_bs16_blob(shared_data):
    """The DLS EIGER2 capture: our decode equals h5py+hdf5plugin on the same bytes and dectris-compression."""
    parts = msgpack.unpackb((shared_data / "stream_v1/dls_eiger2_16m_roi4m/image000044").read_bytes())
    dimage_d = msgpack.unpackb(parts[1]) if isinstance(parts[1], bytes) and parts[1][:1] != b"{" else None
    import json

    dimage_d = dimage_d or json.loads(parts[1])
    width, height = dimage_d["shape"]
    ours = codec.decode(parts[2], dimage_d["encoding"], dimage_d["type"], (height, width))
    with h5py.File(shared_data / "hdf5/known_good_pair/dls_thau_4m_data_000001.h5") as f:
        via_hdf5 = f["entry/data/data"][0]
    assert ours.shape == (2162, 2068)
    assert np.array_equal(ours, via_hdf5)
    reference = np.frombuffer(dectris_decompress(bytes(parts[2]), "bslz4", elem_size=2), np.uint16)
    assert np.array_equal(ours.reshape(-1), reference)
    assert int((ours == 0xFFFF).sum()) == 260886  # masked pixels, as the data README states


def test_real_stream_v1_lz4_blobs(shared_data):
    """EIGER2 1M `lz4<` frames (one raw LZ4 block): equal to dectris-compression with the HDF5-LZ4 prefix."""
    import json

    folder = shared_data / "stream_v1/eiger2_1m_lz4"
    files = sorted(glob.glob(str(folder / "streamData.*")))
    checked = 0
    for i, name in enumerate(files):
        head = open(name, "rb").read()
        if not head.startswith(b"{") or b'"dimage_d-1.0"' not in head:
            continue
        d = json.loads(head)
        blob = open(files[i + 1], "rb").read()
        width, height = d["shape"]
        ours = codec.decode(blob, d["encoding"], d["type"], (height, width))
        n = width * height * 4
        framed = struct.pack(">QII", n, n, len(blob)) + blob
        reference = np.frombuffer(dectris_decompress(framed, "lz4"), np.uint32).reshape(height, width)
        assert np.array_equal(ours, reference)
        checked += 1
    assert checked == 20


def test_real_stream_v2_blob(shared_data):
    from intxr.stream import parse_message

    [event] = parse_message([(shared_data / "stream_v2/eiger2_16m_final/image.cbor").read_bytes()])
    ours = codec.decode(event.blob, event.encoding, event.dtype, event.shape)
    reference = np.frombuffer(dectris_decompress(bytes(event.blob), "bslz4", elem_size=2), np.uint16)
    assert ours.shape == (4362, 4148)
    assert np.array_equal(ours.reshape(-1), reference)


def test_decode_into_writes_the_given_array_without_a_copy():
    frame = random_frame((64, 96), np.uint32)
    blob = codec.encode(frame, "bs32-lz4<")
    out = np.zeros_like(frame)
    result = codec.decode_into(memoryview(blob), "bs32-lz4<", out)
    assert result is out and np.array_equal(out, frame)


def test_bad_blobs_raise_clear_errors():
    frame = random_frame((64, 96), np.uint16)
    blob = codec.encode(frame, "bs16-lz4<")
    with pytest.raises(DecodeError, match="truncated"):
        codec.decode(blob[: len(blob) // 2], "bs16-lz4<", np.uint16, frame.shape)
    with pytest.raises(DecodeError, match="declares"):
        codec.decode(blob, "bs16-lz4<", np.uint16, (64, 95))
    with pytest.raises(DecodeError, match="16-bit pixels"):
        codec.decode(blob, "bs16-lz4<", np.uint32, frame.shape)
    with pytest.raises(DecodeError, match="unknown encoding"):
        codec.decode(blob, "zstd", np.uint16, frame.shape)
    with pytest.raises(DecodeError):
        codec.decode(b"\x00" * 40, "lz4<", np.uint16, frame.shape)


_KERNEL_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
from intxr import codec
from intxr.codec import DecodeError

cases = json.loads(sys.argv[1])
from intxr import _splitter
result = {"kernel": _splitter.bslz4_kernel()}
for name, (path, encoding, dtype, shape) in cases.items():
    blob = open(path, "rb").read()
    out = codec.decode(blob, encoding, dtype, shape)
    result[name] = hashlib.md5(out.tobytes()).hexdigest()
    errors = 0
    for bad in (blob[: len(blob) // 2], blob[:13], blob[:-1]):
        try:
            codec.decode(bad, encoding, dtype, shape)
        except DecodeError:
            errors += 1
    result[name + ":errors"] = errors
print(json.dumps(result))
"""


@pytest.mark.parametrize("kernel", ["scalar", "sse2", "avx2", "gfni", "avx512"])
def test_bslz4_every_unshuffle_kernel_on_real_frames(kernel, shared_data, tmp_path):
    """Each unshuffle path (forced with INTXR_BSLZ4_KERNEL in a fresh process; a path the CPU lacks
    falls back) decodes real frames to the bytes h5py + hdf5plugin gives, and rejects truncations."""
    import hashlib
    import json
    import os
    import subprocess
    import sys

    from intxr.images import read_cbf
    from intxr.stream import parse_message

    cases, expected = {}, {}
    # Real EIGER2 blobs (bs16) as the detector sent them.
    [event] = parse_message([(shared_data / "stream_v2/eiger2_16m_final/image.cbor").read_bytes()])
    path = tmp_path / "v2.blob"
    path.write_bytes(bytes(event.blob))
    cases["v2"] = (str(path), event.encoding, np.dtype(event.dtype).name, list(event.shape))
    # A real PILATUS 6M frame in 32, 16 and 8 bits (odd pixel count: a trailing partial block).
    pixels = read_cbf(str(shared_data / "cbf/thaumatin_grid/thau_3_2_0005.cbf.bz2")).data
    for dtype in (np.uint32, np.uint16, np.uint8):
        frame = np.clip(pixels, 0, np.iinfo(dtype).max).astype(dtype)[:, :-3]
        encoding = codec.v1_encoding("bslz4", frame.dtype)
        path = tmp_path / f"{frame.dtype.name}.blob"
        path.write_bytes(codec.encode(frame, encoding))
        cases[frame.dtype.name] = (str(path), encoding, frame.dtype.name, list(frame.shape))
    for name, (path, _encoding, dtype, shape) in cases.items():
        with h5py.File(tmp_path / f"{name}.h5", "w", driver="core", backing_store=False) as f:
            ds = f.create_dataset(
                "data",
                shape=(1, *shape),
                dtype=dtype,
                chunks=(1, *shape),
                **hdf5plugin.Bitshuffle(cname="lz4"),
            )
            ds.id.write_direct_chunk((0, 0, 0), open(path, "rb").read())
            expected[name] = hashlib.md5(ds[0].tobytes()).hexdigest()
        expected[name + ":errors"] = 3
    env = dict(os.environ, INTXR_BSLZ4_KERNEL=kernel)
    run = subprocess.run(
        [sys.executable, "-c", _KERNEL_SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True, check=True
    )
    got = json.loads(run.stdout)
    # The path forced is the one that ran, or the best one below it this CPU has.
    order = ["scalar", "sse2", "avx2", "gfni", "avx512"]
    ran = got.pop("kernel")
    assert order.index(ran) <= order.index(kernel)
    assert got == expected
    if ran != kernel:
        pytest.skip(f"this CPU does not run the {kernel} path (the {ran} path ran, and decoded right)")
