"""Faults of the simulated detector: it never crashes and never loses a frame it says it sent.

The crash this guards against: `intxr simulate` handed libzmq zero-copy buffers and exited while
they were still queued for a slow consumer, so the process aborted (`Bad address`) or segfaulted
after "sent 9 frames" and the consumer got 3-7 frames and no series end. Every run here is the
real CLI in its own process, exiting while a deliberately slow consumer still has frames to take.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from intxr.simulate import Simulator, SimulatorSettings
from intxr.stream import FrameMessage, SeriesEnd, StreamParser, parse_message
from intxr.testing import free_ports

EXE = Path(sys.executable).parent
_expected_cache: dict = {}


def expected_blobs(sources: list[str], protocol: str, encoding: str, n: int) -> list[bytes]:
    """The compressed bytes the simulator sends for frames 0..n-1 (v2's lz4 has its own framing)."""
    key = (tuple(sources), protocol == "v2", encoding, n)
    if key not in _expected_cache:
        sim = Simulator(sources, SimulatorSettings(protocol=protocol, encoding=encoding, frames=n))
        _expected_cache[key] = [bytes(sim.prepared(k).blob) for k in range(n)]
    return _expected_cache[key]


def slow_receive(endpoint: str, n_series: int, timeout_s: float = 60, slow_for: int = 6,
                 hold: subprocess.Popen | None = None) -> list[list]:
    """Every event of `n_series` series, taken slowly at first (a tiny queue and a pause per message)
    so that the sender is still holding queued frames when it reaches its end. With `hold`, stay
    connected until that sender has exited, as the Splitter does: a consumer that leaves the moment
    it has the series end can race the sender's bookkeeping of its last frames (counted lost)."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    series, events, taken = [], [], 0
    parser = StreamParser()
    deadline = time.monotonic() + timeout_s
    try:
        while len(series) < n_series:
            assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"silent after {taken} messages"
            parts = sock.recv_multipart()
            taken += 1
            if taken <= slow_for:
                time.sleep(0.1)
            events += parser.parse(parts)
            if isinstance(events[-1], SeriesEnd):
                series.append(events)
                events = []
        if hold is not None:
            hold.wait(timeout_s)
        return series
    finally:
        sock.close()


def run_cli(sources, protocol, encoding, rate, frames, n_series=1) -> tuple[subprocess.CompletedProcess, list]:
    [port] = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(EXE / "intxr"), "simulate", "--protocol", protocol, "--encoding", encoding, "--rate", str(rate),
         "--frames", str(frames), "--series", str(n_series), "--endpoint", endpoint, *sources],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        received = slow_receive(endpoint, n_series, hold=process)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), received


def check_run(sources, protocol, encoding, rate, frames, n_series=1) -> None:
    done, received = run_cli(sources, protocol, encoding, rate, frames, n_series)
    where = f"{protocol} {encoding} rate {rate}"
    assert done.returncode == 0, f"{where}: exit {done.returncode}: {done.stderr}"
    assert "Traceback" not in done.stderr and "Bad address" not in done.stderr, done.stderr
    assert f"sent {frames * n_series} frames in {n_series} series" in done.stderr, done.stderr
    assert "dropped" not in done.stderr, done.stderr
    blobs = expected_blobs(sources, protocol, encoding, frames)
    first = 1 if protocol == "cbftoeiger" else 0
    for events in received:
        images = [e for e in events if isinstance(e, FrameMessage)]
        assert [e.frame for e in images] == list(range(first, first + frames)), where
        for k, image in enumerate(images):
            assert bytes(image.blob) == blobs[k], f"{where}: frame {k} differs from what was sent"
        assert isinstance(events[-1], SeriesEnd)
    assert [events[-1].series for events in received] == list(range(1, n_series + 1))


def test_the_reported_crash_never_happens_again(thaumatin_cbfs):
    """The issue's own command, four times: it failed 4 of 4 runs before."""
    for _ in range(4):
        check_run(thaumatin_cbfs[:3], "v1", "bs32-lz4", 30, 9)


@pytest.mark.parametrize("protocol", ["v1", "v2", "cbftoeiger"])
def test_every_frame_of_every_protocol_encoding_and_rate_arrives_byte_identical(thaumatin_cbfs, protocol):
    sources = thaumatin_cbfs[:3]
    for encoding, rate in itertools.product(("bs32-lz4", "lz4"), (0, 30)):
        # As fast as possible, cbfToEiger's 48 frames and several series: the queue is deepest.
        frames, n_series = (48, 1) if (protocol == "cbftoeiger" and rate == 0) else (9, 2 if rate == 0 else 1)
        check_run(sources, protocol, encoding, rate, frames, n_series)


def test_narrow_pixel_encodings(tmp_path):
    for protocol, encoding in (("v1", "bs16-lz4"), ("v2", "bs8-lz4"), ("cbftoeiger", "bs16-lz4")):
        check_run(["synthetic:1028x1062:4"], protocol, encoding, 0, 12)


def _consumer(endpoint: str, take: int) -> zmq.Socket:
    """A consumer that takes `take` messages, then stops reading (its queues and buffers small)."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 32 * 1024)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for _ in range(take):
        assert sock.poll(30_000)
        sock.recv_multipart()
    return sock


def test_simulate_drain_timeout_bounds_the_wait_for_a_stuck_consumer(thaumatin_cbfs):
    [port] = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen([str(EXE / "intxr"), "simulate", "--endpoint", endpoint, "--rate", "0", "--frames", "9",
                                "--drain-timeout", "1.5", *thaumatin_cbfs[:3]], stderr=subprocess.PIPE, text=True)
    consumer = _consumer(endpoint, 2)  # the header and frame 0, then nothing
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        consumer.close()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert "at most 1.5 s without progress" in err and "within 1.5 s" in err, err


def test_frames_a_stuck_consumer_never_takes_are_reported_dropped_not_sent(thaumatin_cbfs):
    [port] = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    log = io.StringIO()
    sim = Simulator(thaumatin_cbfs[:3], SimulatorSettings(endpoint=endpoint, rate=0, frames=9), log=log,
                    drain_timeout=1.0)
    report = {}
    thread = threading.Thread(target=lambda: report.update(sim.run()), daemon=True)
    thread.start()
    assert sim.ready.wait(30)
    consumer = _consumer(endpoint, 2)  # the header and frame 0, then nothing
    try:
        thread.join(60)
        assert not thread.is_alive(), "the simulator did not give up on a consumer that stopped reading"
        assert report["dropped_frames"] > 0 and report["frames"] + report["dropped_frames"] == 9
        assert report["dropped_messages"] == report["dropped_frames"] + 1  # and the series end
        text = log.getvalue()
        assert f"sent {report['frames']} frames" in text
        assert f"dropped {report['dropped_frames']} frames and 1 header/end messages" in text
        # What the consumer can still read is what was said to have left (the last of it may be cut
        # off in libzmq's write buffer when the socket closes).
        got = 1  # frame 0
        while consumer.poll(1000):
            got += any(isinstance(e, FrameMessage) for e in parse_message(consumer.recv_multipart()))
        assert report["frames"] - 1 <= got <= report["frames"]
    finally:
        consumer.close()


def test_frames_queued_to_a_consumer_that_disconnects_are_counted_lost_not_sent(thaumatin_cbfs):
    [port] = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    log = io.StringIO()
    sim = Simulator(thaumatin_cbfs[:3], SimulatorSettings(endpoint=endpoint, rate=0, frames=9), log=log,
                    drain_timeout=30.0)
    report = {}
    thread = threading.Thread(target=lambda: report.update(sim.run()), daemon=True)
    thread.start()
    assert sim.ready.wait(30)
    consumer = _consumer(endpoint, 2)
    deadline = time.monotonic() + 30
    while sim.messages_queued < 11 and time.monotonic() < deadline:
        time.sleep(0.01)
    consumer.close()  # leaves with the rest of the series queued to it
    thread.join(20)  # not the drain timeout: nobody is left to take them
    assert not thread.is_alive()
    assert report["lost_frames"] > 0 and report["frames"] + report["lost_frames"] == 9
    assert f"disconnected with {report['lost_frames'] + 1} messages ({report['lost_frames']} frames) queued to it: " \
           "lost" in log.getvalue()


def test_a_consumer_that_disconnects_and_the_next_one_gets_the_rest(thaumatin_cbfs):
    [port] = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    log = io.StringIO()
    sim = Simulator(thaumatin_cbfs[:3], SimulatorSettings(endpoint=endpoint, rate=5, frames=9), log=log)
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    assert sim.ready.wait(30)
    first = _consumer(endpoint, 2)  # the header and frame 0, taken as they come
    time.sleep(0.1)
    first.close()
    time.sleep(0.5)  # the simulator waits for a consumer meanwhile
    [events] = slow_receive(endpoint, 1, slow_for=0)
    thread.join(30)
    assert not thread.is_alive()
    frames = [e.frame for e in events if isinstance(e, FrameMessage)]
    assert frames == list(range(1, 9)) and isinstance(events[-1], SeriesEnd)
    assert sim.frames_sent == 9 and sim.frames_lost == 0 and sim.disconnects == 1


def test_ctrl_c_still_lets_queued_frames_out_and_exits_130(thaumatin_cbfs):
    """SIGINT while frames are queued: they still leave (bounded), one line, no traceback."""
    import signal

    [port] = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(EXE / "intxr"), "simulate", "--rate", "0", "--loop", "--endpoint", endpoint, *thaumatin_cbfs[:2]],
        stderr=subprocess.PIPE, text=True,
        # As from a terminal: a job a shell started in the background (a CI runner's) inherits
        # SIGINT ignored, and Python keeps an inherited SIG_IGN, so Ctrl-C would never arrive.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        frames = 0
        while frames < 5:
            assert sock.poll(30_000)
            frames += any(isinstance(e, FrameMessage) for e in parse_message(sock.recv_multipart()))
        process.send_signal(signal.SIGINT)
        while sock.poll(2000):  # keep taking: what was queued arrives
            frames += any(isinstance(e, FrameMessage) for e in parse_message(sock.recv_multipart()))
        err = process.communicate(timeout=30)[1]
        # A loaded machine can pause the sender past the 2 s above: what it sent before exiting
        # is in our socket's queue now.
        while sock.poll(500):
            frames += any(isinstance(e, FrameMessage) for e in parse_message(sock.recv_multipart()))
    finally:
        if process.poll() is None:
            process.kill()
        sock.close()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    sent = int(err.split("sent ")[1].split(" frames")[0])
    assert sent == frames


def test_trackers_of_every_message_released_so_far_are_marked_before_a_disconnect_is_judged():
    """The CI failure this guards against: a consumer took every message and left, and the
    simulator called the last ones lost, because pyzmq marks a tracker done later, from its own
    garbage-collector thread. `_wait_for_released_trackers` waits for that thread to catch up."""
    from intxr.simulate import _wait_for_released_trackers

    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.bind("inproc://released")
    pull.connect("inproc://released")
    try:
        for _ in range(50):
            trackers = [push.send(b"x" * 100_000, copy=False, track=True) for _ in range(20)]
            for _ in trackers:
                pull.recv()  # libzmq has now freed each one; its tracker may not say so yet
            _wait_for_released_trackers()
            assert all(t.done for t in trackers)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
