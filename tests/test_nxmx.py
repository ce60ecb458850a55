"""The Splitter's geometry (one model from every header) and the NXmx master it writes from it."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
from test_serve import Listener
from test_splitter import Pusher

from intxr import _splitter
from intxr.splitter import Splitter
from intxr.testing import free_ports

V2_16M_DISTANCE_MM = 237.15919962215962  # |detector_translation[2]| of the real start message
V2_16M_WAVELENGTH = 0.918381073013


def _request_one_frame(endpoint: str, timeout_s: float = 30) -> list[bytes]:
    """One reader request on the Splitter's ROUTER: [frame meta, series info, blob]."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        deadline_polls = int(timeout_s * 10)
        for _ in range(deadline_polls):
            sock.send(json.dumps({"htype": "intxr-request-1.0", "pid": 1}).encode())
            assert sock.poll(int(timeout_s * 1000)), "no reply from the Splitter"
            parts = sock.recv_multipart()
            if json.loads(parts[0]).get("htype") == "intxr-frame-1.0":
                return parts
        raise AssertionError("only idle replies")
    finally:
        sock.close()


def test_real_v2_16m_start_gives_237_mm_in_the_series_info_and_the_master(tmp_path, shared_data):
    folder = shared_data / "stream_v2/eiger2_16m_final"
    messages = [[(folder / f"{name}.cbor").read_bytes()] for name in ("start", "image", "end")]
    serve, publish = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    pusher = Pusher()
    with Splitter(
        pusher.endpoint, tmp_path, max_series=1, series_timeout=30, serve=serve, publish=publish, skip_after=30
    ) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")
        pusher.send(messages)
        meta, series_info, _blob = _request_one_frame(serve)
        start = listener.wait_for("series_start")
        written = listener.wait_for("series_written")
        assert splitter.join(60)
    served = json.loads(series_info)["geometry"]
    for geometry in (served, start["geometry"]):
        assert geometry["version"] == 1 and geometry["source"] == "stream v2 start"
        assert geometry["distance"] == pytest.approx(V2_16M_DISTANCE_MM, abs=1e-9)
        assert geometry["wavelength"] == pytest.approx(V2_16M_WAVELENGTH, abs=1e-12)
        assert geometry["missing"] == []
        assert geometry["detector_kind"] == "eiger"
        [panel] = geometry["panels"]
        assert panel["image_size"] == [4148, 4362]
        assert panel["origin"][2] == pytest.approx(-V2_16M_DISTANCE_MM, abs=1e-9)
        assert panel["trusted_range"] == [0, 21517]
    # The function Python calls gives the same model from the same header.
    header = json.loads(series_info)
    again = json.loads(
        _splitter.geometry_from_header(json.dumps(header["config"]), json.dumps(header["header"]), 4362, 4148)
    )
    assert again == served
    with h5py.File(written["master_file"]) as f:
        det = f["entry/instrument/detector"]
        assert det["detector_distance"][()] == pytest.approx(V2_16M_DISTANCE_MM / 1000, abs=1e-12)
        assert det["transformations/translation"][()] == pytest.approx(V2_16M_DISTANCE_MM / 1000, abs=1e-12)
        assert f["entry/instrument/beam/incident_wavelength"][()] == pytest.approx(V2_16M_WAVELENGTH, abs=1e-12)
    assert json.loads(meta)["frame"] == 0


def _cbf_header_text(path: Path) -> str:
    with bz2.open(path) as f:
        head = f.read(8192)
    return head[: head.index(b"\x0c\x1a\x04\xd5")].decode("ascii", "replace")


def test_minicbf_header_of_a_real_pilatus_frame(thaumatin_cbfs):
    g = json.loads(_splitter.geometry_from_cbf_header(_cbf_header_text(Path(thaumatin_cbfs[0]))))
    assert g["source"] == "miniCBF header" and g["missing"] == []
    assert g["description"] == "PILATUS3 6M" and g["detector_number"] == "60-0119"
    assert g["detector_kind"] == "pilatus"
    assert g["wavelength"] == pytest.approx(0.96859)
    assert g["distance"] == pytest.approx(351.0)
    assert g["beam_center"] == pytest.approx([1261.61, 1306.96])
    [panel] = g["panels"]
    assert panel["image_size"] == [2463, 2527]  # from the MIME header
    assert panel["trusted_range"] == [0, 115897]  # dxtbx: (0, Count_cutoff), inclusive
    assert panel["thickness"] == pytest.approx(0.45) and panel["material"] == "Si"
    assert panel["origin"] == pytest.approx([-1261.61 * 0.172, 1306.96 * 0.172, -351.0])
    assert panel["fast_axis"] == [1, 0, 0] and panel["slow_axis"] == [0, -1, 0]


def test_hdf5_version_is_the_linked_library():
    version = _splitter.hdf5_version()
    assert len(version.split(".")) == 3 and all(p.isdigit() for p in version.split("."))


def test_missing_wavelength_and_distance_are_listed():
    g = json.loads(_splitter.geometry_from_header("{}", "", 10, 10))
    assert g["wavelength"] is None and g["distance"] is None
    assert {"wavelength", "distance", "beam_center", "pixel_size"} <= set(g["missing"])
    with pytest.raises(ValueError, match="config_json is not JSON"):
        _splitter.geometry_from_header("{", "", 1, 1)
    assert np.isfinite(g["panels"][0]["trusted_range"][1])


# ------------------------------------------------------------------------------------------------
# The master file of a detector that is not an EIGER: DIALS's generic NXmx reader (FormatNXmx).

MCSTAS_TO_IMGCIF = np.diag([-1.0, 1.0, -1.0])  # NeXus McStas frame -> dxtbx's (x and z flip)


def _transform(dataset: h5py.Dataset) -> np.ndarray:
    """The 4x4 matrix of one NXtransformations axis (lengths in mm), as the NXmx standard defines it."""
    value = float(np.atleast_1d(dataset[()])[0])
    vector = np.asarray(dataset.attrs["vector"], dtype=float)
    offset = np.asarray(dataset.attrs.get("offset", np.zeros(3)), dtype=float)
    units = dataset.attrs["units"]
    units = units.decode() if isinstance(units, bytes) else units
    matrix = np.identity(4)
    if dataset.attrs["transformation_type"] in (b"rotation", "rotation"):
        assert units == "degree"
        a = np.radians(value)
        k = np.array([[0, -vector[2], vector[1]], [vector[2], 0, -vector[0]], [-vector[1], vector[0], 0]])
        matrix[:3, :3] = np.identity(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k  # Rodrigues
        matrix[:3, 3] = offset * 1000.0
    else:
        assert units == "m"
        matrix[:3, 3] = (value * vector + offset) * 1000.0
    return matrix


def _chain(f: h5py.File, path: str) -> list[h5py.Dataset]:
    chain = []
    while path not in (".", ""):
        dataset = f[path]
        chain.append(dataset)
        depends_on = dataset.attrs["depends_on"]
        path = depends_on.decode() if isinstance(depends_on, bytes) else depends_on
    return chain


def _panel_from_master(f: h5py.File) -> dict:
    """Origin and axes of the detector module from its depends_on chains (dxtbx's flat detector:
    rotations of the chain turn the axes, the whole chain places the origin)."""
    module = f["entry/instrument/detector/module"]
    out = {}
    for name, key in (("fast_pixel_direction", "fast_axis"), ("slow_pixel_direction", "slow_axis")):
        axis = module[name]
        parents = _chain(
            f,
            axis.attrs["depends_on"].decode()
            if isinstance(axis.attrs["depends_on"], bytes)
            else axis.attrs["depends_on"],
        )
        rotation = np.identity(4)
        for t in reversed(parents):
            if t.attrs["transformation_type"] in (b"rotation", "rotation"):
                rotation = rotation @ _transform(t)
        out[key] = MCSTAS_TO_IMGCIF @ rotation[:3, :3] @ np.asarray(axis.attrs["vector"], dtype=float)
        cumulative = np.identity(4)
        for t in reversed(parents):
            cumulative = cumulative @ _transform(t)
        out["origin"] = MCSTAS_TO_IMGCIF @ cumulative[:3, 3]
        out["pixel_size"] = float(axis[()]) * 1000.0
    return out


def _pilatus_6m_gaps() -> np.ndarray:
    """dxtbx's hard-coded PILATUS 6M module gaps (FormatPilatusHelpers.pilatus_6M_mask, 1-based
    f0, f1, s0, s1), as a mask with bit 0 (gap) set."""
    gaps = np.zeros((2527, 2463), dtype="<u4")
    for f0 in (488, 982, 1476, 1970):
        gaps[:, f0 - 1 : f0 + 6] = 1
    for s0 in range(196, 2317, 212):
        gaps[s0 - 1 : s0 + 16, :] = 1
    return gaps


def _pilatus_config(two_theta: float) -> dict:
    """A v1 config part as a PILATUS source streamed as an EIGER sends it (eiger_fw_version too)."""
    return {
        "beam_center_x": 1261.61,
        "beam_center_y": 1306.96,
        "bit_depth_image": 32,
        "bit_depth_readout": 16,
        "count_time": 0.019,
        "countrate_correction_count_cutoff": 115897,
        "description": "PILATUS3 6M",
        "detector_distance": 0.351,
        "detector_number": "60-0119",
        "eiger_fw_version": "intxr-simulate",
        "frame_time": 0.02,
        "nimages": 2,
        "ntrigger": 1,
        "omega_increment": 0.1,
        "omega_start": 10.0,
        "sensor_material": "Si",
        "sensor_thickness": 0.00045,
        "two_theta_increment": 0.0,
        "two_theta_start": two_theta,
        "wavelength": 0.96859,
        "x_pixel_size": 0.000172,
        "x_pixels_in_detector": 2463,
        "y_pixel_size": 0.000172,
        "y_pixels_in_detector": 2527,
    }


def _v1_series(config: dict, frames: list[np.ndarray], mask: np.ndarray | None) -> list[list[bytes]]:
    """A stream v1 series of uint32 frames, encoded bs32-lz4<: header_detail all with `mask`,
    basic (no mask) when it is None."""
    from intxr import stream_format as fmt

    messages = [fmt.v1_header(1, "all", config, mask) if mask is not None else fmt.v1_header(1, "basic", config)]
    for n, frame in enumerate(frames):
        blob = _splitter.bslz4_compress(np.ascontiguousarray(frame, dtype="<u4").view(np.uint8), 4)
        messages.append(fmt.v1_image(1, n, blob, "bs32-lz4<", frame.shape, np.uint32, 0, 0))
    messages.append(fmt.v1_end(1))
    return messages


@pytest.mark.parametrize(
    ("two_theta", "orientation"),
    [(0.0, None), (20.0, None), (-15.0, [0.0, -1.0, 0.0, 1.0, 0.0, 0.0])],  # the last turned by 90 deg
)
def test_pilatus_master_is_generic_nxmx_with_trusted_range_mask_and_chains(tmp_path, two_theta, orientation):
    config = _pilatus_config(two_theta)
    if orientation is not None:
        config["detector_orientation"] = orientation
    shape = (2527, 2463)
    frame = np.zeros(shape, dtype=np.uint32)
    frame[195:212, :] = 0xFFFFFFFF  # a module gap, as a PILATUS marks it (-1)
    frame[5, 7] = 0xFFFFFFFE  # a bad pixel (-2)
    mask = np.zeros(shape, dtype="<u4")
    mask[195:212, :] = 1
    mask[5, 7] = 2
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1, series_timeout=30) as splitter:
        pusher.send(_v1_series(config, [frame, frame], mask))
        assert splitter.join(60)
    [master] = splitter.counters()["files"]
    model = json.loads(_splitter.geometry_from_header(json.dumps(config), "", *shape))
    [panel] = model["panels"]
    with h5py.File(master) as f:
        det = f["entry/instrument/detector"]
        # FormatNXmx (not FormatNXmxEigerFilewriter, which refuses "Unknown Eiger module size").
        assert f["entry/definition"][()] == b"NXmx"
        assert "detectorSpecific/eiger_fw_version" not in det
        assert det["description"][()] == b"PILATUS3 6M"
        # The trusted range dxtbx reads: (underload_value, saturation_value) = the CBF's (0, Count_cutoff).
        assert det["underload_value"][()] == 0 and det["saturation_value"][()] == 115897
        assert [det["underload_value"][()], det["saturation_value"][()]] == panel["trusted_range"]
        # Stored pixels are uint32: the generic reader masks 2^32-1 / -2 only with bit_depth_readout 32.
        assert det["bit_depth_readout"][()] == 32
        # The sent mask, with every module gap dxtbx masks on a PILATUS's own files.
        assert np.array_equal(det["pixel_mask"][()], mask | _pilatus_6m_gaps())
        assert det["sensor_material"][()] == b"Si" and det["sensor_thickness"][()] == pytest.approx(0.00045)
        module = det["module"]
        assert list(module["data_origin"][()]) == [0, 0] and list(module["data_size"][()]) == [2527, 2463]
        assert f["entry/sample/depends_on"][()] == b"/entry/sample/transformations/omega"
        assert f["entry/sample/transformations/omega"][()] == pytest.approx([10.0, 10.1])
        got = _panel_from_master(f)
    assert got["origin"] == pytest.approx(panel["origin"], abs=1e-9)
    assert got["fast_axis"] == pytest.approx(panel["fast_axis"], abs=1e-12)
    assert got["slow_axis"] == pytest.approx(panel["slow_axis"], abs=1e-12)
    assert got["pixel_size"] == pytest.approx(0.172)
    if two_theta:
        # The arm turned the detector: the pixel at the header's beam centre sees 2theta.
        bx, by = 1261.61 * 0.172, 1306.96 * 0.172
        point = np.asarray(panel["origin"]) + bx * np.asarray(panel["fast_axis"]) + by * np.asarray(panel["slow_axis"])
        assert np.degrees(np.arccos(-point[2] / np.linalg.norm(point))) == pytest.approx(abs(two_theta), abs=1e-9)


def test_each_master_has_its_own_series_mask_when_masks_repeat_and_change(tmp_path):
    """The Splitter writes a mask it wrote for the series before by copying the stored chunks (not
    deflating it again): each master still holds its own series' mask, whether it repeats or not."""
    shape = (2527, 2463)
    frame = np.zeros(shape, dtype=np.uint32)
    first, second = np.zeros(shape, dtype="<u4"), np.zeros(shape, dtype="<u4")
    first[5, 7] = 2
    second[100:120, 300:900] = 1
    sent = [first, first, second, first]
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=len(sent), series_timeout=30) as splitter:
        pusher.send([part for mask in sent for part in _v1_series(_pilatus_config(0.0), [frame], mask)])
        assert splitter.join(60)
    masters = splitter.counters()["files"]
    assert len(masters) == len(sent)
    for master, mask in zip(masters, sent, strict=True):
        with h5py.File(master) as f:
            stored = f["entry/instrument/detector/pixel_mask"]
            assert stored.compression == "gzip"
            assert np.array_equal(stored[()], mask | _pilatus_6m_gaps()), master


def test_pilatus_without_a_mask_gets_dxtbx_s_module_gaps(tmp_path):
    """header_detail basic sends no mask: the master still masks what DIALS masks on the CBF."""
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1, series_timeout=30) as splitter:
        pusher.send(_v1_series(_pilatus_config(0.0), [np.zeros((2527, 2463), dtype=np.uint32)], None))
        assert splitter.join(60)
    [master] = splitter.counters()["files"]
    with h5py.File(master) as f:
        det = f["entry/instrument/detector"]
        assert np.array_equal(det["pixel_mask"][()], _pilatus_6m_gaps())
        assert det["underload_value"][()] == 0 and det["saturation_value"][()] == 115897


def test_eiger_master_keeps_the_file_writer_layout(tmp_path, shared_data):
    """A real EIGER2 capture keeps eiger_fw_version (DIALS's EIGER reader, a known module size)."""
    from test_splitter import capture_messages

    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")[:12]
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1, series_timeout=30) as splitter:
        pusher.send(messages)
        assert splitter.join(60)
    [master] = splitter.counters()["files"]
    with h5py.File(master) as f:
        det = f["entry/instrument/detector"]
        assert det["detectorSpecific/eiger_fw_version"][()] == b"release-2020.2.5rc2"
        # The file writer's layout: data_NNNNNN links only, no virtual dataset, no signal.
        assert list(f["entry/data"]) == ["data_000001"] and "signal" not in f["entry/data"].attrs
        assert list(det["module/data_size"][()]) == [1062, 1028]
        assert det["bit_depth_readout"][()] == 16
        # This dark capture says detector_distance 0 and translation [0, 0, 0]: the master says 0 as
        # the served geometry does (which lists the distance as missing), not an invented one.
        assert det["detector_distance"][()] == 0.0 and det["transformations/translation"][()] == 0.0
        assert _panel_from_master(f)["origin"][2] == 0.0


def test_pilatus_master_as_dials_nxmx_library_reads_it(tmp_path):
    """Read through `nxmx` (the library dxtbx's NXmx readers are built on), the way
    dxtbx.nexus.get_dxtbx_detector / get_static_mask / get_dxtbx_goniometer use it."""
    nxmx = pytest.importorskip("nxmx", reason="the nxmx package (dials/nxmx, needs scipy and pint) is not installed")
    config = _pilatus_config(20.0)
    shape = (2527, 2463)
    frame = np.zeros(shape, dtype=np.uint32)
    mask = np.zeros(shape, dtype="<u4")
    mask[195:212, :] = 1
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1, series_timeout=30) as splitter:
        pusher.send(_v1_series(config, [frame, frame], mask))
        assert splitter.join(60)
    [master] = splitter.counters()["files"]
    [panel] = json.loads(_splitter.geometry_from_header(json.dumps(config), "", *shape))["panels"]
    with h5py.File(master) as f:
        [entry] = nxmx.NXmx(f).entries
        [detector] = entry.instruments[0].detectors
        [module] = detector.modules
        assert (detector.underload_value, detector.saturation_value) == (0, 115897)
        assert detector.bit_depth_readout == 32 and detector.sensor_material == "Si"
        assert np.array_equal(detector.pixel_mask[()], mask | _pilatus_6m_gaps())
        assert tuple(module.data_size) == shape and tuple(module.data_origin) == (0, 0)
        # The flat-detector rule of get_dxtbx_detector: rotations of the chain turn the axes, the
        # whole chain places the origin; McStas -> imgCIF.
        chain = nxmx.get_dependency_chain(module.fast_pixel_direction.depends_on)
        rotations = [t for t in chain if t.transformation_type == "rotation"]
        r = nxmx.get_cumulative_transformation(rotations)[0, :3, :3]
        fast = MCSTAS_TO_IMGCIF @ r @ module.fast_pixel_direction.vector
        slow = MCSTAS_TO_IMGCIF @ r @ module.slow_pixel_direction.vector
        origin = MCSTAS_TO_IMGCIF @ nxmx.get_cumulative_transformation(chain)[0, :3, 3]
        assert origin == pytest.approx(panel["origin"], abs=1e-9)
        assert fast == pytest.approx(panel["fast_axis"], abs=1e-12)
        assert slow == pytest.approx(panel["slow_axis"], abs=1e-12)
        axes = nxmx.get_rotation_axes(nxmx.get_dependency_chain(entry.samples[0].depends_on))
        assert list(axes.names) == ["omega"] and MCSTAS_TO_IMGCIF @ axes.axes[0] == pytest.approx([1, 0, 0])
        assert entry.instruments[0].beams[0].incident_wavelength.to("angstrom").magnitude == pytest.approx(0.96859)


def test_non_eiger_frames_over_several_files_read_through_the_nxdata_signal(tmp_path, monkeypatch):
    """dxtbx's generic NXmx reader reads frame i as nxdata[signal][i] (dxtbx.nexus.get_raw_data),
    else from the first member only: the signal names a virtual dataset over every data file."""
    shape = (2527, 2463)
    frames = [np.full(shape, n, dtype=np.uint32) for n in range(5)]
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path / "out", max_series=1, series_timeout=30, frames_per_file=2) as splitter:
        pusher.send(_v1_series(_pilatus_config(0.0), frames, None))
        assert splitter.join(60)
    [master] = splitter.counters()["files"]
    monkeypatch.chdir(tmp_path)  # the sources are found beside the master, not in the working directory
    with h5py.File(master) as f:
        data = f["entry/data"]
        assert sorted(data) == ["data_000001", "data_000002", "data_000003", "frames"]
        signal = data.attrs["signal"]
        signal = signal.decode() if isinstance(signal, bytes) else signal
        assert signal == "frames" and data[signal].shape == (5, *shape) and data[signal].dtype == np.uint32
        for n in range(5):
            assert data[signal][n, ::500, ::500].tolist() == frames[n][::500, ::500].tolist()


def test_frames_start_on_page_boundaries_in_the_data_files(tmp_path):
    """Each frame (chunk) of a data file starts at a multiple of 4 KiB (HDF5 file space
    alignment), so writing it is whole pages; small metadata is not padded."""
    rng = np.random.default_rng(3)
    shape = (515, 1031)
    frames = [rng.poisson(3, size=shape).astype(np.uint32) for _ in range(4)]
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path / "out", max_series=1, series_timeout=30, frames_per_file=3) as splitter:
        pusher.send(_v1_series(_pilatus_config(0.0), frames, None))
        assert splitter.join(60)
    [master] = splitter.counters()["files"]
    data_files = sorted(Path(master).parent.glob("*_data_*.h5"))
    assert len(data_files) == 2
    n = 0
    for path in data_files:
        with h5py.File(path) as f:
            ds = f["entry/data/data"]
            for k in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(k)
                assert info.byte_offset % 4096 == 0 and info.size > 16 * 1024
                assert np.array_equal(ds[k], frames[n])
                n += 1
    assert n == 4
