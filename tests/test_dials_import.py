"""What DIALS and the XDS plugins need from the files the Splitter writes, for every protocol and detector
kind in ../shared/data, each sent through a real Splitter on 127.0.0.1 as one series of one frame:

- pilatus-v1-all, pilatus-v1-basic, pilatus-v2, pilatus-cbftoeiger: the PILATUS3 6M miniCBF frame
  `cbf/thaumatin_grid/thau_3_2_0001.cbf.bz2` sent by `intxr simulate` (bs32-lz4, as the demo sends it);
- eiger2-1m-v1: the real EIGER2 1M stream v1 capture (`stream_v1/eiger2_1m_lz4`): its header, first frame, end;
- eiger2-4m-v1: the real EIGER2 16M (4M ROI) frame of `stream_v1/dls_eiger2_16m_roi4m` with its header (its
  mask and flatfield blobs were blanked in the capture) and an end;
- eiger2-16m-v2: the real stream v2 start, image and end of `stream_v2/eiger2_16m_final`.
Not replayed: `stream_v2/eiger2_1m_alpha` has no start message (nothing to write a series from), and the
`cbftoeiger/*.zmq` capture lacks its blob part (the simulator's cbfToEiger stands for that protocol).

Without DIALS (these run everywhere): the layouts that readers need, per ../shared/FACTS.md ("What readers
of Eiger-style HDF5 need"): XDS's neggia plugin (detectorSpecific/pixel_mask 2-D, nimages non-zero,
filters 32008/32004), durin (groups by NX_class), and NXmx as dxtbx reads it: depends_on chains that
resolve to the geometry the Splitter serves in the series info (`"geometry"`), the generic NXmx layout for
detectors that are not EIGERs, and the pixels DIALS would trust in the file equal to those it trusts in the
source. With DIALS (dxtbx) importable: `ExperimentListFactory.from_filenames([master])` and DIALS's spot
finder on frame 0 give the same strong pixels and spots as DIALS on the source frame.
"""

from __future__ import annotations

import bz2
import glob
import json
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cbor2
import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle and LZ4 filters)
import msgpack
import numpy as np
import pytest
import zmq

from intxr.codec import decode
from intxr.images import open_source
from intxr.reader.source import FrameSource
from intxr.simulate import Simulator, SimulatorSettings, pixels_for
from intxr.splitter import Splitter
from intxr.testing import free_ports, shared_path

PILATUS_FRAME = "cbf/thaumatin_grid/thau_3_2_0001.cbf.bz2"
PILATUS_CASES = {
    "pilatus-v1-all": ("v1", "all"),
    "pilatus-v1-basic": ("v1", "basic"),
    "pilatus-v2": ("v2", "basic"),
    "pilatus-cbftoeiger": ("cbftoeiger", "basic"),
}
EIGER_CASES = ("eiger2-1m-v1", "eiger2-4m-v1", "eiger2-16m-v2")
CASES = (*PILATUS_CASES, *EIGER_CASES)

# dxtbx reads NeXus vectors (McStas frame) into its imgCIF laboratory frame with this change of basis
# (dxtbx.nexus.MCSTAS_TO_IMGCIF).
MCSTAS_TO_IMGCIF = np.diag([-1.0, 1.0, -1.0])
NEGGIA_FILTERS = {32008, 32004}  # bitshuffle+LZ4, LZ4: the only ones the neggia plugin decodes
LENGTH_MM = {"m": 1000.0, "mm": 1.0, "um": 1e-3, "microns": 1e-3, "micrometer": 1e-3, "nm": 1e-6}
ANGLE_RAD = {"deg": np.pi / 180, "degree": np.pi / 180, "degrees": np.pi / 180, "rad": 1.0, "radian": 1.0}


# ---------------------------------------------------------------------------------------------
# The sources: what each sends, and what its own header says about trusted pixels


@dataclass
class Source:
    name: str
    kind: str  # "pilatus" | "eiger"
    messages: list[list[bytes]] | None  # replayed as they are (None: the simulator sends the CBF)
    pixels: np.ndarray  # frame 0 as sent: what the file must hold
    signed: np.ndarray  # frame 0 as DIALS reads the source: marked pixels (2^bits-1, 2^bits-2) as -1, -2
    cutoff: float  # the highest trusted count, from the source's own header
    mask: np.ndarray | None  # the source's pixel mask (non-zero: not used), where it sends one
    cbf: Path | None = None  # a file DIALS reads itself: the PILATUS source
    reference: Path | None = None  # real DIALS on this source frame (../shared/reference)


def _marked_as_dials_reads(pixels: np.ndarray) -> np.ndarray:
    """Unsigned detector pixels as DIALS reads them: 2^bits-1 and 2^bits-2 become -1 and -2."""
    signed = pixels.astype(np.int64)
    if pixels.dtype.kind == "u":
        top = np.iinfo(pixels.dtype).max
        signed[pixels == top] = -1
        signed[pixels == top - 1] = -2
    return signed


def _cbf_count_cutoff(path: Path) -> int:
    with bz2.open(path) as f:
        head = f.read(16384).decode("latin-1")
    return int(re.search(r"#\s*Count_cutoff\s+(\d+)", head).group(1))


def _capture_messages(folder: Path) -> list[list[bytes]]:
    """The EIGER2 1M capture (one file per ZeroMQ part) grouped into messages by their htype."""
    parts = [Path(p).read_bytes() for p in sorted(glob.glob(str(folder / "streamData.*")))]
    messages, i = [], 0
    while i < len(parts):
        htype = json.loads(parts[i]).get("htype", "")
        n = 8 if htype.startswith("dheader") else 4 if htype.startswith("dimage") else 1
        messages.append(parts[i : i + n])
        i += n
    return messages


def _msgpack_parts(path: Path) -> list[bytes]:
    """A DLS capture file: a msgpack list of ZeroMQ parts, the first already decoded to a dict."""
    parts = msgpack.unpackb(path.read_bytes())
    return [json.dumps(p).encode() if isinstance(p, dict) else p.encode() if isinstance(p, str) else p for p in parts]


def _source(name: str) -> Source:
    if name in PILATUS_CASES:
        cbf = shared_path("data", *PILATUS_FRAME.split("/"))
        frame = open_source(str(cbf)).read(0).data  # int32: -1 module gaps, -2 bad pixels
        return Source(name, "pilatus", None, pixels_for(frame, "bs32-lz4"), frame.astype(np.int64),
                      _cbf_count_cutoff(cbf), None, cbf,
                      shared_path("reference", "thaumatin_grid", "thau_3_2_0001.dispersion.json"))
    if name == "eiger2-1m-v1":
        messages = _capture_messages(shared_path("data", "stream_v1", "eiger2_1m_lz4"))
        header, frame, end = messages[0], messages[1], messages[11]  # series 71: header, frame 0, its end
        assert json.loads(end[0])["htype"].startswith("dseries_end")
        config, part = json.loads(header[1]), json.loads(frame[1])
        width, height = part["shape"]
        pixels = decode(frame[2], part["encoding"], np.dtype(part["type"]), (height, width))
        return Source(name, "eiger", [header, frame, end], pixels, _marked_as_dials_reads(pixels),
                      config["countrate_correction_count_cutoff"], None)  # its dpixelmask part is empty
    if name == "eiger2-4m-v1":
        folder = shared_path("data", "stream_v1", "dls_eiger2_16m_roi4m")
        header, frame = _msgpack_parts(folder / "header"), _msgpack_parts(folder / "image000044")
        config, part = json.loads(header[1]), json.loads(frame[1])
        series = json.loads(header[0])["series"]
        end = [json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()]
        width, height = part["shape"]
        pixels = decode(frame[2], part["encoding"], np.dtype(part["type"]), (height, width))
        return Source(name, "eiger", [header, frame, end], pixels, _marked_as_dials_reads(pixels),
                      config["countrate_correction_count_cutoff"], None, None,
                      shared_path("reference", "stream_v1", "dls_eiger2_roi4m_frame44.dispersion.json"))
    assert name == "eiger2-16m-v2", name
    folder = shared_path("data", "stream_v2", "eiger2_16m_final")
    raw = {part: (folder / f"{part}.cbor").read_bytes() for part in ("start", "image", "end")}
    start = cbor2.loads(raw["start"])
    # data.threshold_1 = 40([dims, 69(56500([compression, element size, blob]))])
    array = cbor2.loads(raw["image"])["data"]["threshold_1"]
    (rows, cols), (compression, elem, blob) = array.value[0], array.value[1].value.value
    assert compression == "bslz4", compression
    dtype = np.dtype(f"<u{elem}")
    pixels = decode(blob, f"bs{8 * elem}-lz4<", dtype, (rows, cols))
    # Its pixel mask was replaced by 4 bytes in the capture: none to compare with.
    return Source(name, "eiger", [[raw["start"]], [raw["image"]], [raw["end"]]], pixels,
                  _marked_as_dials_reads(pixels), start["saturation_value"], None)


# ---------------------------------------------------------------------------------------------
# Through a real Splitter


@dataclass
class Written:
    source: Source
    master: Path
    geometry: dict  # the series info's "geometry", as the Splitter served it to a reader
    served: np.ndarray  # frame 0 as the Splitter served it


def _produce(source: Source) -> tuple[str, threading.Thread]:
    """Bind the producer (as a detector does) and start sending from a thread; its endpoint."""
    if source.messages is None:
        protocol, detail = PILATUS_CASES[source.name]
        sim = Simulator([str(source.cbf)], SimulatorSettings(endpoint="tcp://127.0.0.1:*", rate=0, protocol=protocol,
                                                               encoding="bs32-lz4", header_detail=detail, frames=1))
        thread = threading.Thread(target=sim.run, daemon=True)
        thread.start()
        assert sim.ready.wait(30), "the simulator did not bind"
        return sim.bound_endpoint, thread
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"

    def send():
        try:
            for parts in source.messages:
                sock.send_multipart(parts)
        finally:
            sock.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return endpoint, thread


@pytest.fixture(scope="module", params=CASES)
def written(request, tmp_path_factory) -> Written:
    source = _source(request.param)
    out = tmp_path_factory.mktemp(request.param)
    endpoint, producer = _produce(source)
    serve = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    with Splitter(endpoint, out, max_series=1, series_timeout=30, serve=serve, skip_after=30) as splitter:
        with FrameSource(serve, timeout=30) as reader:
            deadline = time.monotonic() + 60
            frame = None
            while frame is None and time.monotonic() < deadline:
                frame = reader.next_frame(wait=1)
            assert frame is not None, f"no frame served: {reader.counters}"
            geometry, served = frame.series_info.get("geometry"), frame.pixels().copy()
        assert splitter.join(60), "the Splitter did not see the end of the series"
    producer.join(10)
    counters = splitter.counters()
    assert counters["frames_written"] == 1 and counters["malformed"] == 0, counters
    [master] = [Path(p) for p in counters["files"]]
    assert isinstance(geometry, dict), f"no geometry in the served series info: {sorted(frame.series_info)}"
    return Written(source, master, geometry, served)


def _data_files(master: Path) -> list[Path]:
    return sorted(master.parent.glob(master.name.replace("_master.h5", "_data_*.h5")))


def _frame0(master: Path) -> np.ndarray:
    with h5py.File(master) as f:
        names = sorted(k for k in f["entry/data"] if re.fullmatch(r"data_\d{6}", k))
        return f["entry/data"][names[0]][0]


def _text(value) -> str:
    value = value[()] if isinstance(value, h5py.Dataset) else value
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def test_the_file_and_the_served_frame_hold_the_sources_pixels(written):
    pixels = written.source.pixels
    frame = _frame0(written.master)
    assert frame.shape == pixels.shape and frame.dtype == pixels.dtype, (frame.shape, frame.dtype)
    assert np.array_equal(frame, pixels)
    assert np.array_equal(written.served, pixels)
    with h5py.File(written.master) as f:  # dxtbx's NXmx readers take NXdata's signal first, where one is named
        data = f["entry/data"]
        if "signal" in data.attrs:
            assert np.array_equal(data[_text(data.attrs["signal"])][0], pixels)


# ---------------------------------------------------------------------------------------------
# XDS plugins (no DIALS needed)


def test_neggia_finds_mask_image_count_and_filters_it_decodes(written):
    """neggia's README: x/y_pixel_size float, detectorSpecific/nimages (and ntrigger, 1 when missing) > 0,
    detectorSpecific/pixel_mask uint32 (it turns bit 0 into -1, bits 1-4 into -2), /entry/data links
    data_000001...; FACTS.md: frames = nimages x ntrigger, filters 32008 or 32004 only."""
    shape = written.source.pixels.shape
    with h5py.File(written.master) as f:
        detector = f["entry/instrument/detector"]
        assert all(detector[k].dtype.kind == "f" for k in ("x_pixel_size", "y_pixel_size"))
        specific = detector["detectorSpecific"]
        mask = specific["pixel_mask"]
        assert mask.ndim == 2 and mask.shape == shape and mask.dtype == np.uint32, (mask.shape, mask.dtype)
        nimages = int(specific["nimages"][()])
        ntrigger = int(specific["ntrigger"][()]) if "ntrigger" in specific else 1
        assert nimages > 0 and ntrigger > 0
        links = sorted(k for k in f["entry/data"] if k.startswith("data_"))
        assert links and all(re.fullmatch(r"data_\d{6}", k) for k in links), links  # data_NNNNNN, no VDS
    frames = 0
    for path in _data_files(written.master):
        with h5py.File(path) as f:
            ds = f["entry/data/data"]
            assert ds.ndim == 3 and ds.shape[1:] == shape and ds.chunks == (1, *shape)
            plist = ds.id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            assert len(filters) == 1 and filters[0] in NEGGIA_FILTERS, filters
            low, high = int(ds.attrs["image_nr_low"]), int(ds.attrs["image_nr_high"])
            assert (low, high) == (frames + 1, frames + ds.shape[0])  # 1-based, as the file writer's
            frames += ds.shape[0]
    assert nimages * ntrigger == frames == 1, (nimages, ntrigger, frames)  # neggia reads nimages x ntrigger


def test_durin_finds_its_groups_by_nx_class(written):
    with h5py.File(written.master) as f:
        classes = {name: _text(f[name].attrs.get("NX_class", b"")) for name in
                   ("entry", "entry/data", "entry/instrument", "entry/instrument/detector")}
        assert classes == {"entry": "NXentry", "entry/data": "NXdata", "entry/instrument": "NXinstrument",
                           "entry/instrument/detector": "NXdetector"}
        detector = f["entry/instrument/detector"]
        [panel] = written.geometry["panels"]
        for key, size in zip(("x_pixel_size", "y_pixel_size"), panel["pixel_size"], strict=True):
            assert detector[key][()] * LENGTH_MM[_text(detector[key].attrs["units"])] == pytest.approx(size, abs=1e-12)
        assert "pixel_mask" in detector or "pixel_mask" in detector["detectorSpecific"]


# ---------------------------------------------------------------------------------------------
# NXmx as dxtbx reads it (no DIALS needed)


def _matrix(ds: h5py.Dataset) -> np.ndarray:
    """One NeXus transformation (its first value) as a 4x4 matrix in mm, per the NXtransformations rules."""
    kind = _text(ds.attrs["transformation_type"])
    vector = np.asarray(ds.attrs["vector"], dtype=float)
    value = float(np.asarray(ds[()]).reshape(-1)[0])
    units = _text(ds.attrs["units"])
    offset = np.asarray(ds.attrs.get("offset", np.zeros(3)), dtype=float)
    offset = offset * LENGTH_MM[_text(ds.attrs.get("offset_units", units if kind == "translation" else "mm"))]
    m = np.identity(4)
    if kind == "rotation":
        angle = value * ANGLE_RAD[units]
        axis = vector / np.linalg.norm(vector)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        m[:3, :3] = np.identity(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues
        m[:3, 3] = offset
    else:
        assert kind == "translation", kind
        m[:3, 3] = value * LENGTH_MM[units] * vector + offset
    return m


def _chain(f: h5py.File, path: str, within: str) -> tuple[list[str], np.ndarray]:
    """Follow depends_on from `path` (relative to group `within`) to "."; the transformations' paths and the
    cumulative matrix (the last in the chain applied last)."""
    names, total = [], np.identity(4)
    while path not in (".", ""):
        path = path if path.startswith("/") else posixpath.normpath(posixpath.join(within, path))
        assert path in f, f"depends_on names {path}, which is not in the file"
        assert path not in names, f"depends_on loops at {path}"
        ds = f[path]
        total = _matrix(ds) @ total
        names.append(path)
        within, path = posixpath.dirname(path), _text(ds.attrs.get("depends_on", "."))
    return names, total


def _module(f: h5py.File) -> h5py.Group:
    detector = f["entry/instrument/detector"]
    modules = [g for g in detector.values() if isinstance(g, h5py.Group) and _text(g.attrs.get("NX_class", "")) ==
               "NXdetector_module"]
    assert len(modules) == 1, f"expected one NXdetector_module in the detector, found {[m.name for m in modules]}"
    return modules[0]


def test_nxmx_depends_on_chains_give_the_served_geometry(written):
    [panel] = written.geometry["panels"]
    shape = written.source.pixels.shape
    with h5py.File(written.master) as f:
        assert _text(f["entry/definition"]) == "NXmx"
        module = _module(f)
        assert list(module["data_size"][()]) == list(shape)  # [slow, fast]
        assert list(module["data_origin"][()]) == [0, 0]
        fast, slow = module["fast_pixel_direction"], module["slow_pixel_direction"]
        chains = {}
        for name, ds in (("fast", fast), ("slow", slow)):
            names, total = _chain(f, _text(ds.attrs["depends_on"]), module.name)
            chains[name] = names
            axis = MCSTAS_TO_IMGCIF @ total[:3, :3] @ np.asarray(ds.attrs["vector"], dtype=float)
            assert axis == pytest.approx(panel[f"{name}_axis"], abs=1e-9), name
            size = float(np.asarray(ds[()]).reshape(-1)[0]) * LENGTH_MM[_text(ds.attrs["units"])]
            assert size == pytest.approx(panel["pixel_size"][0 if name == "fast" else 1], abs=1e-12)
        # dxtbx: the panel origin is the fast axis' dependency chain applied to (0, 0, 0).
        _, total = _chain(f, _text(fast.attrs["depends_on"]), module.name)
        assert MCSTAS_TO_IMGCIF @ total[:3, 3] == pytest.approx(panel["origin"], abs=1e-6)
        assert chains["fast"] == chains["slow"]
        detector = f["entry/instrument/detector"]
        detector_chain, _ = _chain(f, _text(detector["depends_on"]), detector.name)
        assert detector_chain and set(detector_chain) <= set(chains["fast"]), (detector_chain, chains["fast"])
        assert panel["image_size"] == [shape[1], shape[0]]
        wavelength = f["entry/instrument/beam/incident_wavelength"]
        assert _text(wavelength.attrs.get("units", "angstrom")) in ("angstrom", "Angstrom", "A")
        assert float(wavelength[()]) == pytest.approx(written.geometry["wavelength"], rel=1e-12)
        thickness = detector["sensor_thickness"]
        assert thickness[()] * LENGTH_MM[_text(thickness.attrs["units"])] == pytest.approx(panel["thickness"], abs=1e-9)
        assert _text(detector["sensor_material"]) == panel["material"]
        # The goniometer: the sample's chain of rotations, with the served axes' directions and angles.
        sample_chain, _ = _chain(f, _text(f["entry/sample/depends_on"]), "/entry/sample")
        served_axes = {a["name"]: a for a in written.geometry["goniometer"]["axes"]}
        rotations = [p for p in sample_chain if _text(f[p].attrs["transformation_type"]) == "rotation"]
        assert rotations, sample_chain
        for path in rotations:
            axis = served_axes.get(posixpath.basename(path))
            if axis is None or axis["vector"] is None:
                continue
            assert MCSTAS_TO_IMGCIF @ np.asarray(f[path].attrs["vector"], dtype=float) == pytest.approx(axis["vector"])
            assert float(np.asarray(f[path][()]).reshape(-1)[0]) == pytest.approx(axis["start"], abs=1e-9)
        assert written.geometry["goniometer"]["scan_axis"] in {posixpath.basename(p) for p in rotations}


def test_the_served_trusted_range_is_the_sources(written):
    [panel] = written.geometry["panels"]
    assert panel["trusted_range"] == [0, written.source.cutoff]  # dxtbx: [min, max] valid, inclusive


def _trusted_in_file(f: h5py.File, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of `frame` that dxtbx's NXmx readers use: its static mask (detector/pixel_mask == 0), and
    values within [underload_value, saturation_value] after 2^bits-1 / 2^bits-2 became -1 / -2, bits being
    bit_depth_image for the EIGER file-writer reader (chosen by detectorSpecific/eiger_fw_version) and
    bit_depth_readout for the generic one; a missing underload_value is 0 (EIGER) or -0x7FFFFFFF (generic).
    Also the values as dxtbx reads them."""
    detector = f["entry/instrument/detector"]
    eiger = "detectorSpecific/eiger_fw_version" in detector
    lo = float(detector["underload_value"][()]) if "underload_value" in detector else (0 if eiger else -0x7FFFFFFF)
    hi = float(detector["saturation_value"][()]) if "saturation_value" in detector else 0x7FFFFFFF
    depth_keys = ("bit_depth_image", "bit_depth_readout") if eiger else ("bit_depth_readout",)
    bits = next((int(detector[k][()]) for k in depth_keys if k in detector), None)
    values = frame.astype(np.int64)
    if frame.dtype == np.uint32:
        values = frame.view(np.int32).astype(np.int64)  # dxtbx holds 32-bit pixels as signed int
    if bits:
        top = 2**31 if bits == 32 else 2**bits
        marked = values.copy()
        marked[values == top - 1] = -1
        marked[values == top - 2] = -2
        values = marked
    trusted = (values >= lo) & (values <= hi)
    if "pixel_mask" in detector:
        mask = detector["pixel_mask"][()]
        assert mask.shape == frame.shape, mask.shape
        trusted &= mask == 0
    return trusted, values


def test_dials_trusts_the_same_pixels_in_the_file_as_in_the_source(written):
    """The pixels DIALS uses in the file (by the rules of the reader it picks) are those it uses in the
    source: the miniCBF's [0, Count_cutoff], the EIGER's [0, count cutoff] without its marked pixels.
    A file without the source's trusted range (header_detail basic before) gave DIALS 1341 spots where the
    source gave 1242."""
    source = written.source
    expected = (source.signed >= 0) & (source.signed <= source.cutoff)
    if source.mask is not None:
        expected &= source.mask == 0
    with h5py.File(written.master) as f:
        trusted, values = _trusted_in_file(f, _frame0(written.master))
    wrong = np.argwhere(trusted != expected)
    assert not len(wrong), (
        f"{len(wrong)} pixels trusted differently (file, source): first at (row, col) {tuple(wrong[0])}: "
        f"{trusted[tuple(wrong[0])]} {expected[tuple(wrong[0])]}, value {source.signed[tuple(wrong[0])]}"
    )
    assert np.array_equal(values[expected], source.signed[expected])


@pytest.mark.parametrize("written", list(PILATUS_CASES), indirect=True)
def test_a_detector_that_is_not_an_eiger_gets_the_generic_nxmx_layout(written):
    """dxtbx picks its EIGER file-writer reader for a file with detectorSpecific/eiger_fw_version, which
    stopped on a PILATUS 6M ("Unknown Eiger module size: [2527 2463]"); its generic NXmx reader wants
    /entry/definition NXmx, a module with the frame's data_size, the mask in detector/pixel_mask and the
    trusted range (FACTS.md)."""
    [panel] = written.geometry["panels"]
    low, high = panel["trusted_range"]
    assert written.geometry["detector_kind"] == "pilatus"
    with h5py.File(written.master) as f:
        assert _text(f["entry/definition"]) == "NXmx"
        detector = f["entry/instrument/detector"]
        assert "detectorSpecific/eiger_fw_version" not in detector
        assert "eiger" not in _text(detector.get("description", b"")).lower()
        assert list(_module(f)["data_size"][()]) == list(written.source.pixels.shape)
        assert "pixel_mask" in detector, "the generic NXmx reader takes its static mask from detector/pixel_mask"
        mask = detector["pixel_mask"][()]
        assert mask.ndim == 2 and mask.shape == written.source.pixels.shape
        assert float(detector["saturation_value"][()]) == high
        below = written.source.signed < low  # module gaps (-1) and bad pixels (-2) of the miniCBF
        assert below.any()
        if "underload_value" in detector:
            assert float(detector["underload_value"][()]) == low
        else:
            assert np.all(mask[below] != 0), "no underload_value, and the mask lets untrusted pixels through"


# ---------------------------------------------------------------------------------------------
# DIALS itself (only where it is importable)


def _dials():
    try:
        from dials.command_line.find_spots import phil_scope
        from dxtbx.model.experiment_list import ExperimentListFactory
    except ImportError as exc:
        pytest.skip(f"DIALS/dxtbx is not importable here ({exc}); DIALS is not on PyPI (../shared/FACTS.md: "
                    "build it from source against cctbx-base to run this)")
    return ExperimentListFactory, phil_scope


def _dials_find_spots(phil_scope, experiments, image=None, mask=None):
    """Strong pixels (numpy bool) and spots (reflection table) on frame 0 as dials.find_spots finds them:
    its default parameters, one process; `image`/`mask` (flex, frame 0) in place of what dxtbx read."""
    from dials.algorithms.spot_finding.factory import SpotFinderFactory
    from dials.algorithms.spot_finding.finder import pixel_list_to_reflection_table
    from dials.model.data import PixelList, PixelListLabeller

    params = phil_scope.fetch().extract()
    params.spotfinder.mp.nproc = 1
    params.spotfinder.filter.min_spot_size = 3  # what DIALS's Auto picks for a pixel-array detector
    imageset = experiments.imagesets()[0]
    if image is None:
        image, mask = imageset.get_corrected_data(0)[0], imageset.get_mask(0)[0]
    strong = SpotFinderFactory.configure_threshold(params).compute_threshold(image, mask, imageset=imageset,
                                                                            i_panel=0)
    labeller = PixelListLabeller()
    labeller.add(PixelList(0, image, strong))
    spots, _ = pixel_list_to_reflection_table(
        imageset, [labeller], filter_spots=SpotFinderFactory.configure_filter(params),
        min_spot_size=params.spotfinder.filter.min_spot_size, max_spot_size=params.spotfinder.filter.max_spot_size,
        write_hot_pixel_mask=False,
    )
    return strong.as_numpy_array().astype(bool), spots, params


def _centroids(spots) -> np.ndarray:
    xyz = np.array([spots["xyzobs.px.value"][i][:2] for i in range(len(spots))]).reshape(-1, 2)
    return xyz[np.lexsort(xyz.T[::-1])]


def test_dials_imports_the_file_and_finds_the_sources_strong_pixels_and_spots(written):
    ExperimentListFactory, phil_scope = _dials()
    from dials.array_family import flex

    source = written.source
    experiments = ExperimentListFactory.from_filenames([str(written.master)])
    assert len(experiments) >= 1
    imageset = experiments.imagesets()[0]
    reader = imageset.get_format_class().__name__
    if source.kind == "pilatus":
        assert "eiger" not in reader.lower(), f"dxtbx picked {reader} for a PILATUS"
    [panel] = imageset.get_detector()
    [served] = written.geometry["panels"]
    assert list(panel.get_image_size()) == served["image_size"]
    assert list(panel.get_origin()) == pytest.approx(served["origin"], abs=1e-6)
    assert list(panel.get_fast_axis()) == pytest.approx(served["fast_axis"], abs=1e-9)
    assert list(panel.get_slow_axis()) == pytest.approx(served["slow_axis"], abs=1e-9)
    assert list(panel.get_trusted_range()) == pytest.approx(served["trusted_range"])
    assert imageset.get_beam().get_wavelength() == pytest.approx(written.geometry["wavelength"], rel=1e-9)

    strong, spots, params = _dials_find_spots(phil_scope, experiments)
    # DIALS's whole dials.find_spots pipeline on the file.
    found = len(flex.reflection_table.from_observations(experiments, params))
    if source.cbf is not None:  # DIALS reads the source itself
        source_experiments = ExperimentListFactory.from_filenames([str(source.cbf)])
        [source_panel] = source_experiments.imagesets()[0].get_detector()
        for get in ("get_origin", "get_fast_axis", "get_slow_axis", "get_pixel_size", "get_trusted_range"):
            assert list(getattr(panel, get)()) == pytest.approx(list(getattr(source_panel, get)()), abs=1e-6), get
        assert panel.get_thickness() == pytest.approx(source_panel.get_thickness())
        assert panel.get_material() == source_panel.get_material()
        source_strong, source_spots, _ = _dials_find_spots(phil_scope, source_experiments)
        assert found == len(flex.reflection_table.from_observations(source_experiments, params))
    else:  # a stream: DIALS's threshold and labelling on the decoded source frame, masked as its header says
        valid = (source.signed >= 0) & (source.signed <= source.cutoff)
        if source.mask is not None:
            valid &= source.mask == 0
        image, mask = flex.double(source.signed.astype(np.float64)), flex.bool(valid)
        image.reshape(flex.grid(*valid.shape))
        mask.reshape(flex.grid(*valid.shape))
        source_strong, source_spots, _ = _dials_find_spots(phil_scope, experiments, image, mask)
    assert strong.sum() > 0 or source.kind == "eiger"  # the EIGER captures but one are dark frames
    assert np.array_equal(strong, source_strong), (int(strong.sum()), int(source_strong.sum()))
    assert len(spots) == len(source_spots) == found
    assert np.allclose(_centroids(spots), _centroids(source_spots), atol=1e-9)
    if source.reference is not None:  # real DIALS on the source frame, recorded in ../shared/reference
        reference = json.loads(source.reference.read_text())
        assert (int(strong.sum()), found) == (reference["n_strong_pixels"], reference["n_spots"])
