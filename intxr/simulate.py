"""The simulated detector: replays frames from image files (or synthetic ones) as a DECTRIS detector
streams them, on a bound ZeroMQ PUSH socket (DECTRIS's convention: the detector binds, consumers
connect).

`intxr simulate` runs `Simulator.run()`; tests start it in a thread.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from intxr import stream_format as fmt
from intxr.codec import encode, v1_encoding
from intxr.images import ImageSource, open_source
from intxr.models import Geometry

PROTOCOLS = ("v1", "v2", "cbftoeiger")
ENCODINGS = ("bs32-lz4", "bs16-lz4", "bs8-lz4", "lz4")
HEADER_DETAILS = ("none", "basic", "all")


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

    def __init__(self, sources: list[str], settings: SimulatorSettings, log=sys.stderr):
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
        self.frames_sent = 0
        self.bytes_sent = 0
        self.series_sent = 0
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

    def _send(self, socket: zmq.Socket, parts: list[bytes]) -> bool:
        """Send one message, waiting for a consumer without blocking `stop()`. False when stopped."""
        waited = 0.0
        while not self._stop.is_set():
            if socket.poll(200, zmq.POLLOUT):
                socket.send_multipart(parts, copy=False)
                return True
            waited += 0.2
            if waited >= 5.0:
                print(f"simulate: waiting for a consumer on {self.bound_endpoint}", file=self.log, flush=True)
                waited = 0.0
        return False

    def run(self, context: zmq.Context | None = None) -> dict:
        s = self.settings
        context = context or zmq.Context.instance()
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 1000)
        socket.setsockopt(zmq.LINGER, 5000)  # give queued frames 5 s to leave after the last send
        try:
            socket.bind(s.endpoint)
            self.bound_endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            self.ready.set()
            print(
                f"simulate: {s.protocol} {s.encoding} on {self.bound_endpoint}, "
                f"{self.frames_per_series()} frames per series from {len(self.plan)} source frames",
                file=self.log,
                flush=True,
            )
            if s.rate == 0 and len(set(self.plan)) <= 256:
                # As fast as possible means as a detector does: compress every frame before the first send.
                for k in range(len(self.plan)):
                    self.prepared(k)
            started = time.monotonic()
            series = s.first_series
            period = 1.0 / s.rate if s.rate > 0 else 0.0
            next_at = time.monotonic()
            while not self._stop.is_set():
                for parts, is_image in self.series_messages(series):
                    if is_image and period:
                        next_at += period
                        delay = next_at - time.monotonic()
                        if delay > 0:
                            self._stop.wait(delay)
                    if not self._send(socket, parts):
                        break
                    if is_image:
                        self.frames_sent += 1
                    self.bytes_sent += sum(len(p) for p in parts)
                else:
                    self.series_sent += 1
                series += 1
                if not s.loop and self.series_sent >= s.series:
                    break
            elapsed = time.monotonic() - started
        finally:
            self.ready.set()
            socket.close()
        report = {
            "series": self.series_sent,
            "frames": self.frames_sent,
            "bytes": self.bytes_sent,
            "seconds": round(elapsed, 3),
            "frames_per_second": round(self.frames_sent / elapsed, 1) if elapsed > 0 else None,
        }
        print(
            f"simulate: sent {report['frames']} frames in {report['series']} series, "
            f"{report['bytes'] / 1e6:.1f} MB in {report['seconds']:.2f} s",
            file=self.log,
            flush=True,
        )
        return report
