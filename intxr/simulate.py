"""The simulated detector: replays frames from image files (or synthetic ones) as a DECTRIS detector
streams them, on a bound ZeroMQ PUSH socket (DECTRIS's convention: the detector binds, consumers
connect).

`intxr simulate` runs `Simulator.run()`; tests start it in a thread.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from intxr import stream_format as fmt
from intxr.codec import encode, v1_encoding
from intxr.geometry import Geometry
from intxr.images import ImageSource, open_source

PROTOCOLS = ("v1", "v2", "cbftoeiger")
ENCODINGS = ("bs32-lz4", "bs16-lz4", "bs8-lz4", "lz4")
HEADER_DETAILS = ("none", "basic", "all")


def _wait_for_released_trackers(timeout: float = 2.0) -> None:
    """Wait (bounded) until pyzmq has marked done every message libzmq released before now.
    libzmq frees a zero-copy message in its own thread; pyzmq passes each free, in order, through
    one inproc queue to one garbage-collector thread, which sets the trackers
    (zmq/utils/garbage.py). A message of ours freed now is marked after all of them."""
    probe = zmq.Frame(b"\0", copy=False, track=True)
    tracker = probe.tracker
    del probe  # closing it frees it: its note joins the queue behind every earlier one
    try:
        tracker.wait(timeout)
    except zmq.NotDone:
        pass


@dataclass
class SimulatorSettings:
    protocol: str = "v1"
    encoding: str = "bs32-lz4"
    header_detail: str = "basic"
    endpoint: str = "tcp://127.0.0.1:9999"
    rate: float = 10.0  # frames per second; 0 sends as fast as the socket takes them
    frames: int | None = None  # frames per series; None: every frame of the sources once
    series: int = 1  # number of series
    loop: bool = False  # start a new series after each one, until stopped
    keys: dict[str, str] = field(default_factory=dict)  # custom header keys (mapping, master_file, ...)
    first_series: int = 1

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r}: expected one of {', '.join(ENCODINGS)}")
        if self.header_detail not in HEADER_DETAILS:
            raise ValueError(f"header detail {self.header_detail!r}: expected one of {', '.join(HEADER_DETAILS)}")
        if self.rate < 0 or (self.frames is not None and self.frames < 1) or self.series < 1:
            raise ValueError("rate must be >= 0, frames and series >= 1")


@dataclass
class PreparedFrame:
    """A frame converted to the detector's pixel type and compressed once, reused on every cycle."""

    blob: bytes
    dtype: np.dtype
    shape: tuple[int, int]
    geometry: Geometry
    source: str
    pixel_mask: np.ndarray | None


def pixels_for(frame: np.ndarray, encoding: str) -> np.ndarray:
    """Convert a frame to the unsigned pixel type the encoding carries. Marked pixels keep their meaning:
    negative values (PILATUS gaps -1, bad pixels -2) and the source's top values become 2^bits-1 / 2^bits-2;
    real counts are clipped below them."""
    bits = {"bs32-lz4": 32, "bs16-lz4": 16, "bs8-lz4": 8}.get(encoding)
    src = np.asarray(frame)
    if bits is None:  # lz4: keep the source width, unsigned
        bits = max(8, src.dtype.itemsize * 8)
    dtype = np.dtype(f"uint{bits}")
    top = np.iinfo(dtype).max
    if src.dtype.kind == "i":
        gap, bad = src == -1, src == -2
    elif src.dtype.kind == "u":
        src_top = np.iinfo(src.dtype).max
        gap, bad = src == src_top, src == src_top - 1
    else:
        gap = bad = np.zeros(src.shape, dtype=bool)
    out = np.clip(src, 0, top - 2).astype(dtype)
    out[gap] = top
    out[bad] = top - 1
    return out


class Simulator:
    """Streams frames from `sources` per `settings`. `stop()` ends it from another thread."""

    def __init__(self, sources: list[str], settings: SimulatorSettings, log=sys.stderr, drain_timeout: float = 10.0):
        settings.validate()
        if not sources:
            raise ValueError("no image source given")
        self.settings = settings
        # A file named twice is opened (and its frames prepared) once.
        unique = list(dict.fromkeys(sources))
        self.sources: list[ImageSource] = [open_source(s) for s in unique]
        self.plan = [
            (si, i) for si in (unique.index(name) for name in sources) for i in range(len(self.sources[si]))
        ]
        self._prepared: dict[tuple[int, int], PreparedFrame] = {}
        self._stop = threading.Event()
        self.log = log
        self.frames_sent = 0  # frames that left (libzmq released them), not merely queued
        self.bytes_sent = 0
        self.series_sent = 0
        self.frames_dropped = 0  # queued frames no consumer took before the drain gave up
        self.messages_queued = 0  # handed to libzmq; sent once it has released them
        self.frames_lost = 0  # queued frames a consumer took along when it disconnected
        self.disconnects = 0
        self.consumers = 0
        self._monitor: zmq.Socket | None = None
        self.drain_timeout = drain_timeout
        self._finished = threading.Event()
        self.bound_endpoint: str | None = None
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    # -- frames ----------------------------------------------------------------------------

    def prepared(self, k: int) -> PreparedFrame:
        key = self.plan[k % len(self.plan)]
        frame = self._prepared.get(key)
        if frame is None:
            image = self.sources[key[0]].read(key[1])
            pixels = pixels_for(image.data, self.settings.encoding)
            blob = encode(pixels, self._encoding_name(pixels.dtype))
            mask = (
                fmt.pixel_mask_of(pixels)
                if self.settings.header_detail == "all" or self.settings.protocol == "v2"
                else None
            )
            frame = PreparedFrame(blob, pixels.dtype, pixels.shape, image.geometry, image.source, mask)
            if len(self._prepared) < 256:  # bounded cache: a long file list is re-read instead
                self._prepared[key] = frame
        return frame

    def _algorithm(self) -> str:
        return "lz4" if self.settings.encoding == "lz4" else "bslz4"

    def _encoding_name(self, dtype) -> str:
        if self.settings.protocol == "v2":
            return self._algorithm()
        return v1_encoding(self._algorithm(), dtype)

    def frames_per_series(self) -> int:
        return self.settings.frames if self.settings.frames is not None else len(self.plan)

    # -- messages ----------------------------------------------------------------------------

    def series_messages(self, series: int):
        """Yield (multipart message, is_image) for one series, in order."""
        s = self.settings
        n = self.frames_per_series()
        first = self.prepared(0)
        algorithm = self._algorithm()
        date = fmt.collection_date()
        config = fmt.detector_config(
            first.geometry, first.shape, first.dtype, nimages=n, algorithm=algorithm, date=date
        )
        exposure = first.geometry.count_time or 0.01
        frame_time = first.geometry.frame_time or exposure
        t0_ns = time.monotonic_ns()
        if s.protocol == "v1":
            yield fmt.v1_header(series, s.header_detail, config, first.pixel_mask, extra=s.keys), False
            for k in range(n):
                f = self.prepared(k)
                yield (
                    fmt.v1_image(
                        series,
                        k,
                        f.blob,
                        self._encoding_name(f.dtype),
                        f.shape,
                        f.dtype,
                        t0_ns + int(k * frame_time * 1e9),
                        int(exposure * 1e9),
                    ),
                    True,
                )
            yield fmt.v1_end(series), False
        elif s.protocol == "v2":
            unique = fmt._ulid()
            yield (
                [
                    fmt.v2_start(
                        series,
                        unique,
                        first.geometry,
                        first.shape,
                        first.dtype,
                        nimages=n,
                        channels=["threshold_1"],
                        pixel_mask=first.pixel_mask,
                        arm_date=date,
                        user_data=s.keys or None,
                    )
                ],
                False,
            )
            for k in range(n):
                f = self.prepared(k)
                data = {"threshold_1": fmt.v2_compressed_array(f.shape, f.dtype, f.blob, algorithm)}
                yield (
                    [
                        fmt.v2_image(
                            series, unique, k, data, series_date=date, start_s=k * frame_time, exposure_s=exposure
                        )
                    ],
                    True,
                )
            yield [fmt.v2_end(series, unique)], False
        else:  # cbftoeiger: no separate header message; both header parts ride on every frame
            config_part = fmt.dumps_cbftoeiger(fmt.cbftoeiger_config(config))
            keys = {"master_file": f"intxr_sim_{series:06d}_master.h5", **s.keys}
            for k in range(n):
                f = self.prepared(k)
                yield (
                    fmt.cbftoeiger_image(
                        series, k + 1, f.blob, self._encoding_name(f.dtype), f.shape, f.dtype, config_part, keys
                    ),
                    True,
                )
            yield fmt.cbftoeiger_end(series), False

    # -- sending ------------------------------------------------------------------------------

    def _send(self, socket: zmq.Socket, parts: list[bytes], pending: deque) -> zmq.MessageTracker | None:
        """Queue one message, waiting for a consumer without blocking `stop()`; its tracker, or None
        when stopped. The blob goes zero-copy: pyzmq keeps each buffer alive until libzmq releases
        it. The last part is tracked (and never copied): libzmq releases it only after every part
        before it, so its tracker says when the whole message has gone to the wire."""
        last = zmq.Frame(parts[-1], copy=False, track=True)
        said_at = time.monotonic()
        while not self._stop.is_set():
            # The monitor is read right before each call on the PUSH socket, and the wait is on the
            # monitor: libzmq reports a consumer gone before that socket's next call lets it free
            # the messages queued to that consumer, so those are still unreleased when _watch sees
            # the event, and counted lost, not sent.
            self._reap(pending)
            if socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
                self._watch(pending)
                socket.send_multipart([*parts[:-1], last], copy=False)
                return last.tracker
            self._monitor.poll(10)
            if time.monotonic() - said_at >= 5.0:
                print(f"simulate: waiting for a consumer on {self.bound_endpoint}", file=self.log, flush=True)
                said_at = time.monotonic()
        return None

    def _reap(self, pending: deque, everywhere: bool = False) -> int:
        """Follow consumers (_watch), then count the queued messages libzmq has released (sent)."""
        self._watch(pending)  # first: messages a leaving consumer took along are not sent
        return self._count_released(pending, everywhere)

    def _count_released(self, pending: deque, everywhere: bool) -> int:
        """Count the queued messages libzmq has released as sent; how many were. In order from the
        oldest (cheap, while sending), or every one (while draining: several consumers take
        messages round-robin, so they may complete out of order)."""
        done = 0
        if everywhere:
            left = deque()
            for entry in pending:
                if entry[0].done:
                    self._count_sent(entry)
                    done += 1
                else:
                    left.append(entry)
            pending.clear()
            pending.extend(left)
            return done
        while pending and pending[0][0].done:
            self._count_sent(pending.popleft())
            done += 1
        return done

    def _count_sent(self, entry) -> None:
        _, is_image, nbytes = entry
        self.frames_sent += is_image
        self.bytes_sent += nbytes

    def _drain(self, pending: deque) -> None:
        """Wait until every queued message has left, giving up after `drain_timeout` seconds in
        which none left (no consumer, or one that stopped taking them)."""
        said = False
        last_progress = time.monotonic()
        while True:
            if self._reap(pending, everywhere=True):
                last_progress = time.monotonic()
            if not pending:
                return
            waited = time.monotonic() - last_progress
            if waited >= self.drain_timeout:
                return
            if not said and waited >= 1.0:
                frames = sum(is_image for _, is_image, _ in pending)
                print(f"simulate: waiting for {len(pending)} queued messages ({frames} frames) to leave "
                      f"{self.bound_endpoint} (at most {self.drain_timeout:g} s without progress)",
                      file=self.log, flush=True)
                said = True
            try:
                pending[0][0].wait(0.05)
            except zmq.NotDone:
                pass

    def _watch(self, pending: deque) -> None:
        """Follow consumers connecting and leaving. One that leaves takes the messages queued to it
        along (libzmq releases them as if sent): when none is left, every queued message is lost,
        and counted so, not as sent; with others still there, which ones is unknown: said."""
        monitor = self._monitor
        while monitor is not None and monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_ACCEPTED:
                self.consumers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                self.consumers = max(0, self.consumers - 1)
                if not pending:
                    continue
                if self.consumers == 0:
                    # What it had taken before leaving was released before libzmq said so, but
                    # pyzmq marks trackers later, from its own thread: let it catch up first.
                    _wait_for_released_trackers()
                    self._count_released(pending, everywhere=True)
                    if not pending:
                        continue
                    frames = sum(is_image for _, is_image, _ in pending)
                    self.frames_lost += frames
                    print(f"simulate: the consumer of {self.bound_endpoint} disconnected with {len(pending)} "
                          f"messages ({frames} frames) queued to it: lost", file=self.log, flush=True)
                    pending.clear()
                else:
                    print(f"simulate: a consumer of {self.bound_endpoint} disconnected with messages queued: "
                          f"those queued to it (up to {len(pending)}) are lost", file=self.log, flush=True)

    def _wait_at_exit(self) -> None:
        # A run still going when the interpreter exits (a daemon thread) would leave libzmq sending
        # from buffers Python is freeing: stop it and let it drain and close first.
        self._stop.set()
        self._finished.wait(self.drain_timeout + 5)

    def run(self, context: zmq.Context | None = None) -> dict:
        s = self.settings
        # Our own context, terminated before returning, so that libzmq holds no buffer of ours
        # once run() has returned; a caller's context is left to the caller.
        own = context is None
        context = zmq.Context() if own else context
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 1000)
        socket.setsockopt(zmq.LINGER, 0)  # queued messages are waited for in _drain, with a bound
        pending: deque = deque()  # (tracker, is_image, bytes) of messages not yet released by libzmq
        monitor = None
        elapsed = 0.0
        interrupted = False
        self._finished.clear()
        atexit.register(self._wait_at_exit)
        try:
            socket.bind(s.endpoint)
            self.bound_endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            monitor = self._monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self.ready.set()
            print(
                f"simulate: {s.protocol} {s.encoding} on {self.bound_endpoint}, "
                f"{self.frames_per_series()} frames per series from {len(self.plan)} source frames",
                file=self.log,
                flush=True,
            )
            if len(set(self.plan)) <= 256:
                # As a detector does: every frame compressed before the first send, so that sending
                # (and counting what left, every 20 ms) is never held up by compressing.
                for k in range(len(self.plan)):
                    self.prepared(k)
            started = time.monotonic()
            try:
                self._stream(socket, pending)
            except KeyboardInterrupt:  # Ctrl-C: what is queued still goes out (bounded), then stop
                interrupted = True
            try:
                self._drain(pending)
            except KeyboardInterrupt:  # a second Ctrl-C: drop what is left
                interrupted = True
            elapsed = time.monotonic() - started
        finally:
            self.ready.set()
            if monitor is not None:
                self._monitor = None
                socket.disable_monitor()
                monitor.close(linger=0)
            # Drained: libzmq may still hold the last small messages in its write buffer; a
            # bounded linger lets them out. Not drained: what is left is dropped now.
            if not pending:
                time.sleep(0.05)
            socket.close(linger=0 if pending else int(min(self.drain_timeout, 2.0) * 1000))
            if own:
                context.term()  # returns once libzmq has let go of every buffer
            atexit.unregister(self._wait_at_exit)
            self._finished.set()
        self.frames_dropped = sum(is_image for _, is_image, _ in pending)
        report = {
            "series": self.series_sent,
            "frames": self.frames_sent,
            "bytes": self.bytes_sent,
            "seconds": round(elapsed, 3),
            "frames_per_second": round(self.frames_sent / elapsed, 1) if elapsed > 0 else None,
            "dropped_messages": len(pending),
            "dropped_frames": self.frames_dropped,
            "lost_frames": self.frames_lost,
            "disconnects": self.disconnects,
        }
        print(
            f"simulate: sent {report['frames']} frames in {report['series']} series, "
            f"{report['bytes'] / 1e6:.1f} MB in {report['seconds']:.2f} s",
            file=self.log,
            flush=True,
        )
        if pending:
            ends = len(pending) - self.frames_dropped
            print(
                f"simulate: dropped {self.frames_dropped} frames"
                + (f" and {ends} header/end messages" if ends else "")
                + f" that no consumer took from {self.bound_endpoint} within {self.drain_timeout:g} s",
                file=self.log,
                flush=True,
            )
        if interrupted:
            raise KeyboardInterrupt
        return report

    def _stream(self, socket: zmq.Socket, pending: deque) -> None:
        s = self.settings
        series = s.first_series
        period = 1.0 / s.rate if s.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            for parts, is_image in self.series_messages(series):
                if is_image and period:
                    next_at += period
                    delay = next_at - time.monotonic()
                    while delay > 0 and not self._stop.is_set():
                        # Count what left meanwhile: a consumer leaving later must not take it along.
                        self._stop.wait(min(delay, 0.02))
                        self._reap(pending)
                        delay = next_at - time.monotonic()
                tracker = self._send(socket, parts, pending)
                if tracker is None:
                    break
                pending.append((tracker, is_image, sum(len(p) for p in parts)))
                self.messages_queued += 1
                self._reap(pending)
            else:
                self.series_sent += 1
            series += 1
            if not s.loop and self.series_sent >= s.series:
                break
