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
    with Splitter(pusher.endpoint, tmp_path, max_series=1, series_timeout=30, serve=serve,
                  publish=publish, skip_after=30) as splitter:
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
    again = json.loads(_splitter.geometry_from_header(json.dumps(header["config"]), json.dumps(header["header"]),
                                                      4362, 4148))
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
