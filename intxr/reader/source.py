"""A reader's first stage: ask the Splitter for a frame and receive it without copying the blob.

A request is a JSON object with htype `intxr-request-1.0` (plus who asks: host, pid, rank); the
Splitter's port is open to anyone and gives frames only to such requests (anything else gets an
`intxr-error-1.0` reply naming what was wrong, or nothing). It answers a request with
[frame meta JSON, series JSON, blob] or, when it has had nothing to give for a while, [idle JSON].
A reader never blocks forever on a silent Splitter (the original's readers did): after `timeout`
seconds without any reply it closes its socket, opens a new one and asks again (the Lazy Pirate
pattern, ZeroMQ guide ch. 4), counting it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import zmq

from intxr.codec import DecodeError, decode_into

FRAME_HTYPE = "intxr-frame-1.0"
MAX_PIXELS = 1 << 28  # a frame larger than any detector's (EIGER2 16M is 2^24) is not believed
DTYPES = {"uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "<u1", "<u2", "<u4", "<i4", "<f4"}
SERIES_HTYPE = "intxr-series-1.0"
IDLE_HTYPE = "intxr-idle-1.0"
REQUEST_HTYPE = "intxr-request-1.0"
ERROR_HTYPE = "intxr-error-1.0"


class BadFrame(ValueError):
    """A frame meta the reader cannot use; the message names the field."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(meta) -> None:
    """The frame meta is untrusted too: series and frame numbers, shape, type and encoding must
    be what a frame can have before anything is allocated or decoded from them."""
    if not isinstance(meta, dict):
        raise BadFrame(f"frame meta is a JSON {type(meta).__name__}, not an object")
    for key in ("series", "frame"):
        if not _is_int(meta.get(key)):
            raise BadFrame(f"frame meta {key!r} is {meta.get(key)!r:.40}, not an integer")
    name = meta.get("series_name")
    if name is not None and not isinstance(name, str):
        raise BadFrame(f"frame meta 'series_name' is {name!r:.40}, not text")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
        raise BadFrame(f"frame meta 'shape' is {shape!r:.40}, not [rows, columns]")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise BadFrame(f"frame meta 'shape' {shape} is larger than any detector's")
    if meta.get("type") not in DTYPES:
        raise BadFrame(f"frame meta 'type' is {meta.get('type')!r:.40}, not a pixel type")
    if not isinstance(meta.get("encoding"), str):
        raise BadFrame(f"frame meta 'encoding' is {meta.get('encoding')!r:.40}, not text")
    if meta.get("header") is not None and not isinstance(meta["header"], dict):
        raise BadFrame(f"frame meta 'header' is {meta['header']!r:.40}, not an object")


@dataclass
class ServedFrame:
    """One frame as the Splitter served it; `blob` is a read-only view of the ZeroMQ message.
    `error` is set when its meta could not be used: the reader then reports the frame failed."""

    meta: dict
    series_info: dict
    blob: memoryview
    received: float  # when this reader had it (Unix time)
    error: str | None = None
    # Set by the reader before `pixels`: (trusted range, factor, mask, arrays) to bin the frame for the
    # pre-screen in the decoder's pass; `pixels` leaves the binned frame (sums, valid) in `binned`.
    binning: tuple | None = None
    binned: tuple | None = None

    @property
    def series_name(self) -> str | None:
        """The Splitter's name of the series (None from one that gives none: keyed by number)."""
        name = self.meta.get("series_name")
        return name if isinstance(name, str) else None

    @property
    def series(self) -> int:
        return int(self.meta["series"])

    @property
    def frame(self) -> int:
        return int(self.meta["frame"])

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.meta["shape"]
        return int(rows), int(cols)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["type"])

    def header(self, key: str):
        """A header value as the detector sent it: per-frame keys first (cbfToEiger resends
        mapping, reporting, master_file with each frame), then the series header and config."""
        for source in (self.meta.get("header"), self.series_info.get("header"), self.series_info.get("config")):
            if isinstance(source, dict) and key in source:
                return source[key]
        return None

    def pixels(self, out: np.ndarray | None = None) -> np.ndarray:
        """Decode the blob (Rust, GIL released) into `out` or a new array."""
        if out is None or out.shape != self.shape or out.dtype != self.dtype:
            out = np.empty(self.shape, self.dtype)
        # A zeroed bitshuffle header (libertem-dectris) was already repaired by the Splitter.
        self.binned = None
        if self.binning is not None:
            from intxr.reader.prescreen import decode_and_bin

            trusted, factor, mask, bins = self.binning
            image, self.binned = decode_and_bin(self.blob, self.meta["encoding"], out, trusted, factor, mask, bins)
            return image
        return decode_into(self.blob, self.meta["encoding"], out)


@dataclass
class SourceCounters:
    requests: int = 0
    frames: int = 0
    idle_replies: int = 0
    reconnects: int = 0
    bad_replies: int = 0
    last_error: str = ""


class FrameSource:
    """Frames from the Splitter, one request at a time.

    source = FrameSource("tcp://127.0.0.1:5600", timeout=10)
    frame = source.next_frame()   # ServedFrame, or None after an idle reply or a reconnect
    """

    def __init__(self, endpoint: str, *, timeout: float = 10.0, identity: dict | None = None,
                 context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.context = context or zmq.Context.instance()
        self.counters = SourceCounters()
        who = identity or {"host": socket.gethostname(), "pid": os.getpid()}
        self._request = json.dumps({**who, "htype": REQUEST_HTYPE}).encode()
        self._socket: zmq.Socket | None = None
        self._asked = False
        # The series JSON is the same bytes for every frame of a series: parse it once.
        self._series_bytes = b""
        self._series_info: dict = {}

    def _open(self) -> zmq.Socket:
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def _reconnect(self, why: str) -> None:
        self.counters.reconnects += 1
        self.counters.last_error = f"{self.endpoint}: {why}; reconnecting"
        self.close()

    def next_frame(self, wait: float | None = None) -> ServedFrame | None:
        """Ask for a frame and wait up to `wait` seconds (default: the timeout) for the reply.

        None: the Splitter had nothing (idle reply), or `wait` passed (the request stays open and
        the next call waits for its reply), or it was silent for `timeout` (the socket is renewed).
        """
        if self._socket is None:
            self._socket = self._open()
            self._asked = False
            self._asked_at = time.monotonic()
        if not self._asked:
            self._socket.send(self._request)
            self._asked = True
            self._asked_at = time.monotonic()
            self.counters.requests += 1
        wait = self.timeout if wait is None else min(wait, self.timeout)
        if not self._socket.poll(int(wait * 1000), zmq.POLLIN):
            if time.monotonic() - self._asked_at >= self.timeout:
                self._reconnect(f"no reply in {self.timeout:g} s")
            return None
        parts = self._socket.recv_multipart(copy=False)
        received = time.time()
        self._asked = False
        try:
            meta = json.loads(parts[0].bytes)
            htype = meta.get("htype")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            return self._bad(f"reply is not a JSON object: {exc}")
        if htype == IDLE_HTYPE:
            self.counters.idle_replies += 1
            return None
        if htype == ERROR_HTYPE:
            # The Splitter refused the request (a version mismatch): say its words.
            return self._bad(f"the Splitter refused the request: {str(meta.get('error'))[:200]}")
        if htype != FRAME_HTYPE or len(parts) != 3:
            return self._bad(f"unexpected reply {htype!r:.40} with {len(parts)} parts")
        error = None
        try:
            check_meta(meta)
        except BadFrame as exc:
            if not (_is_int(meta.get("series")) and _is_int(meta.get("frame"))):
                return self._bad(str(exc))  # no frame to report a result for
            error = str(exc)
        series_bytes = parts[1].bytes
        if series_bytes != self._series_bytes:
            try:
                info = json.loads(series_bytes)
                if not isinstance(info, dict):
                    raise ValueError(f"a JSON {type(info).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as exc:
                info, error = {}, error or f"series JSON unreadable: {exc}"
            else:
                self._series_bytes, self._series_info = series_bytes, info
            series_info = info
        else:
            series_info = self._series_info
        if error is not None:
            self.counters.bad_replies += 1
            self.counters.last_error = f"{self.endpoint}: series {meta['series']} frame {meta['frame']}: {error}"
        self.counters.frames += 1
        # zmq.Frame.buffer: a memoryview of libzmq's message, no copy (pyzmq's copy=False).
        return ServedFrame(meta, series_info, parts[2].buffer.toreadonly(), received, error)

    def _bad(self, why: str) -> None:
        self.counters.bad_replies += 1
        self.counters.last_error = f"{self.endpoint}: {why}"
        return None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            self._asked = False

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DecodeError", "FrameSource", "ServedFrame", "SourceCounters"]
