"""Faults the Splitter meets at a beamline, with real parts: ZeroMQ on 127.0.0.1, files read back with
h5py + hdf5plugin, a real small tmpfs for the full disk.

Each test sends frames with known blobs and checks that every frame sent is on disk byte for byte
(or counted as not written, with the reason), under names that never replace a file.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)
import numpy as np
import pytest
import zmq
from test_serve import Listener

from intxr import _splitter
from intxr import stream_format as fmt
from intxr.geometry import Geometry
from intxr.reader.source import FrameSource
from intxr.splitter import Splitter
from intxr.testing import free_ports

SHAPE = (96, 128)  # rows, columns
SIM_GEOMETRY = Geometry.simple(wavelength=1.0, distance=200.0, beam_center=(0.0, 0.0), pixel_size=(0.075, 0.075),
                               image_size=SHAPE[::-1])
ENCODING = "bs16-lz4<"


def blobs(n: int, first: int = 0, shape=SHAPE, noisy: bool = False) -> list[bytes]:
    """`n` distinct bitshuffle-LZ4 frames (noisy ones barely compress)."""
    out = []
    for k in range(first, first + n):
        rng = np.random.default_rng(k)
        pixels = rng.integers(0, 65535, shape) if noisy else rng.poisson(2 + k % 5, shape)
        out.append(bytes(_splitter.bslz4_compress(pixels.astype(np.uint16).view(np.uint8), 2)))
    return out


def v1_frame(series: int, frame: int, blob: bytes, shape=SHAPE) -> list[bytes]:
    return fmt.v1_image(series, frame, blob, ENCODING, shape, np.uint16, 0, 1000)


def v1_series(series: int, frame_blobs: list[bytes], *, end: bool = True) -> list[list[bytes]]:
    messages = [fmt.v1_header(series, "none", {})]
    messages += [v1_frame(series, k, b) for k, b in enumerate(frame_blobs)]
    return messages + ([fmt.v1_end(series)] if end else [])


class Detector:
    """A bound PUSH socket on loopback, as a detector's: sends whole messages, in order."""

    def __init__(self):
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 5000)
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"

    def send(self, messages) -> None:
        for parts in messages:
            self.socket.send_multipart(parts)

    def close(self) -> None:
        self.socket.close()


def chunks(master: Path) -> list[bytes]:
    """The raw chunks of a series, in order, read through its master's links."""
    out = []
    with h5py.File(master) as f:
        for name in sorted(k for k in f["entry/data"] if k.startswith("data_")):
            ds = f["entry/data"][name]
            out += [ds.id.read_direct_chunk((i, 0, 0))[1] for i in range(ds.shape[0])]
    return out


def wait_for(condition, seconds: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def published(listener: Listener, topic: str) -> list[dict]:
    """Each series event once (the Splitter repeats them for late subscribers)."""
    seen, out = set(), []
    for name, body in listener.messages:
        key = json.dumps(body, sort_keys=True)
        if name == topic and key not in seen:
            seen.add(key)
            out.append(body)
    return out


def test_detector_restart_at_series_1_keeps_both_series(tmp_path, capfd):
    first, second, third = blobs(6), blobs(4, first=100), blobs(6, first=200)
    detector = Detector()
    publish = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    with Splitter(detector.endpoint, tmp_path, max_series=3, frames_per_file=4, publish=publish) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")
        # The detector restarts its numbering: series 1 again, with fewer and then as many frames.
        detector.send(v1_series(1, first) + v1_series(1, second) + v1_series(1, third))
        assert splitter.join(30)
        listener.poll(1.2)
    detector.close()
    counters = splitter.counters()
    names = ["series_000001", "series_000001_r2", "series_000001_r3"]
    assert counters["files"] == [str(tmp_path / f"{n}_master.h5") for n in names]
    for name, sent in zip(names, (first, second, third), strict=True):
        assert chunks(tmp_path / f"{name}_master.h5") == sent, name
    assert counters["frames_written"] == 16 and counters["renamed_series"] == 2
    received = [6, 4, 6]
    ends = published(listener, "series_end")
    expected = [(1, n, k) for n, k in zip(names, received, strict=True)]
    assert [(e["series"], e["series_name"], e["received"]) for e in ends] == expected
    written = published(listener, "series_written")
    assert [(w["series_name"], w["frames_written"], w["not_written"]) for w in written] == list(
        zip(names, [6, 4, 6], [0, 0, 0], strict=True)
    )
    err = capfd.readouterr().err
    assert "series 1: series_000001 is already used in" in err and "writing it as series_000001_r2" in err


def test_frames_go_to_the_device_while_the_series_is_open(tmp_path):
    """Early writeback: each data file's bytes are handed to the device as frames are written
    (`bytes_written_back`), while the series is still open (nothing has closed or synced a file),
    across data files; the files are complete and unchanged all the same."""
    frame_blobs = blobs(7, noisy=True)
    detector = Detector()
    with Splitter(detector.endpoint, tmp_path, max_series=1, frames_per_file=3) as splitter:
        detector.send(v1_series(1, frame_blobs, end=False))
        wait_for(lambda: splitter.counters()["frames_written"] == 7, what="7 frames written")
        wait_for(lambda: splitter.counters()["bytes_written_back"] >= sum(map(len, frame_blobs)),
                 what="the writeback of every frame's bytes")
        assert splitter.counters()["series_ended"] == 0  # still open
        detector.send([fmt.v1_end(1)])
        assert splitter.join(30)
    detector.close()
    counters = splitter.counters()
    assert counters["frames_written"] == 7 and counters["bytes_written"] == sum(map(len, frame_blobs))
    [master] = counters["files"]
    assert chunks(Path(master)) == frame_blobs
    assert len(list(tmp_path.glob("*_data_*.h5"))) == 3


def test_a_rerun_into_the_same_directory_overwrites_nothing(tmp_path):
    sent = blobs(5)
    runs = []
    for _ in range(2):
        detector = Detector()
        with Splitter(detector.endpoint, tmp_path, max_series=1) as splitter:
            detector.send(v1_series(1, sent))
            assert splitter.join(30)
        detector.close()
        runs.append(splitter.counters())
        if len(runs) == 1:
            before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert [Path(f).name for r in runs for f in r["files"]] == ["series_000001_master.h5", "series_000001_r2_master.h5"]
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, f"{name} was changed by the rerun"
    assert chunks(tmp_path / "series_000001_master.h5") == chunks(tmp_path / "series_000001_r2_master.h5") == sent


def test_a_pause_past_the_timeout_reopens_the_series_as_a_new_part(tmp_path, capfd):
    sent = blobs(10)
    detector = Detector()
    publish = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    splitter = Splitter(detector.endpoint, tmp_path, series_timeout=0.5, publish=publish).start()
    try:
        listener = Listener(publish)
        listener.wait_for("counters")
        messages = v1_series(1, sent)  # header, 10 frames, end
        detector.send(messages[:5])  # header and frames 0-3, then the detector pauses
        wait_for(lambda: splitter.counters()["series_timed_out"] == 1, what="the series timeout")
        detector.send(messages[5:])  # frames 4-9 of the same series, no new header, and its end
        wait_for(lambda: splitter.counters()["series_ended"] == 2, what="the end of the second part")
        listener.poll(1.2)
    finally:
        splitter.stop()
        assert splitter.join(20)
        detector.close()
    counters = splitter.counters()
    assert counters["frames_received"] == counters["frames_written"] == 10 and counters["malformed"] == 0
    assert chunks(tmp_path / "series_000001_master.h5") == sent[:4]
    assert chunks(tmp_path / "series_000001_r2_master.h5") == sent[4:]
    ends = published(listener, "series_end")
    assert [(e["series_name"], e["timed_out"], e["received"], e["forwarded"] + e["skipped"]) for e in ends] == [
        ("series_000001", True, 4, 4),
        ("series_000001_r2", False, 6, 6),
    ]
    assert ends[1]["skipped_ranges"] == [[4, 9]]  # nothing serves frames here: all skipped for processing
    err = capfd.readouterr().err
    assert "series 1: frame 4 came after the series timeout had closed series_000001: writing it as" in err


def test_the_series_a_stop_cuts_short_is_counted_and_accounted(tmp_path):
    """A stop (SIGTERM, Ctrl-C) closes the open series: counted as ended, with its series_end and
    series_written like any other, so the count of series matches the master files."""
    sent = blobs(5)
    detector = Detector()
    publish = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    splitter = Splitter(detector.endpoint, tmp_path, series_timeout=30, publish=publish).start()
    try:
        listener = Listener(publish)
        listener.wait_for("counters")
        detector.send(v1_series(1, sent) + v1_series(2, sent[:3], end=False))  # series 2 still open
        wait_for(lambda: splitter.counters()["frames_received"] == 8, what="the frames")
    finally:
        splitter.stop()
        assert splitter.join(20)
        detector.close()
    listener.poll(1.0)
    counters = splitter.counters()
    assert counters["series_started"] == counters["series_ended"] == 2, counters
    assert counters["master_files"] == len(counters["files"]) == 2
    assert [(e["series_name"], e["received"]) for e in published(listener, "series_end")] == [
        ("series_000001", 5), ("series_000002", 3)]  # fmt: skip
    assert [(w["series_name"], w["frames_written"]) for w in published(listener, "series_written")] == [
        ("series_000001", 5), ("series_000002", 3)]  # fmt: skip
    last = counters["series"][-1]
    assert (last["series_name"], last["received"], last["frames_written"]) == ("series_000002", 3, 3)
    assert chunks(tmp_path / "series_000002_master.h5") == sent[:3]


def malformed_v1(good: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """The issue's bad messages, each a (what, message) for a stream of series 1."""
    absurd = v1_frame(1, 5, good[5])  # a good blob whose dimage_d says 2^20 x 2^20 pixels
    absurd[1] = absurd[1].replace(f'"shape":[{SHAPE[1]},{SHAPE[0]}]'.encode(), b'"shape":[1048576,1048576]')
    assert b"1048576" in absurd[1]
    other_shape = (48, 128)
    wrong_size = v1_frame(1, 3, good[3])
    wrong_size[1] = wrong_size[1].replace(b'"size":', b'"size":1')
    unknown_encoding = v1_frame(1, 4, good[4])
    unknown_encoding[1] = unknown_encoding[1].replace(ENCODING.encode(), b"zstd<")
    truncated = v1_frame(1, 2, good[2])
    truncated[2] = good[2][: len(good[2]) // 2]  # dimage_d still says the whole size
    cut_blocks = v1_frame(1, 2, good[2][: len(good[2]) // 2])  # the size fits, the blocks do not
    return [
        ("truncated blob", truncated),
        ("blob cut inside its blocks", cut_blocks),
        ("size mismatch", wrong_size),
        ("bad JSON", [b'{"htype":"dimage-1.0","series":1,"frame":', *v1_frame(1, 2, good[2])[1:]]),
        ("missing parts", v1_frame(1, 2, good[2])[:2]),
        ("unknown encoding", unknown_encoding),
        ("unknown htype", [b'{"htype":"dfoo-1.0","series":1}']),
        ("noise", [np.random.default_rng(9).bytes(300), b"\xff" * 40]),
        ("absurd shape", absurd),
        ("another series without a header", v1_frame(2, 100, good[6])),
        ("a shape the series does not have", v1_frame(1, 7, blobs(1, 7, other_shape)[0], shape=other_shape)),
        ("an end of another series", fmt.v1_end(7)),
    ]


def interleave(header, frames, bad, end) -> list[list[bytes]]:
    stream = [header]
    for k, frame in enumerate(frames):
        stream.append(frame)
        if k < len(bad):
            stream.append(bad[k][1])
    return [*stream, *[b[1] for b in bad[len(frames) :]], end]


def test_malformed_v1_messages_inside_a_series_lose_no_good_frame(tmp_path):
    """The issue's stream: 12 good frames with malformed messages between them, through `intxr splitter`."""
    good = blobs(12)
    bad = malformed_v1(good)
    detector = Detector()
    messages = v1_series(1, good)
    stream = interleave(messages[0], messages[1:-1], bad, messages[-1])
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "intxr"), "splitter", "--connect", detector.endpoint,
         "--output-dir", str(tmp_path), "--max-series", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        detector.send(stream)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        detector.close()
    assert process.returncode == 0, err
    assert out.split() == [str(tmp_path / "series_000001_master.h5")]  # one master
    assert chunks(tmp_path / "series_000001_master.h5") == good
    assert "12 of 12 frames written in 1 series" in err and f"{len(bad)} malformed messages" in err
    assert "0 write errors" in err and "Traceback" not in err
    # Each bad one reported on one line naming series and frame.
    assert "series 1 frame 5: blob declares 24576 bytes, 1048576x1048576 pixels of 2 bytes are" in err
    assert "series 2 frame 100: no header for series 2 while series 1 (series_000001) is open: skipped" in err
    assert "series 1 frame 7: 48x128 uint16 BsLz4 differs from the series' 96x128 uint16 BsLz4: skipped" in err
    assert "end of series 7 while series 1 (series_000001) is open: ignored" in err


def test_malformed_v2_messages_inside_a_series_lose_no_good_frame(tmp_path):
    good = blobs(8)
    uid = "01J0000000000000000000000"
    date = "2024-06-11T10:00:00.000+00:00"

    def image(series, k, blob, shape=SHAPE):
        array = fmt.v2_compressed_array(shape, np.uint16, blob, "bslz4")
        return [fmt.v2_image(series, uid, k, {"threshold_1": array}, series_date=date, start_s=k, exposure_s=0.01)]

    start = [fmt.v2_start(1, uid, SIM_GEOMETRY, SHAPE, np.uint16, nimages=8, channels=["threshold_1"],
                          pixel_mask=None, arm_date=date)]  # fmt: skip
    bad = [
        ("noise", [b"\xd9\xd9\xf7" + np.random.default_rng(3).bytes(200)]),
        ("truncated CBOR", [image(1, 2, good[2])[0][:-100]]),
        ("another series without a start", image(2, 100, good[3])),
        ("absurd shape", image(1, 4, good[4], shape=(2**20, 2**20))),
        ("a shape the series does not have", image(1, 5, blobs(1, 5, (48, 128))[0], shape=(48, 128))),
        ("an end of another series", [fmt.v2_end(9, uid)]),
    ]
    stream = interleave(start, [image(1, k, b) for k, b in enumerate(good)], bad, [fmt.v2_end(1, uid)])
    detector = Detector()
    with Splitter(detector.endpoint, tmp_path, protocol="v2", max_series=1) as splitter:
        detector.send(stream)
        assert splitter.join(30)
    detector.close()
    counters = splitter.counters()
    assert counters["files"] == [str(tmp_path / "series_000001_master.h5")]
    assert chunks(tmp_path / "series_000001_master.h5") == good
    assert counters["malformed"] == len(bad) and counters["write_errors"] == 0 and counters["series_started"] == 1


def test_malformed_cbftoeiger_messages_inside_a_series_lose_no_good_frame(tmp_path):
    good = blobs(8)
    config = fmt.detector_config(SIM_GEOMETRY, SHAPE, np.uint16, nimages=8)
    config_part = fmt.dumps_cbftoeiger(fmt.cbftoeiger_config(config))
    keys = {"master_file": "/data/grid_7_master.h5"}

    def frame(series, k, blob, shape=SHAPE):
        return fmt.cbftoeiger_image(series, k, blob, ENCODING, shape, np.uint16, config_part, keys)

    absurd = frame(1, 3, good[2])
    absurd[3] = absurd[3].replace(f"[{SHAPE[1]},{SHAPE[0]}]".encode(), b"[1048576,1048576]")
    assert b"1048576" in absurd[3]
    wrong_size = frame(1, 4, good[3])
    wrong_size[3] = wrong_size[3].replace(b'"size":', b'"size":1')
    bad = [
        ("noise", [np.random.default_rng(5).bytes(500)]),
        ("missing parts", frame(1, 2, good[1])[:5]),
        ("absurd shape", absurd),
        ("size mismatch", wrong_size),
        ("a shape the series does not have", frame(1, 6, blobs(1, 6, (48, 128))[0], shape=(48, 128))),
    ]
    stream = interleave(frame(1, 1, good[0]), [frame(1, k + 1, b) for k, b in enumerate(good)][1:], bad, [])
    stream = [m for m in stream if m] + [fmt.cbftoeiger_end(1)]
    detector = Detector()
    with Splitter(detector.endpoint, tmp_path, protocol="cbftoeiger", max_series=1,
                  filepath_key="master_file") as splitter:  # fmt: skip
        detector.send(stream)
        assert splitter.join(30)
    detector.close()
    counters = splitter.counters()
    assert counters["files"] == [str(tmp_path / "grid_7_master.h5")]
    assert chunks(tmp_path / "grid_7_master.h5") == good
    assert counters["malformed"] == len(bad) and counters["write_errors"] == 0 and counters["series_started"] == 1


# ---------------------------------------------------------------------------------------------
# A full disk: a real 20 MiB tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs (needs root; skipped with the reason where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# A Splitter process as `intxr splitter` runs it (SIGTERM stops it), with a small disk reserve.
SPLITTER_SCRIPT = """
import json, signal, sys
from intxr.splitter import Splitter
splitter = Splitter(sys.argv[1], sys.argv[2], publish=sys.argv[3], series_timeout=30, disk_reserve_mb=2,
                    check_free_space=sys.argv[4] == "check", frames_per_file=8)
signal.signal(signal.SIGTERM, lambda *_: splitter.stop())
splitter.start()
while not splitter.join(0.2):
    pass
print(json.dumps(splitter.counters()))
"""


def run_full_disk(disk: Path, check: str, cli: bool = False):
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (8 << 20))  # what the operator deletes to make room
    # Noisy frames of 512x512 pixels barely compress: about 0.5 MiB each.
    first, after = blobs(36, noisy=True, shape=(512, 512)), blobs(6, first=500, noisy=True, shape=(512, 512))
    shape = (512, 512)
    detector = Detector()
    publish = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    out_dir = disk / "data"
    command = [sys.executable, "-c", SPLITTER_SCRIPT, detector.endpoint, str(out_dir), publish, check]
    if cli:  # the same settings through `intxr splitter`
        command = [str(Path(sys.executable).parent / "intxr"), "splitter", "--connect", detector.endpoint,
                   "--output-dir", str(out_dir), "--publish", publish, "--series-timeout", "30",
                   "--disk-reserve-mb", "2", "--frames-per-file", "8"]
        command += [] if check == "check" else ["--no-free-space-check"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener = Listener(publish)
    try:
        listener.wait_for("counters")
        detector.send([fmt.v1_header(1, "none", {})] + [v1_frame(1, k, b, shape) for k, b in enumerate(first)])

        def counters():
            listener.poll(0.2)
            return [b for t, b in listener.messages if t == "counters"][-1]

        wait_for(lambda: counters()["frames_received"] == len(first) and counters()["queued_bytes"] == 0,
                 what="the frames before the disk is freed")  # fmt: skip
        filler.unlink()
        detector.send([v1_frame(1, len(first) + k, b, shape) for k, b in enumerate(after)] + [fmt.v1_end(1)])
        # The first part closed when space returned, the second by its end message.
        wait_for(lambda: counters()["series_ended"] == 2, what="the end of the series")
        listener.poll(1.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        detector.close()
        listener.sock.close(linger=0)
    counters = json.loads(out.strip().splitlines()[-1]) if out.strip() and not cli else {"out": out}
    return process, counters, err, first, after, out_dir, listener


@pytest.mark.parametrize("check", ["check", "nocheck"])
def test_a_full_disk_loses_nothing_counted_written_and_writing_resumes(small_disk, check):
    process, c, err, first, after, _, listener = run_full_disk(small_disk, check)
    assert process.returncode == 0, err  # no crash at the stop after a disk error
    sent = len(first) + len(after)
    assert c["frames_received"] == sent and c["frames_written"] + c["frames_not_written"] == sent, c
    assert c["frames_not_written"] > 0, c  # the disk did fill
    written = published(listener, "series_written")
    assert [w["series_name"] for w in written] == ["series_000001", "series_000001_r2"], written
    part1, part2 = written
    # Everything counted as written is on disk, byte for byte, in the order sent.
    on_disk = chunks(Path(part1["master_file"]))
    assert on_disk == first[: part1["frames_written"]]
    assert part1["frames_written"] + part1["not_written"] == len(first) and part1["not_written"] > 0
    assert part1["write_error"]
    # Writing resumed under a new name once there was room again.
    assert chunks(Path(part2["master_file"])) == after and part2["not_written"] == 0
    assert c["frames_written"] == part1["frames_written"] + part2["frames_written"]
    # Reported once per series, on one line each; never a multi-line HDF5 error stack.
    lines = [line for line in err.splitlines() if "series_000001)" in line]
    assert len([line for line in lines if "not written" in line]) == 1, err
    assert "HDF5-DIAG" not in err and "#000" not in err, err
    assert err.count("\n") < 20, err
    if check == "check":
        assert c["disk_full"] == 1 and c["write_errors"] == 0, c
        assert part1["write_error"].startswith("disk full")
    else:
        # A write refused for want of space is a full disk too, handled: not a write error.
        assert c["disk_full"] >= 1 and c["write_errors"] == 0, c
        assert "No space left" in part1["write_error"] or "errno" in part1["write_error"]


@pytest.mark.parametrize("check", ["check", "nocheck"])
def test_intxr_splitter_exits_0_after_a_full_disk_it_handled(small_disk, check):
    process, c, err, *_, out_dir, _ = run_full_disk(small_disk, check, cli=True)
    assert process.returncode == 0, err
    assert c["out"].split() == [str(out_dir / "series_000001_master.h5"), str(out_dir / "series_000001_r2_master.h5")]
    assert "of 42 frames written in 2 series" in err and "0 write errors" in err and "disk full 1 time" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Garbage on the readers' port


def raw_tcp_noise(endpoint: str, rng) -> None:
    """Random bytes over plain TCP. libzmq reads bytes that do not open with ZMTP's greeting as
    ZMTP 1.0 frames, so some of this noise arrives as messages (bad requests too)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    for n in (1, 10, 4000, 4000):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(rng.bytes(n))
            time.sleep(0.1)


def garbage_on_the_readers_port(endpoint: str, rng) -> dict:
    """ZeroMQ messages of many shapes that are not a reader's request; returns what came back."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    shapes = [
        [b""],                                                   # empty
        [b"hello"],                                              # one part, no delimiter
        [b"", b"a", b"b", b"c", b"d"],                           # many parts
        [b"", b"{" * 200_000],                                   # a big one (under the port's limit)
        *([rng.bytes(int(n))] for n in rng.integers(1, 300, 10)),  # random bytes
        [b"", rng.bytes(64)],                                    # REQ-shaped random bytes
        [b"", b"[1, 2, 3]"],                                     # JSON, not an object
        [b"", b'{"htype": "not-a-request"}'],
    ]
    for parts in shapes:
        dealer.send_multipart(parts)
    # REQ sockets asking with a wrong version and the pre-protocol request (valid-looking, wrong).
    reqs = []
    for body in ({"htype": "intxr-request-2.0", "pid": 1}, {"host": "old-reader", "pid": 2}):
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(endpoint)
        req.send(json.dumps(body).encode())
        reqs.append(req)
    # Over the port's message limit: libzmq drops this peer; nothing is counted, nothing served.
    huge = ctx.socket(zmq.DEALER)
    huge.setsockopt(zmq.LINGER, 0)
    huge.connect(endpoint)
    huge.send_multipart([b"", b"x" * (3 << 20)])
    replies = {"dealer": [], "req": [], "huge": []}
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for key, socks in (("dealer", [dealer]), ("req", reqs), ("huge", [huge])):
            for sock in socks:
                if sock.poll(20):
                    replies[key].append(sock.recv_multipart())
    for sock in (dealer, huge, *reqs):
        sock.close()
    # Counted: all DEALER messages and both REQ requests (the huge one never arrives).
    return {"counted": len(shapes) + len(reqs), "replies": replies}


def test_garbage_on_the_readers_port_gets_no_frame_and_the_reader_gets_every_frame(tmp_path, capfd):
    """A real reader (FrameSource) takes frames while garbage of many shapes arrives on the same
    ROUTER in the middle of a series: no frame goes to garbage, the reader gets every one."""
    sent = blobs(60)
    detector = Detector()
    serve, publish = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    got: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def reader() -> None:
        with FrameSource(serve, timeout=10) as source:
            while not stop.is_set():
                frame = source.next_frame(wait=0.2)
                if frame is not None:
                    got.append((frame.frame, bytes(frame.blob)))
            reader_counters.append(source.counters)

    reader_counters: list = []
    with Splitter(detector.endpoint, tmp_path, max_series=1, series_timeout=30, serve=serve,
                  publish=publish, skip_after=10) as splitter:
        listener = Listener(publish)
        listener.wait_for("counters")
        thread = threading.Thread(target=reader)
        thread.start()
        detector.send([fmt.v1_header(1, "none", {})] + [v1_frame(1, k, b) for k, b in enumerate(sent[:20])])
        wait_for(lambda: len(got) >= 10, what="the reader's first frames")
        rng = np.random.default_rng(7)
        raw_tcp_noise(serve, rng)
        time.sleep(0.3)
        from_noise = splitter.counters()["bad_requests"]
        garbage = garbage_on_the_readers_port(serve, rng)
        detector.send([v1_frame(1, k, b) for k, b in enumerate(sent[20:], start=20)] + [fmt.v1_end(1)])
        assert splitter.join(30)
        stop.set()
        thread.join(10)
        listener.poll(1.2)
    detector.close()
    counters = splitter.counters()
    assert sorted(got) == list(enumerate(sent)), "the reader gets every frame, byte for byte"
    assert counters["frames_forwarded"] == len(got) == 60 and counters["frames_skipped"] == 0
    assert counters["bad_requests"] == from_noise + garbage["counted"]
    # Every request the reader made (its last one may still have been on its way at the end).
    assert reader_counters[0].requests - 1 <= counters["requests"] <= reader_counters[0].requests
    replies = garbage["replies"]
    assert not any(b"intxr-frame-1.0" in part for reply in replies.values() for r in reply for part in r)
    # REQ-shaped garbage learns why; the rest gets nothing.
    errors = [json.loads(r[-1]) for r in replies["dealer"] + replies["req"]]
    assert {e["htype"] for e in errors} == {"intxr-error-1.0"}
    assert len(replies["req"]) == 2 and not replies["huge"]
    why = sorted(e["error"] for e in errors)
    assert any("intxr-request-2.0" in w for w in why) and any("no htype" in w for w in why)
    (end,) = published(listener, "series_end")
    assert end["forwarded"] == 60 and end["forwarded_ranges"] == [[0, 59]] and end["skipped"] == 0
    assert chunks(tmp_path / "series_000001_master.h5") == sent
    # One line per bad request, rate-limited: the first few, then a count.
    lines = [line for line in capfd.readouterr().err.splitlines() if "bad request" in line]
    assert 1 <= len(lines) <= 3, lines
    assert all("bad request on the readers' port from " in line and "no frame sent" in line for line in lines)
