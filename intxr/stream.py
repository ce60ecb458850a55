"""Read a detector stream (DECTRIS stream v1, v2, SSRL cbfToEiger-0.1) with the Splitter's own parser.

The rules live once, in Rust (`rust_splitter/src/stream/`, exposed as `intxr._splitter.StreamParser`);
this module only wraps its events in dataclasses. `StreamParser(protocol).parse(parts)` reads a stream
message by message as the Splitter does (with `auto`, the first message that parses fixes the protocol;
cbfToEiger's header, resent with every frame, starts its series once; a v1 config sent alone after its
`dheader` comes as a `SeriesConfig`). `parse_message(parts)` reads one message on its own.

Bad input raises `StreamError` (a ValueError) whose text names the part and what was wrong, e.g.
`part 1 (dimage_d): unsupported pixel type "float32" or shape [4, 4]`; `.part` is that part's index.
Frames are never copied: `FrameMessage.blob` is a memoryview of the part it came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from intxr import _splitter
from intxr._splitter import StreamError

__all__ = [
    "PROTOCOLS",
    "FrameMessage",
    "SeriesConfig",
    "SeriesEnd",
    "SeriesStart",
    "StreamError",
    "StreamParser",
    "detect_protocol",
    "parse_message",
]

PROTOCOLS = ("v1", "v2", "cbftoeiger")


@dataclass
class SeriesStart:
    protocol: str
    series: int
    header: dict  # dheader / cbfToEiger header part / v2 start message without its large arrays
    config: dict  # detector configuration (v1 config part; v2 start message; cbfToEiger config part)
    pixel_mask: np.ndarray | None = None  # rows x columns uint32 (DECTRIS bits), when the detector sent one


@dataclass
class SeriesConfig:
    """A v1 detector config that came as a message of its own after its series' `dheader`."""

    protocol: str
    series: int
    config: dict


@dataclass
class FrameMessage:
    protocol: str
    series: int
    frame: int  # as the detector numbers it (v1/v2 from 0, cbfToEiger from 1)
    shape: tuple[int, int]  # (rows, columns)
    dtype: np.dtype  # uint8, uint16 or uint32: as the Splitter writes and serves it
    encoding: str  # the stream's own name: v1 `bs32-lz4<`, `lz4<`; v2 `bslz4`, `lz4`, `none`
    blob: memoryview  # the still-compressed pixels, a view of the message part
    header: dict = field(default_factory=dict)  # v1: the dimage part; cbfToEiger: the header resent; v2: channels
    codec: str = "none"  # the name `intxr.codec` decodes it by
    md5_ok: bool | None = None  # v1 `hash` checked against the dimage_d part; None when there is none
    part: int = 0  # index of the part holding the blob

    def pixels(self, out: np.ndarray | None = None) -> np.ndarray:
        """The decoded frame (into `out` when given); `DecodeError` when the blob is bad."""
        from intxr.codec import decode_into

        if out is None:
            out = np.empty(self.shape, self.dtype)
        return decode_into(self.blob, self.codec, out)


@dataclass
class SeriesEnd:
    protocol: str
    series: int


def _event(d: dict):
    kind = d.pop("kind")
    if kind == "frame":
        d["dtype"] = np.dtype(d["dtype"])
        return FrameMessage(**d)
    if kind == "start":
        mask = d.pop("pixel_mask")
        if mask is not None:
            rows, cols, raw = mask
            mask = np.frombuffer(raw, "<u4").reshape(rows, cols)
        return SeriesStart(**d, pixel_mask=mask)
    if kind == "end":
        return SeriesEnd(**d)
    return SeriesConfig(**d)


class StreamParser:
    """One detector stream, read message by message (see the module)."""

    def __init__(self, protocol: str = "auto"):
        self._core = _splitter.StreamParser(protocol)

    @property
    def protocol(self) -> str | None:
        """The protocol asked for or detected; None until a message told."""
        return self._core.protocol

    def parse(self, parts) -> list:
        """The events of one multipart message (parts: bytes, zmq.Frame or memoryview)."""
        return [_event(d) for d in self._core.parse(list(parts))]


def parse_message(parts, protocol: str = "auto") -> list:
    """The events of one message read on its own (a cbfToEiger frame gives its SeriesStart too)."""
    return StreamParser(protocol).parse(parts)


def detect_protocol(parts) -> str:
    """`v1`, `v2` or `cbftoeiger`, told from the first part as the Splitter tells it."""
    return _splitter.detect_stream_protocol(list(parts)[:1])
