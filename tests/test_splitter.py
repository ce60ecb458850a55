"""The Rust Splitter with real parts: ZeroMQ on loopback, files reopened by h5py + hdf5plugin."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle and LZ4 filters)
import numpy as np
import pytest
import zmq

from intxr.codec import decode
from intxr.images import open_source
from intxr.simulate import Simulator, SimulatorSettings, pixels_for
from intxr.splitter import Splitter
from intxr.testing import free_ports

# Producers bind first (as a detector does) and the Splitter connects to the port they got: a
# "free" port picked in advance can be taken by a TCP self-connect on loopback.


def simulate(sources, **settings) -> tuple[threading.Thread, str]:
    sim = Simulator(sources, SimulatorSettings(endpoint="tcp://127.0.0.1:*", rate=0, **settings))
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    assert sim.ready.wait(30)
    return thread, sim.bound_endpoint


class Pusher:
    """A bound PUSH socket that sends messages from a thread."""

    def __init__(self):
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 5000)
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"

    def send(self, messages, wait: bool = False) -> threading.Thread:
        def run():
            try:
                for parts in messages:
                    self.socket.send_multipart(parts)
            finally:
                self.socket.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        if wait:
            thread.join(30)
        return thread


def data_frames(master: Path) -> np.ndarray:
    with h5py.File(master) as f:
        assert f["entry/definition"][()] == b"NXmx"
        names = sorted(k for k in f["entry/data"] if k.startswith("data_"))
        return np.concatenate([f["entry/data"][name][()] for name in names])


def raw_chunks(master: Path) -> list[bytes]:
    chunks = []
    for data_file in sorted(master.parent.glob(master.name.replace("_master.h5", "_data_*.h5"))):
        with h5py.File(data_file) as f:
            ds = f["entry/data/data"]
            assert ds.chunks == (1, *ds.shape[1:])
            chunks += [ds.id.read_direct_chunk((i, 0, 0))[1] for i in range(ds.shape[0])]
    return chunks


@pytest.mark.parametrize(
    "protocol,encoding",
    [("v1", "bs32-lz4"), ("v1", "bs16-lz4"), ("v1", "lz4"), ("v2", "bs16-lz4"), ("cbftoeiger", "bs32-lz4")],
)
def test_every_frame_on_disk_with_the_streams_pixels(tmp_path, thaumatin_cbfs, protocol, encoding):
    sources = thaumatin_cbfs[:3]
    sim, endpoint = simulate(
        sources,
        protocol=protocol,
        encoding=encoding,
        frames=5,
        header_detail="all" if protocol == "v1" else "basic",
        keys={"master_file": "/beamline/data/thau_grid_master.h5"} if protocol == "cbftoeiger" else {},
    )
    with Splitter(endpoint, tmp_path, max_series=1, frames_per_file=2, filepath_key="master_file") as splitter:
        assert splitter.join(60), "the splitter did not see the end of the series"
        sim.join(10)
    counters = splitter.counters()
    assert counters["frames_received"] == counters["frames_written"] == 5
    assert counters["series_ended"] == 1 and counters["malformed"] == 0 and counters["write_errors"] == 0
    [master] = [Path(p) for p in counters["files"]]
    expected_name = "thau_grid_master.h5" if protocol == "cbftoeiger" else "series_000001_master.h5"
    assert master.name == expected_name and master.parent == tmp_path
    assert len(list(tmp_path.glob("*_data_*.h5"))) == 3  # 2 + 2 + 1 frames
    frames = data_frames(master)
    expected = [pixels_for(open_source(s).read(0).data, encoding) for s in sources]
    assert frames.shape == (5, 2527, 2463)
    for k in range(5):
        assert np.array_equal(frames[k], expected[k % 3])
    with h5py.File(master) as f:
        detector = f["entry/instrument/detector"]
        assert f["entry/instrument/beam/incident_wavelength"][()] == pytest.approx(0.96859)
        assert detector["detectorSpecific/pixel_mask"].ndim == 2
        assert detector["beam_center_x"][()] == pytest.approx(1261.61)


def test_blobs_are_written_unchanged(tmp_path, thaumatin_cbfs):
    """Direct chunk writes: the chunks on disk are the detector's bytes, not recompressed."""
    sim = Simulator(thaumatin_cbfs[:2], SimulatorSettings(endpoint="tcp://127.0.0.1:*", rate=0, frames=2))
    blobs = [sim.prepared(k).blob for k in range(2)]
    threading.Thread(target=sim.run, daemon=True).start()
    assert sim.ready.wait(30)
    with Splitter(sim.bound_endpoint, tmp_path, max_series=1) as splitter:
        assert splitter.join(60)
        received = raw_chunks(Path(splitter.counters()["files"][0]))
    assert received == blobs


def capture_messages(folder: Path) -> list[list[bytes]]:
    """The EIGER2 1M v1 capture (one file per part) grouped into ZeroMQ messages."""
    parts = [Path(p).read_bytes() for p in sorted(glob.glob(str(folder / "streamData.*")))]
    messages, i = [], 0
    while i < len(parts):
        htype = json.loads(parts[i]).get("htype", "")
        n = 8 if htype.startswith("dheader") else 4 if htype.startswith("dimage") else 1
        messages.append(parts[i : i + n])
        i += n
    return messages


def test_real_v1_capture_replayed(tmp_path, shared_data):
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=2) as splitter:
        pusher.send(messages)
        assert splitter.join(60)
    counters = splitter.counters()
    assert counters["frames_written"] == 20 and counters["series_ended"] == 2
    assert counters["md5_mismatches"] == 0  # the firmware's hashes verify
    masters = sorted(Path(p) for p in counters["files"])
    assert [m.name for m in masters] == ["series_000071_master.h5", "series_000072_master.h5"]
    blobs = [m[2] for m in messages if len(m) == 4]
    frames = np.concatenate([data_frames(m) for m in masters])
    for blob, frame in zip(blobs, frames, strict=True):
        assert np.array_equal(frame, decode(blob, "lz4<", np.uint32, (1062, 1028)))


def test_bad_messages_are_counted_and_the_next_frame_is_written(tmp_path, shared_data):
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")[:12]  # series 71 with its end
    header, frames, end = messages[0], messages[1:11], messages[11]
    corrupt = [
        [b"\x00garbage"],
        [frames[0][0], frames[0][1]],  # truncated: no blob
        [frames[0][0], frames[0][1].replace(b'"size":', b'"size":1'), frames[0][2], frames[0][3]],
        [b'{"htype":"dunknown-1.0"}'],
    ]
    stream = [header, frames[0], *corrupt, *frames[1:], end]
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1) as splitter:
        pusher.send(stream)
        assert splitter.join(60)
    counters = splitter.counters()
    assert counters["malformed"] == 4
    assert counters["frames_written"] == 10
    assert "skipped" in counters["last_error"]
    assert len(data_frames(Path(counters["files"][0]))) == 10


def test_series_without_end_is_closed_by_the_timeout(tmp_path, shared_data):
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")[:6]  # header + 5 frames, no end
    pusher = Pusher()
    splitter = Splitter(pusher.endpoint, tmp_path, series_timeout=0.5).start()
    try:
        pusher.send(messages, wait=True)
        deadline = time.monotonic() + 20
        while splitter.counters()["series_timed_out"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        counters = splitter.counters()
        assert counters["series_timed_out"] == 1 and counters["frames_written"] == 5
        assert len(data_frames(Path(counters["files"][0]))) == 5  # valid files while still running
    finally:
        splitter.stop()
        splitter.join(10)


def test_sigterm_leaves_complete_files(tmp_path, shared_data):
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")[:8]  # header + 7 frames, no end
    pusher = Pusher()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "intxr"),
            "splitter",
            "--connect",
            pusher.endpoint,
            "--output-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pusher.send(messages, wait=True)
        deadline = time.monotonic() + 20
        while not list(tmp_path.glob("*_data_000001.h5")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "7 of 7 frames written" in err
    [master] = out.split()
    assert len(data_frames(Path(master))) == 7


def test_independent_producer_libertem_dectris(tmp_path):
    """libertem-dectris's own stream v1 simulator drives the Splitter."""
    libertem_dectris = pytest.importorskip("libertem_dectris")
    # A port outside the ephemeral range: one the kernel just handed out can be reused at once.
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    sim = libertem_dectris.DectrisSim.new_mocked(endpoint, 6, dwelltime=None)  # binds PUSH now
    with Splitter(endpoint, tmp_path, max_series=1) as splitter:

        def produce():
            sim.send_headers()
            sim.send_frames()
            sim.send_footer()

        threading.Thread(target=produce, daemon=True).start()
        assert splitter.join(60)
    counters = splitter.counters()
    assert counters["frames_written"] == 6 and counters["series_ended"] == 1, counters
    # Its header comes as two messages (dheader, then the config alone) and its blobs have a zeroed
    # 12-byte header: both are taken in, nothing is counted malformed.
    assert counters["malformed"] == 0 and counters["repaired_headers"] == 6, counters
    frames = data_frames(Path(counters["files"][0]))
    assert frames.shape == (6, 512, 512) and frames.dtype == np.uint16
    with h5py.File(counters["files"][0]) as f:
        assert f["entry/instrument/detector/detectorSpecific/x_pixels_in_detector"][()] == 512


def test_splitter_cli_errors_are_one_line(tmp_path):
    intxr = str(Path(sys.executable).parent / "intxr")
    result = subprocess.run(
        [intxr, "splitter", "--connect", "tcp://127.0.0.1:5", "--protocol", "v3"], capture_output=True, text=True
    )
    # argparse's own "invalid choice" or the config's "expected one of": either names the value.
    assert result.returncode == 2 and "Traceback" not in result.stderr and "'v3'" in result.stderr
    result = subprocess.run(
        [intxr, "splitter", "--bind", "not-an-endpoint", "--output-dir", str(tmp_path), "--max-series", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not-an-endpoint" in result.stderr


def test_from_config_uses_the_startup_section(tmp_path):
    from intxr import config as cfg

    demo = cfg.load_beamline(cfg.default_startup_file(), "demo")
    splitter = Splitter.from_config(demo, output_dir=str(tmp_path), max_series=1)
    assert not splitter.running and splitter.counters()["frames_received"] == 0
    assert os.path.isdir(tmp_path)


def _listening(port: int) -> set[str]:
    """The local addresses listening on TCP `port` (IPv4, from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(".".join(str(b) for b in bytes.fromhex(address)[::-1]))
    return out


def test_host_localhost_binds_loopback_only(tmp_path):
    """`host = localhost` (the startup config's DEFAULT) binds the readers' and the publishing
    sockets on 127.0.0.1, never on every interface."""
    import dataclasses

    from intxr import config as cfg

    port, pub_port = free_ports(2)
    demo = cfg.load_beamline(cfg.default_startup_file(), "demo")
    section = dataclasses.replace(demo, host="localhost", port=port, splitter_pub_port=pub_port)
    detector = zmq.Context.instance().socket(zmq.PUSH)
    detector_port = detector.bind_to_random_port("tcp://127.0.0.1")
    splitter = Splitter.from_config(
        section, endpoint=f"tcp://127.0.0.1:{detector_port}", output_dir=str(tmp_path)
    ).start()
    try:
        deadline = time.monotonic() + 10
        while not (_listening(port) and _listening(pub_port)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _listening(port) == {"127.0.0.1"} and _listening(pub_port) == {"127.0.0.1"}
    finally:
        splitter.stop()
        splitter.join(10)
        detector.close(linger=0)
