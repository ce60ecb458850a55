"""Image sources the simulator replays: miniCBF, Eiger/NXmx HDF5, .npy, and synthetic frames.

`open_source(spec)` gives an `ImageSource`: `len(source)` frames, `source.read(i)` -> `Image`.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
from functools import cached_property

import numpy as np

from intxr.geometry import Geometry, GeometryError, d_star_sq
from intxr.models import Image

CBF_BINARY_START = b"\x0c\x1a\x04\xd5"  # CBFlib's marker before the binary section


class SourceError(ValueError):
    """An image source that cannot be opened or read; the message names the file."""


# ---------------------------------------------------------------------------------------------
# miniCBF (PILATUS): PILATUS_1.2 header convention, x-CBF_BYTE_OFFSET compression


def byte_offset_decode(payload: bytes, n_pixels: int) -> np.ndarray:
    """Decode a byte-offset stream to int32 (Cython kernel)."""
    from intxr._kernels.cbf import byte_offset_decode_into

    out = np.empty(n_pixels, dtype=np.int32)
    n = byte_offset_decode_into(np.frombuffer(payload, dtype=np.uint8), out)
    if n != n_pixels:
        raise SourceError(f"byte-offset stream holds {n} pixels, header says {n_pixels}")
    return out


def byte_offset_decode_reference(payload: bytes, n_pixels: int) -> np.ndarray:
    """Plain Python/numpy version of `byte_offset_decode`, the reference the kernel is tested against."""
    src = np.frombuffer(payload, dtype=np.uint8)
    deltas = np.empty(n_pixels, dtype=np.int64)
    pos = 0
    for i in range(n_pixels):
        d = int(src[pos].astype(np.int8))
        pos += 1
        if d == -128:
            d = int(src[pos : pos + 2].view("<i2")[0])
            pos += 2
            if d == -32768:
                d = int(src[pos : pos + 4].view("<i4")[0])
                pos += 4
                if d == -(2**31):
                    d = int(src[pos : pos + 8].view("<i8")[0])
                    pos += 8
        deltas[i] = d
    return np.cumsum(deltas).astype(np.int32)


def _read_compressed(path: str) -> bytes:
    if path.endswith(".bz2"):
        with bz2.open(path, "rb") as f:
            return f.read()
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _cbf_number(header: str, pattern: str, path: str, default: float | None = None) -> float:
    m = re.search(pattern, header)
    if m is None:
        if default is not None:
            return default
        raise SourceError(f"{path}: miniCBF header has no {pattern!r}")
    return float(m.group(1))


def read_cbf(path: str) -> Image:
    """Read a PILATUS miniCBF (optionally .bz2/.gz); pixel values stay int32 (-1 gaps, -2 bad pixels)."""
    raw = _read_compressed(path)
    start = raw.find(CBF_BINARY_START)
    if start < 0:
        raise SourceError(f"{path}: no CBF binary section (not a miniCBF file?)")
    header = raw[:start].decode("latin-1")
    if "x-CBF_BYTE_OFFSET" not in header:
        raise SourceError(f"{path}: only x-CBF_BYTE_OFFSET compression is supported")
    fast = int(_cbf_number(header, r"X-Binary-Size-Fastest-Dimension:\s*(\d+)", path))
    slow = int(_cbf_number(header, r"X-Binary-Size-Second-Dimension:\s*(\d+)", path))
    size = int(_cbf_number(header, r"X-Binary-Size:\s*(\d+)", path))
    payload = raw[start + 4 : start + 4 + size]
    if len(payload) < size:
        raise SourceError(f"{path}: binary section truncated ({len(payload)} of {size} bytes)")
    data = byte_offset_decode(payload, fast * slow).reshape(slow, fast)

    return Image(data=data, geometry=cbf_geometry(header, fast, slow, path), source=path)


def cbf_geometry(header: str, fast: int, slow: int, path: str) -> Geometry:
    """The geometry of a miniCBF (PILATUS_1.2 header) as the Splitter normalises it (Rust, one parser for
    every header): dxtbx's simple detector facing the beam, Detector_2theta applied, trusted range
    (0, Count_cutoff), parallax for the sensor the header names."""
    import json

    from intxr._splitter import geometry_from_cbf_header

    try:
        return Geometry.from_wire(json.loads(geometry_from_cbf_header(header, slow, fast)))
    except (GeometryError, ValueError) as exc:
        raise SourceError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Sources


class ImageSource:
    """A sequence of frames with one geometry."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> Image:
        raise NotImplementedError


class CbfSource(ImageSource):
    def __init__(self, path: str):
        self.name = path
        self._image = read_cbf(path)  # read once: fails early on a bad file

    def __len__(self) -> int:
        return 1

    def read(self, index: int) -> Image:
        return self._image


class NpySource(ImageSource):
    """A 2-D array (one frame) or 3-D stack; geometry is a placeholder with the beam at the centre."""

    def __init__(self, path: str):
        self.name = path
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: not a readable .npy file ({exc})") from exc
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.ndim != 3:
            raise SourceError(f"{path}: expected a 2-D frame or 3-D stack, got shape {array.shape}")
        self._stack = array
        ny, nx = array.shape[1:]
        self._geometry = Geometry.unknown(f"{path} (a .npy array carries no geometry)")

    def __len__(self) -> int:
        return len(self._stack)

    def read(self, index: int) -> Image:
        return Image(np.array(self._stack[index]), self._geometry, self.name, index)


class Hdf5Source(ImageSource):
    """An Eiger file-writer master (frames through its `data_NNNNNN` links) or a lone data file."""

    def __init__(self, path: str):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters with h5py)

        self.name = path
        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise SourceError(f"{path}: cannot open as HDF5 ({exc})") from exc
        data_group = self._file.get("entry/data")
        if data_group is None:
            raise SourceError(f"{path}: no /entry/data group")
        names = sorted(k for k in data_group if k.startswith("data"))
        self._datasets = []
        for key in names:
            try:
                dataset = data_group[key]
            except KeyError:  # a master whose external data file is absent
                continue
            if dataset.ndim == 3:
                self._datasets.append(dataset)
        if not self._datasets:
            raise SourceError(f"{path}: /entry/data holds no readable 3-D frame dataset")
        self._offsets = np.cumsum([0] + [len(d) for d in self._datasets])
        self._geometry = self._read_geometry()
        self._mask = self._read_mask()

    def _read_mask(self) -> np.ndarray | None:
        """Pixels to use: the detector's pixel_mask == 0 (bits mark gaps, dead, noisy pixels)."""
        mask = self._file.get("entry/instrument/detector/detectorSpecific/pixel_mask")
        if mask is None or mask.shape != self._datasets[0].shape[1:]:
            return None
        return np.asarray(mask) == 0

    def _read_geometry(self) -> Geometry:
        """The master's NXmx geometry (a lone data file: its master beside it, if there)."""
        import h5py

        f = self._file
        if "entry/instrument" not in f:
            master = re.sub(r"_data_\d+\.h5$", "_master.h5", self.name)
            if master == self.name or not os.path.exists(master):
                return Geometry.unknown(f"{self.name} (a data file without its master)")
            with h5py.File(master, "r") as m:
                return self._nxmx(m, master)
        return self._nxmx(f, self.name)

    @staticmethod
    def _nxmx(f, path: str) -> Geometry:
        try:
            return Geometry.from_nxmx(f)
        except GeometryError as exc:
            raise SourceError(f"{path}: {exc}") from None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def read(self, index: int) -> Image:
        which = int(np.searchsorted(self._offsets, index, side="right") - 1)
        data = self._datasets[which][index - self._offsets[which]]
        return Image(data, self._geometry, self.name, index, extra={} if self._mask is None else {"mask": self._mask})


class SyntheticSource(ImageSource):
    """Seeded synthetic frames of a raster line across a crystal: Poisson background with a water
    ring, and Bragg-like spots whose number rises and falls along the line (blank frames at the ends).

    Spec `synthetic:WIDTHxHEIGHT[:FRAMES[:SEED]]`, default 20 frames, seed 0. Geometry: an Eiger-like
    75 um pixel detector at 200 mm, 0.9795 A, beam at the centre; module gaps every 1030x514 pixels
    read 2^bits-1 as a DECTRIS detector marks them.
    """

    def __init__(self, spec: str):
        m = re.fullmatch(r"synthetic:(\d+)x(\d+)(?::(\d+))?(?::(\d+))?", spec)
        if m is None:
            raise SourceError(f"{spec!r}: expected synthetic:WIDTHxHEIGHT[:FRAMES[:SEED]]")
        self.name = spec
        self.width, self.height = int(m.group(1)), int(m.group(2))
        self.n_frames = int(m.group(3) or 20)
        self.seed = int(m.group(4) or 0)
        if not (8 <= self.width <= 8192 and 8 <= self.height <= 8192) or self.n_frames < 1:
            raise SourceError(f"{spec!r}: size must be 8..8192 pixels a side and at least 1 frame")
        self.geometry = Geometry.simple(
            wavelength=0.9795,
            distance=200.0,
            beam_center=(self.width / 2 + 0.3, self.height / 2 - 0.7),
            pixel_size=(0.075, 0.075),
            image_size=(self.width, self.height),
            thickness=0.45,
            material="Si",
            trusted_range=(-1.0, 65534.0),
            count_time=0.01,
            frame_time=0.01,
            count_cutoff=65534,
            description="Simulated EIGER2 (intxr synthetic)",
            detector_number="SIM-0000",
            detector_kind="eiger",
            source="synthetic",
        )

    def __len__(self) -> int:
        return self.n_frames

    @cached_property
    def _background(self) -> np.ndarray:
        """Expected background counts: a diffuse falloff plus the water ring near 3.7 A."""
        g = self.geometry
        bx, by = g.beam_center
        y, x = np.ogrid[0 : self.height, 0 : self.width]
        r_mm = np.hypot((x + 0.5 - bx) * 0.075, (y + 0.5 - by) * 0.075)
        dss = d_star_sq(g, x + 0.5, y + 0.5)
        return (0.4 + 2.0 * np.exp(-r_mm / 60.0) + 1.5 * np.exp(-(((dss - 1 / 3.7**2) / 0.006) ** 2))).astype(
            np.float32
        )

    @cached_property
    def _gap_mask(self) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        for x0 in range(1030, self.width, 1030 + 10):  # EIGER modules: 1030 x 514 with gaps
            mask[:, x0 : x0 + 10] = True
        for y0 in range(514, self.height, 514 + 37):
            mask[y0 : y0 + 37, :] = True
        return mask

    def read(self, index: int) -> Image:
        rng = np.random.default_rng((self.seed, index))
        frame = rng.poisson(self._background).astype(np.float64)
        # Crystal profile along the raster line: strongest mid-line, nothing in the first/last 20%.
        t = (index + 0.5) / self.n_frames
        strength = max(0.0, 1.0 - abs(t - 0.5) / 0.3)
        n_spots = int(round(strength * 0.00004 * self.width * self.height))
        if n_spots:
            ys = rng.uniform(3, self.height - 3, n_spots)
            xs = rng.uniform(3, self.width - 3, n_spots)
            intensity = rng.exponential(400.0, n_spots) * strength + 50.0
            sigma = rng.uniform(0.6, 1.1, n_spots)
            for y, x, amp, s in zip(ys, xs, intensity, sigma, strict=True):
                y0, x0 = int(y) - 3, int(x) - 3
                yy, xx = np.mgrid[y0 : y0 + 7, x0 : x0 + 7]
                profile = np.exp(-((xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2) / (2 * s * s))
                frame[y0 : y0 + 7, x0 : x0 + 7] += rng.poisson(amp * profile / profile.sum())
        data = np.minimum(frame, 65534).astype(np.uint32)
        data[self._gap_mask] = np.uint32(0xFFFFFFFF)
        return Image(data, self.geometry, self.name, index, extra={"n_spots_simulated": n_spots})


def open_source(spec: str) -> ImageSource:
    """Open an image source by file name or `synthetic:` spec."""
    if spec.startswith("synthetic:"):
        return SyntheticSource(spec)
    if not os.path.exists(spec):
        raise SourceError(f"{spec}: no such file")
    name = spec.lower()
    if name.endswith((".cbf", ".cbf.bz2", ".cbf.gz")):
        return CbfSource(spec)
    if name.endswith((".h5", ".hdf5", ".nxs")):
        return Hdf5Source(spec)
    if name.endswith(".npy"):
        return NpySource(spec)
    raise SourceError(f"{spec}: unknown image format (expected .cbf[.bz2|.gz], .h5/.nxs, .npy or synthetic:WxH)")

