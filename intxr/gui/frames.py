"""The frame view: a frame read back from the HDF5 files the Splitter wrote, scaled down for a
browser, with a contrast that shows spots, and the geometry for resolution and ice rings."""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass

# Data files reached through the master's external links are opened by HDF5 itself: no lock there
# either (read at each open by HDF5 1.10.7 and later).
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import h5py  # noqa: E402
import hdf5plugin  # noqa: F401,E402  (registers the bitshuffle and LZ4 filters)
import numpy as np  # noqa: E402

from intxr.geometry import Geometry, GeometryError  # noqa: E402

RESOLUTION_RINGS_A = (10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.8, 1.6, 1.4, 1.2)
# The strong powder rings of hexagonal ice Ih, in A (the rings DIALS's ice filter and beamline
# viewers mark).
ICE_RING_D = (3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883)


@dataclass
class FrameView:
    image: np.ndarray  # uint8, dark = strong (as crystallographers view frames)
    scale: int  # detector pixels per view pixel
    shape: tuple[int, int]  # the detector frame (rows, columns)
    rings: list[dict]  # {"d": A, "radius": view px, "ice": bool}
    beam: tuple[float, float]  # view px (x, y)
    geometry: Geometry | None = None  # the master's, for predicted spots


def _detector_geometry(f: h5py.File) -> Geometry | None:
    """The master's geometry (the one model, `Geometry.from_nxmx`); None when it has none to draw rings."""
    try:
        geometry = Geometry.from_nxmx(f)
    except GeometryError:
        return None
    return geometry if geometry.known else None


def _open(path: str) -> h5py.File:
    # The Splitter may still be writing this series (it flushes every half second): no file lock,
    # which HDF5 would refuse while the writer holds its own.
    try:
        return h5py.File(path, "r", locking=False)
    except TypeError:  # h5py built without the locking option
        return h5py.File(path, "r")


def read_frame(master_file: str, frame_index: int) -> tuple[np.ndarray, Geometry | None, np.ndarray | None]:
    """Frame `frame_index` (0-based position in the series) through the master's data links."""
    if frame_index < 0:  # h5py would count it from the end: another frame
        raise IndexError(f"frame index {frame_index} < 0")
    with _open(master_file) as f:
        names = sorted(k for k in f["entry/data"] if k.startswith("data_"))
        k = frame_index
        for name in names:
            ds = f["entry/data"][name]
            if k < ds.shape[0]:
                data = ds[k]
                break
            k -= ds.shape[0]
        else:
            raise IndexError(f"{master_file} holds no frame {frame_index}")
        mask_ds = f.get("entry/instrument/detector/detectorSpecific/pixel_mask")
        mask = mask_ds[()] if mask_ds is not None and mask_ds.shape == data.shape else None
        return data, _detector_geometry(f), mask


def render(data: np.ndarray, geometry: Geometry | None, mask: np.ndarray | None, max_size: int = 1024) -> FrameView:
    rows, cols = data.shape
    scale = max(1, math.ceil(max(rows, cols) / max_size))
    valid = np.ones(data.shape, bool) if mask is None else mask == 0
    if data.dtype.kind == "u":
        valid &= data < np.iinfo(data.dtype).max - 1  # gap and dead pixels
    else:
        valid &= data >= 0
    counts = np.where(valid, data, 0).astype(np.float32)
    # Block maximum keeps a one-pixel spot visible when the frame is shown smaller.
    r, c = rows // scale * scale, cols // scale * scale
    blocks = counts[:r, :c].reshape(r // scale, scale, c // scale, scale).max(axis=(1, 3))
    sample = counts[valid][:: max(1, int(valid.sum()) // 200_000)]
    high = float(np.percentile(sample, 99.5)) if sample.size else 1.0
    high = max(high, 1.0)
    image = 255 - np.clip(blocks / high * 255, 0, 255).astype(np.uint8)
    gaps = ~valid[:r, :c].reshape(r // scale, scale, c // scale, scale).all(axis=(1, 3))
    image[gaps] = 200  # gaps in light grey
    rings: list[dict] = []
    beam = (cols / 2 / scale, rows / 2 / scale)
    centre = geometry.beam_centre_px() if geometry is not None and geometry.known else None
    if centre is not None:
        beam = (centre[0] / scale, centre[1] / scale)
        for d, ice in [(d, False) for d in RESOLUTION_RINGS_A] + [(d, True) for d in ICE_RING_D]:
            radius_px = geometry.ring_radius_px(d)  # Bragg: sin(theta) = lambda / 2d, through the panels
            if radius_px is None:
                continue
            rings.append({"d": d, "radius": radius_px / scale, "ice": ice})
    return FrameView(image, scale, (rows, cols), rings, beam, geometry if geometry is not None and geometry.known
                     else None)


def png_bytes(gray: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG (RFC 2083): signature, IHDR, one zlib IDAT, IEND."""
    height, width = gray.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = np.hstack([np.zeros((height, 1), np.uint8), np.ascontiguousarray(gray, np.uint8)]).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 3)) + chunk(b"IEND", b"")
