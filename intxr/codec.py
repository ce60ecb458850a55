"""Frame blobs of the DECTRIS stream: encode (simulator) and decode (readers), in the Rust core.

Stream v1 names its encodings `bs32-lz4<`, `bs16-lz4<`, `bs8-lz4<` (bitshuffle-LZ4 with the 12-byte
HDF5-filter header) and `lz4<` (one raw LZ4 block); stream v2 tags arrays `bslz4` / `lz4`.
"""

from __future__ import annotations

import struct

import numpy as np

from intxr import _splitter
from intxr._splitter import DecodeError

__all__ = ["DecodeError", "ENCODINGS", "decode", "decode_into", "encode", "v1_encoding"]

# Encoding name -> (algorithm, element size in bits or None when the dtype decides).
ENCODINGS: dict[str, tuple[str, int | None]] = {
    "bs32-lz4<": ("bslz4", 32),
    "bs16-lz4<": ("bslz4", 16),
    "bs8-lz4<": ("bslz4", 8),
    "lz4<": ("lz4", None),
    "bslz4": ("bslz4", None),
    # Stream v2 `lz4` carries the HDF5-LZ4 framing (filter 32004): >u8 total, >u4 block size, then
    # per block >u4 length + one LZ4 block.
    "lz4": ("lz4-hdf5", None),
    "none": ("none", None),
}


def _algorithm(encoding: str) -> str:
    try:
        return ENCODINGS[encoding][0]
    except KeyError:
        raise DecodeError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})") from None


def v1_encoding(algorithm: str, dtype: np.dtype) -> str:
    """The stream v1 encoding string for `bslz4` or `lz4` frames of `dtype` (`bs16-lz4<` for uint16)."""
    if algorithm == "lz4":
        return "lz4<"
    if algorithm == "bslz4":
        return f"bs{np.dtype(dtype).itemsize * 8}-lz4<"
    raise ValueError(f"unknown algorithm {algorithm!r}: expected bslz4 or lz4")


def encode(frame: np.ndarray, encoding: str) -> bytes:
    """Compress a frame as a detector would send it."""
    algorithm = _algorithm(encoding)
    data = np.ascontiguousarray(frame)
    raw = data.reshape(-1).view(np.uint8)
    if algorithm == "bslz4":
        bits = ENCODINGS[encoding][1]
        if bits is not None and bits != data.dtype.itemsize * 8:
            raise ValueError(f"encoding {encoding} needs {bits}-bit pixels, frame is {data.dtype}")
        return _splitter.bslz4_compress(raw, data.dtype.itemsize)
    if algorithm == "lz4":
        return _splitter.lz4_compress(raw)
    if algorithm == "lz4-hdf5":
        block = _splitter.lz4_compress(raw)  # one block holding the whole frame
        return struct.pack(">QII", raw.nbytes, raw.nbytes, len(block)) + block
    return raw.tobytes()


def decode_into(blob, encoding: str, out: np.ndarray) -> np.ndarray:
    """Decompress `blob` (bytes, zmq.Frame, memoryview) into `out`, whose dtype and shape are the frame's."""
    algorithm = _algorithm(encoding)
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    raw = out.reshape(-1).view(np.uint8)
    if algorithm == "bslz4":
        bits = ENCODINGS[encoding][1]
        if bits is not None and bits != out.dtype.itemsize * 8:
            raise DecodeError(f"encoding {encoding} carries {bits}-bit pixels but the header says {out.dtype}")
        _splitter.bslz4_decompress_into(blob, raw, out.dtype.itemsize)
    elif algorithm == "lz4":
        _splitter.lz4_decompress_into(blob, raw)
    elif algorithm == "lz4-hdf5":
        _hdf5_lz4_decompress_into(memoryview(blob).cast("B"), raw)
    else:
        view = memoryview(blob).cast("B")
        if view.nbytes != raw.nbytes:
            raise DecodeError(f"uncompressed blob has {view.nbytes} bytes, frame needs {raw.nbytes}")
        raw[:] = np.frombuffer(view, np.uint8)
    return out


def _hdf5_lz4_decompress_into(view: memoryview, raw: np.ndarray) -> None:
    if view.nbytes < 12:
        raise DecodeError("HDF5-LZ4 blob shorter than its 12-byte header")
    total, block_size = struct.unpack_from(">QI", view, 0)
    if total != raw.nbytes or block_size == 0:
        raise DecodeError(f"HDF5-LZ4 blob declares {total} bytes (block {block_size}), frame needs {raw.nbytes}")
    pos, start = 12, 0
    while start < total:
        if pos + 4 > view.nbytes:
            raise DecodeError(f"HDF5-LZ4 blob truncated at byte {pos}")
        (length,) = struct.unpack_from(">I", view, pos)
        pos += 4
        end = min(start + block_size, total)
        if length == end - start:  # a block LZ4 could not shrink is stored as is
            raw[start:end] = np.frombuffer(view[pos : pos + length], np.uint8)
        else:
            _splitter.lz4_decompress_into(view[pos : pos + length], raw[start:end])
        pos += length
        start = end


def decode(blob, encoding: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Decompress `blob` into a new array of `dtype` and `shape` (rows, columns)."""
    return decode_into(blob, encoding, np.empty(shape, dtype=dtype))
