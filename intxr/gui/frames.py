"""The frame view: a frame read back from the HDF5 files the Splitter wrote, scaled down for a
browser, with a contrast that shows spots, the geometry for resolution and ice rings, the spots
found and, for an indexed frame, the spots its lattice predicts. `Frames` reads and keeps the
latest few for every browser session and the JSON API at once (under its lock)."""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

# Data files reached through the master's external links are opened by HDF5 itself: no lock there
# either (read at each open by HDF5 1.10.7 and later).
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import h5py  # noqa: E402
import hdf5plugin  # noqa: F401,E402  (registers the bitshuffle and LZ4 filters)
import numpy as np  # noqa: E402

from intxr.geometry import Geometry, GeometryError  # noqa: E402
from intxr.gui.model import MAX_SPOT_FRAMES, RunModel, SeriesView  # noqa: E402
from intxr.reader.predict import predict_spots  # noqa: E402

FRAME_CACHE = 16  # rendered frames kept for repeated requests

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
    return FrameView(
        image, scale, (rows, cols), rings, beam, geometry if geometry is not None and geometry.known else None
    )


class FrameError(Exception):
    """A frame that cannot be shown, and why (with the HTTP status the JSON API answers)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def predicted(rendered: FrameView, point: dict | None, crystal: dict | None) -> tuple[list, str | None]:
    """The indexed lattice's predicted spots in view pixels (intxr.reader.predict, with the geometry of the
    series' master file, the one the readers had), or none and why."""
    if crystal is None:
        if point is not None and point.get("indexed"):
            return [], f"indexed, but no longer kept (the latest {MAX_SPOT_FRAMES} indexed frames are)"
        return [], "not indexed"
    if rendered.geometry is None:
        return [], "the master file has no complete geometry to predict with"
    found = predict_spots(rendered.geometry, crystal["orientation_matrix"])
    scale = rendered.scale
    return [[round(x / scale, 2), round(y / scale, 2)] for x, y in found.xy.tolist()], found.reason


class Frames:
    """Frames of the model's series read back from disk and rendered, the latest FRAME_CACHE kept.
    Browser sessions (on the server's thread, through a worker) and the API share it: the cache is
    only touched under its lock; the reading itself is outside it."""

    def __init__(self, model: RunModel):
        self.model = model
        self._cache: OrderedDict[tuple, FrameView] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, series: SeriesView, frame: int) -> FrameView:
        master = series.master_file
        if not master:
            raise FrameError(404, f"series {series.label} has no master file yet")
        # Checked before the cache too: files deleted (output retention) are gone for good.
        if not os.path.exists(master):
            raise FrameError(
                410,
                f"series {series.label}: its files are gone from disk ({master}; output "
                f"retention deletes the oldest series)",
            )
        key = (series.key, series.order, frame)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        index = series.disk_index(frame)
        if index is None:
            raise FrameError(404, f"series {series.label} has no frame {frame}")
        try:
            data, geometry, mask = read_frame(master, index)
        except IndexError:
            raise FrameError(404, f"series {series.label}: frame {frame} is not on disk (yet)") from None
        except Exception as exc:  # unreadable, still being written, not NXmx: said, not a traceback
            first_data = re.sub(r"_master\.h5$", "_data_000001.h5", master)
            if not os.path.exists(master) or not os.path.exists(first_data):  # deleted (while) being read
                raise FrameError(410, f"series {series.label}: its files are gone from disk ({master})") from None
            text = " ".join(str(exc).split())[:300]
            raise FrameError(404, f"series {series.label}: cannot read frame {frame} from {master}: {text}") from None
        rendered = render(data, geometry, mask)
        with self._lock:
            self._cache[key] = rendered
            while len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)
        return rendered

    def info(self, series: SeriesView, frame: int) -> tuple[FrameView, dict]:
        """The rendered frame and what is drawn on it, in view pixels: rings, beam, found spots, and the
        predicted ones with the frame's crystal (or why there are none)."""
        rendered = self.view(series, frame)
        spots = [[x / rendered.scale, y / rendered.scale] for x, y in self.model.spots(series.key, frame)]
        point = self.model.point(series.key, frame)
        crystal = self.model.crystal(series.key, frame)
        found, note = predicted(rendered, point, crystal)
        return rendered, {
            "series": series.series,
            "key": series.key,
            "label": series.label,
            "frame": frame,
            "width": int(rendered.image.shape[1]),
            "height": int(rendered.image.shape[0]),
            "scale": rendered.scale,
            "detector_shape": list(rendered.shape),
            "beam": list(rendered.beam),
            "rings": rendered.rings,
            "spots": spots,
            "result": point,
            "indexing": crystal,
            "predicted": found,
            "predicted_note": note,
        }
