"""The simulated detector over real ZeroMQ sockets on 127.0.0.1, checked by independent consumers:
libertem-dectris (a DECTRIS stream v1 receiver) and dectris-compression (DECTRIS's own decoder)."""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import pytest
import zmq
from dectris.compression import decompress as dectris_decompress

from intxr.images import open_source
from intxr.simulate import Simulator, SimulatorSettings, pixels_for
from intxr.stream import FrameMessage, SeriesEnd, SeriesStart, StreamParser


def start(sources, **settings) -> tuple[Simulator, threading.Thread]:
    sim = Simulator(sources, SimulatorSettings(endpoint="tcp://127.0.0.1:*", rate=0, **settings))
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    assert sim.ready.wait(30)
    return sim, thread


def receive_series(endpoint: str, n_series: int = 1, timeout_s: float = 30) -> list:
    """Events of the next series (a list of such lists when n_series > 1), on one PULL socket."""
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    series, events = [], []
    parser = StreamParser()
    try:
        while len(series) < n_series:
            assert socket.poll(int(timeout_s * 1000)), "simulator went silent"
            events += parser.parse(socket.recv_multipart(copy=False))
            if isinstance(events[-1], SeriesEnd):
                series.append(events)
                events = []
        return series[0] if n_series == 1 else series
    finally:
        socket.close()


def test_v1_real_frames_through_libertem_dectris(thaumatin_cbfs):
    """libertem-dectris, an independent stream v1 receiver, decodes the real thaumatin frames we send."""
    libertem_dectris = pytest.importorskip("libertem_dectris")
    sources = thaumatin_cbfs[:2]
    expected = [pixels_for(open_source(s).read(0).data, "bs32-lz4") for s in sources]
    height, width = expected[0].shape
    sim, thread = start(sources, protocol="v1", encoding="bs32-lz4", header_detail="basic", frames=3)
    folder = tempfile.mkdtemp(prefix="intxr-libertem-")
    conn = libertem_dectris.DectrisConnection(
        uri=sim.bound_endpoint,
        frame_stack_size=1,
        handle_path=os.path.join(folder, "shm.sock"),
        num_slots=4,
        bytes_per_frame=width * height * 4,
        huge=False,
    )
    cam = None
    try:
        conn.start_passive(timeout=10.0)
        armed = conn.wait_for_arm(timeout=20.0)
        assert armed is not None, "libertem-dectris saw no dheader"
        config, series = armed
        assert series == 1 and config.get_num_frames() == 3
        cam = libertem_dectris.CamClient(conn.get_socket_path())
        received = []
        while len(received) < 3:
            stack = conn.get_next_stack(max_size=1)
            if stack is None:
                break
            assert list(stack.get_shape()) == [width, height]
            buf = np.zeros((len(stack), height, width), dtype=stack.get_dtype_string())
            cam.decode_range_into_buffer(stack, buf, 0, len(stack))
            cam.done(stack)
            received.extend(buf)
        assert len(received) == 3
        for k, frame in enumerate(received):
            assert np.array_equal(frame, expected[k % 2]), f"frame {k} differs from {sources[k % 2]}"
    finally:
        thread.join(30)
        if cam is not None:
            cam.close()
        conn.close()


@pytest.mark.parametrize("encoding", ["bs16-lz4", "bs32-lz4"])
def test_v2_blobs_decode_with_dectris_compression(thaumatin_cbfs, encoding):
    source = thaumatin_cbfs[3]
    expected = pixels_for(open_source(source).read(0).data, encoding)
    sim, thread = start([source], protocol="v2", encoding=encoding, frames=2)
    events = receive_series(sim.bound_endpoint)
    thread.join(30)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SeriesStart", "FrameMessage", "FrameMessage", "SeriesEnd"]
    start_event = events[0]
    assert start_event.config["image_size_x"] == 2463 and start_event.config["image_size_y"] == 2527
    assert start_event.config["incident_wavelength"] == pytest.approx(0.96859)
    mask = start_event.pixel_mask
    assert (mask[expected == np.iinfo(expected.dtype).max] == 1).all()
    for frame in events[1:3]:
        assert frame.encoding == "bslz4" and frame.shape == (2527, 2463)
        raw = dectris_decompress(bytes(frame.blob), "bslz4", elem_size=expected.itemsize)
        assert np.array_equal(np.frombuffer(raw, expected.dtype).reshape(expected.shape), expected)


def test_cbftoeiger_series_with_custom_keys(thaumatin_cbfs):
    from intxr.codec import decode

    sim, thread = start(
        thaumatin_cbfs[:1],
        protocol="cbftoeiger",
        frames=2,
        keys={"mapping": "rastering.row1", "master_file": "/data/x_master.h5"},
    )
    events = receive_series(sim.bound_endpoint)
    thread.join(30)
    frames = [e for e in events if isinstance(e, FrameMessage)]
    assert [f.frame for f in frames] == [1, 2]
    assert all(isinstance(e, SeriesStart) for e in events if not isinstance(e, FrameMessage | SeriesEnd))
    assert frames[0].header["mapping"] == "rastering.row1" and frames[0].header["master_file"] == "/data/x_master.h5"
    pixels = decode(frames[1].blob, frames[1].encoding, frames[1].dtype, frames[1].shape)
    assert np.array_equal(pixels, pixels_for(open_source(thaumatin_cbfs[0]).read(0).data, "bs32-lz4"))


def test_frames_cycle_through_sources_and_series_count(thaumatin_cbfs):
    from intxr.codec import decode

    sources = [thaumatin_cbfs[0], "synthetic:600x400:2"]
    sim, thread = start(sources, protocol="v1", encoding="lz4", frames=5, series=2)
    first, second = receive_series(sim.bound_endpoint, n_series=2)
    thread.join(30)
    assert sim.frames_sent == 10 and sim.series_sent == 2
    assert first[0].series == 1 and second[0].series == 2
    shapes = [e.shape for e in first if isinstance(e, FrameMessage)]
    assert shapes == [(2527, 2463), (400, 600), (400, 600), (2527, 2463), (400, 600)]
    f = [e for e in second if isinstance(e, FrameMessage)][3]
    assert f.dtype == np.uint32 and f.encoding == "lz4<"
    assert np.array_equal(
        decode(f.blob, f.encoding, f.dtype, f.shape), pixels_for(open_source(thaumatin_cbfs[0]).read(0).data, "lz4")
    )


def test_stop_ends_a_looping_simulator_waiting_for_a_consumer():
    sim = Simulator(["synthetic:64x64:3"], SimulatorSettings(endpoint="tcp://127.0.0.1:*", loop=True, rate=100))
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    assert sim.ready.wait(10)
    sim.stop()
    thread.join(10)
    assert not thread.is_alive() and sim.frames_sent == 0  # nobody connected: nothing was sent


def test_pixels_for_keeps_marked_pixels():
    frame = np.array([[-1, -2, 5, 70_000]], dtype=np.int32)
    assert pixels_for(frame, "bs16-lz4").tolist() == [[0xFFFF, 0xFFFE, 5, 0xFFFD]]
    assert pixels_for(frame, "bs32-lz4").tolist() == [[0xFFFFFFFF, 0xFFFFFFFE, 5, 70_000]]


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="protocol"):
        Simulator(["synthetic:64x64"], SimulatorSettings(protocol="v3"))
    with pytest.raises(ValueError, match="encoding"):
        Simulator(["synthetic:64x64"], SimulatorSettings(encoding="zstd"))
