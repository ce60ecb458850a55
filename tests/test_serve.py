"""The Splitter's second output: frames to readers on request, accounting published, zero copy."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zmq
from test_splitter import Pusher, capture_messages, raw_chunks, simulate

from intxr.images import open_source
from intxr.reader.source import FrameSource
from intxr.simulate import pixels_for
from intxr.splitter import Splitter
from intxr.testing import free_ports


def _loopback(socket_type) -> tuple[zmq.Socket, str]:
    sock = zmq.Context.instance().socket(socket_type)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_ports(1)[0]}"


class Listener:
    """A SUB socket collecting everything the Splitter publishes."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.messages: list[tuple[str, dict]] = []

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                topic, body = self.sock.recv_multipart()
                self.messages.append((topic.decode(), json.loads(body)))

    def wait_for(self, topic: str, seconds: float = 20) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name, body in self.messages:
                if name == topic:
                    return body
            self.poll(0.1)
        raise AssertionError(f"nothing published on {topic!r} in {seconds} s: {[m[0] for m in self.messages]}")


def _splitter(tmp_path, detector, **kwargs) -> Splitter:
    return Splitter(detector, tmp_path, protocol="auto", series_timeout=30, max_series=1, **kwargs)


def test_readers_get_every_frame_with_its_header_and_the_blob_that_is_on_disk(tmp_path, thaumatin_cbfs):
    sources = thaumatin_cbfs[:6]
    serve, publish = _free_endpoint(), _free_endpoint()
    thread, endpoint = simulate(sources, protocol="cbftoeiger", encoding="bs32-lz4")
    served: list = []
    lock = threading.Lock()
    with _splitter(tmp_path, endpoint, serve=serve, publish=publish, filepath_key="master_file",
                   skip_after=20) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")  # subscribed before any series event (frames wait for readers)

        def reader():
            with FrameSource(serve, timeout=10) as source:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    frame = source.next_frame(wait=0.5)
                    with lock:
                        if frame is not None:
                            served.append((frame.meta, frame.series_info, bytes(frame.blob), frame.pixels()))
                        if len(served) == len(sources):
                            return

        readers = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(60)
        end = listener.wait_for("series_end")
        written = listener.wait_for("series_written")
        assert splitter.join(30)
    thread.join(10)
    counters = splitter.counters()
    assert counters["frames_forwarded"] == len(sources) == counters["frames_written"]
    assert counters["frames_skipped"] == 0
    assert end["received"] == end["forwarded"] == len(sources) and end["skipped_ranges"] == []
    assert end["forwarded_ranges"] == [[1, len(sources)]]  # cbfToEiger counts from 1
    master = Path(written["master_file"])
    assert master.exists() and written["frames_written"] == len(sources)
    assert written["not_written"] == 0 and written["write_error"] is None
    assert master.name == "intxr_sim_000001_master.h5"  # from the header's master_file key
    assert end["series_name"] == written["series_name"] == "intxr_sim_000001"
    chunks = raw_chunks(master)
    by_frame = sorted(served, key=lambda s: s[0]["frame"])
    assert [m["frame"] for m, *_ in by_frame] == list(range(1, len(sources) + 1))  # cbfToEiger counts from 1
    for (meta, series_info, blob, pixels), chunk, path in zip(by_frame, chunks, sources, strict=True):
        assert blob == chunk  # the reader's blob is the one on disk, byte for byte
        assert meta["master_file"] == str(master) and meta["series_name"] == "intxr_sim_000001"
        assert series_info["series_name"] == "intxr_sim_000001"
        assert meta["header"]["master_file"] == master.name
        assert series_info["protocol"] == "cbftoeiger" and series_info["htype"] == "intxr-series-1.0"
        np.testing.assert_array_equal(pixels, pixels_for(open_source(path).read(0).data, "bs32-lz4"))
        assert meta["received"] <= meta["forwarded"]


def test_served_blob_is_not_copied_in_python(tmp_path):
    """The reader's blob is a view of the ZeroMQ message: no Python allocation of its size, and the
    decoder reads that very buffer."""
    thread, endpoint = simulate(["synthetic:4096x4096:1:7"], protocol="v1", encoding="bs32-lz4")
    serve = _free_endpoint()
    with _splitter(tmp_path, endpoint, serve=serve, skip_after=60) as splitter:
        thread.join(30)  # the simulator has sent the frame (and freed what it made in this process)
        with FrameSource(serve, timeout=10) as source:
            tracemalloc.start()
            served = None
            while served is None:
                served = source.next_frame(wait=1)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            blob = served.blob
            assert blob.readonly and blob.nbytes > 1_000_000
            assert peak < blob.nbytes // 20, f"{peak} bytes allocated receiving a {blob.nbytes}-byte blob"
            # Same memory all the way down: numpy over the view aliases the ZeroMQ buffer.
            assert np.shares_memory(np.frombuffer(blob, np.uint8), np.frombuffer(served.blob, np.uint8))
            assert served.pixels().shape == (4096, 4096)
        splitter.join(30)


def test_frames_nobody_asks_for_are_skipped_counted_and_still_written(tmp_path, thaumatin_cbfs):
    serve, publish = _free_endpoint(), _free_endpoint()
    thread, endpoint = simulate([str(p) for p in thaumatin_cbfs[:5]], protocol="v1", encoding="bs32-lz4")
    with _splitter(tmp_path, endpoint, serve=serve, publish=publish, skip_after=1.5) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")  # subscribed before the frames are skipped and the series ends
        end = listener.wait_for("series_end")
        assert splitter.join(30)
    counters = splitter.counters()
    assert counters["frames_skipped"] == 5 and counters["frames_forwarded"] == 0
    assert counters["frames_written"] == 5
    assert end["skipped"] == 5 and end["skipped_ranges"] == [[0, 4]] and end["forwarded_ranges"] == []
    assert end["bytes"] == counters["bytes_written"] and end["md5_mismatches"] == 0 and end["malformed"] == 0
    # The same account from Python, with the files' side merged in.
    [series] = counters["series"]
    assert series["skipped_ranges"] == end["skipped_ranges"] and series["frames_written"] == 5
    assert series["series_name"] == "series_000001" and series["not_written"] == 0
    assert series["master_file"] == counters["files"][0]
    thread.join(10)


def test_a_waiting_reader_gets_an_idle_reply_and_a_silent_splitter_a_reconnect(tmp_path):
    serve = _free_endpoint()
    detector, detector_endpoint = _loopback(zmq.PUSH)
    with _splitter(tmp_path, detector_endpoint, serve=serve, heartbeat=0.2):
        with FrameSource(serve, timeout=5) as source:
            assert source.next_frame(wait=3) is None
            assert source.counters.idle_replies == 1 and source.counters.reconnects == 0
    detector.close(linger=0)
    # Nobody serves here: the reader gives up after its timeout and renews its socket.
    with FrameSource(_free_endpoint(), timeout=0.3) as source:
        assert source.next_frame() is None
        assert source.counters.reconnects == 1 and "no reply" in source.counters.last_error


def test_push_fan_out(tmp_path, thaumatin_cbfs):
    serve = _free_endpoint()
    thread, endpoint = simulate([str(p) for p in thaumatin_cbfs[:4]], protocol="v2", encoding="bs16-lz4")
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(serve)
    with _splitter(tmp_path, endpoint, serve=serve, serve_mode="push", skip_after=10) as splitter:
        frames = []
        while len(frames) < 4 and pull.poll(20_000):
            meta, series_info, blob = pull.recv_multipart()
            frames.append(json.loads(meta)["frame"])
        assert splitter.join(30)
    pull.close(linger=0)
    assert sorted(frames) == [0, 1, 2, 3]
    assert splitter.counters()["frames_forwarded"] == 4


def test_bad_messages_between_good_frames_do_not_reach_readers(tmp_path, shared_data):
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")
    ends = [i for i, m in enumerate(messages) if len(m) == 1]
    header, frames, end = messages[0], messages[1 : ends[0]], messages[ends[0]]
    garbage = [[b"\x00garbage"], [b'{"htype": "dimage-1.0", "series": 1}']]
    serve, publish = _free_endpoint(), _free_endpoint()
    pusher = Pusher()
    with _splitter(tmp_path, pusher.endpoint, serve=serve, publish=publish, skip_after=10) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")
        with FrameSource(serve, timeout=10) as source:
            pusher.send([header, *garbage, *frames, end])
            got = []
            deadline = time.monotonic() + 30
            while len(got) < len(frames) and time.monotonic() < deadline:
                frame = source.next_frame(wait=1)
                if frame is not None:
                    got.append(frame.frame)
        assert splitter.join(30)
        end = listener.wait_for("series_end")
    assert len(got) == len(frames)
    assert splitter.counters()["malformed"] == len(garbage)
    assert end["malformed"] == len(garbage) and end["md5_mismatches"] == 0  # the firmware's hashes verify


def test_splitter_command_serves_and_publishes(tmp_path, thaumatin_cbfs):
    """`intxr splitter --serve EP --publish EP`, as a beamline script would start it."""
    import subprocess
    import sys

    from intxr.simulate import Simulator, SimulatorSettings

    serve, publish, endpoint = _free_endpoint(), _free_endpoint(), _free_endpoint()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "intxr"), "splitter", "--connect", endpoint, "--output-dir", str(tmp_path),
         "--serve", serve, "--publish", publish, "--skip-after", "30", "--max-series", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # A short-lived Splitter publishes its series_end and exits: subscribe before the detector starts.
    listener = Listener(publish)
    listener.wait_for("counters")
    settings = SimulatorSettings(endpoint=endpoint, rate=0, protocol="v1", encoding="bs16-lz4")
    sim = Simulator(thaumatin_cbfs[:3], settings)
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    frames = []
    with FrameSource(serve, timeout=10) as source:
        deadline = time.monotonic() + 60
        while len(frames) < 3 and time.monotonic() < deadline:
            frame = source.next_frame(wait=0.5)
            if frame is not None:
                frames.append(frame.frame)
    end = listener.wait_for("series_end")
    out, err = proc.communicate(timeout=60)
    thread.join(10)
    assert proc.returncode == 0, err
    assert sorted(frames) == [0, 1, 2] and end["forwarded"] == 3
    assert "3 forwarded to readers, 0 skipped for processing" in err
    assert out.strip().endswith("series_000001_master.h5")


def test_a_reader_survives_a_splitter_restart(tmp_path, thaumatin_cbfs):
    """The Splitter goes away and comes back on the same endpoint: the waiting reader times out,
    renews its socket (Lazy Pirate) and gets the new Splitter's frames."""
    serve = _free_endpoint()
    source = FrameSource(serve, timeout=1.0)
    thread, endpoint = simulate(thaumatin_cbfs[:2], protocol="v1", encoding="bs16-lz4")
    with _splitter(tmp_path / "a", endpoint, serve=serve, skip_after=1) as splitter:
        first = None
        while first is None:
            first = source.next_frame(wait=1)
        # Stopped with the second frame still waiting: it is skipped after skip_after, then the
        # Splitter is gone.
        splitter.stop()
        splitter.join(30)
    thread.join(10)
    assert first.series == 1 and splitter.counters()["frames_skipped"] + splitter.counters()["frames_forwarded"] == 2
    # Gone: the reader's request goes unanswered; after its timeout it renews its socket.
    assert source.next_frame(wait=1.5) is None
    assert source.counters.reconnects == 1 and "no reply" in source.counters.last_error
    thread, endpoint = simulate(thaumatin_cbfs[2:4], protocol="v1", encoding="bs16-lz4", first_series=7)
    with _splitter(tmp_path / "b", endpoint, serve=serve, skip_after=1) as splitter:
        got = None
        deadline = time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            got = source.next_frame(wait=0.5)
    thread.join(10)
    source.close()
    assert got is not None and got.series == 7
