"""Stream monitor: connect to a detector stream, decode every frame and print what it holds.

A tool for staff ("is the detector streaming, and what?") and, until the Splitter and readers run,
what `intxrd` shows of a run. Malformed messages are reported, counted and skipped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from intxr.codec import DecodeError
from intxr.stream import FrameMessage, SeriesConfig, SeriesEnd, SeriesStart, StreamError, StreamParser


@dataclass
class FrameSummary:
    """What one decoded frame holds, computed from its pixels."""

    protocol: str
    series: int
    frame: int
    width: int
    height: int
    dtype: str
    encoding: str
    compressed_bytes: int
    decode_ms: float
    total_counts: int
    max_count: int
    n_masked: int  # pixels at 2^bits-1 or 2^bits-2 (gaps, dead pixels)
    n_bright: int  # unmasked pixels at or above `bright_threshold`
    header: dict = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"series {self.series} frame {self.frame} | {self.width}x{self.height} {self.dtype} {self.encoding} "
            f"{self.compressed_bytes / 1e6:.2f} MB | decode {self.decode_ms:.1f} ms | counts {self.total_counts} "
            f"max {self.max_count} | masked {self.n_masked} | bright {self.n_bright}"
        )


def summarize(message: FrameMessage, bright_threshold: int = 100) -> FrameSummary:
    t0 = time.perf_counter()
    pixels = message.pixels()
    decode_ms = (time.perf_counter() - t0) * 1000
    top = np.iinfo(pixels.dtype).max
    masked = pixels >= top - 1
    valid = np.where(masked, 0, pixels)
    return FrameSummary(
        message.protocol,
        message.series,
        message.frame,
        message.shape[1],
        message.shape[0],
        pixels.dtype.name,
        message.encoding,
        memoryview(message.blob).nbytes,
        decode_ms,
        int(valid.sum(dtype=np.int64)),
        int(valid.max()),
        int(masked.sum()),
        int((valid >= bright_threshold).sum()),
        {k: v for k, v in message.header.items() if k in ("mapping", "reporting", "master_file")},
    )


@dataclass
class MonitorCounters:
    messages: int = 0
    frames: int = 0
    series_started: int = 0
    series_ended: int = 0
    errors: int = 0
    last_error: str = ""


def monitor(
    endpoint: str,
    *,
    protocol: str = "auto",
    bind: bool = False,
    timeout: float | None = None,
    max_series: int | None = None,
    max_frames: int | None = None,
    out=sys.stdout,
    record=None,
    verbose: bool = True,
    stop=None,
) -> MonitorCounters:
    """Receive until `max_series` series have ended, `max_frames` frames came, `timeout` seconds pass
    with no message, or `stop()` returns True."""
    counters = MonitorCounters()
    parser = StreamParser(protocol)  # the Splitter's parser: the same rules, the same error text
    context = zmq.Context.instance()
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    (socket.bind if bind else socket.connect)(endpoint)
    started = time.monotonic()
    last = time.monotonic()
    try:
        while True:
            if stop is not None and stop():
                break
            if not socket.poll(200):
                if timeout is not None and time.monotonic() - last > timeout:
                    print(f"monitor: no message for {timeout:g} s on {endpoint}, stopping", file=sys.stderr)
                    break
                continue
            parts = socket.recv_multipart(copy=False)
            last = time.monotonic()
            counters.messages += 1
            try:
                events = parser.parse(parts)
            except StreamError as exc:
                counters.errors += 1
                counters.last_error = str(exc)
                print(f"monitor: message {counters.messages} skipped: {exc}", file=sys.stderr)
                continue
            for event in events:
                if isinstance(event, SeriesStart | SeriesConfig):
                    if isinstance(event, SeriesStart):
                        counters.series_started += 1
                    if verbose:
                        cfg = event.config
                        what = "start" if isinstance(event, SeriesStart) else "config"
                        print(
                            f"series {event.series} {what} ({event.protocol}): "
                            f"{cfg.get('description', cfg.get('detector_description', '?'))}, "
                            f"{cfg.get('nimages', cfg.get('number_of_images', '?'))} images",
                            file=out,
                            flush=True,
                        )
                elif isinstance(event, FrameMessage):
                    try:
                        summary = summarize(event)
                    except (DecodeError, ValueError) as exc:
                        counters.errors += 1
                        counters.last_error = f"series {event.series} frame {event.frame}: {exc}"
                        print(f"monitor: {counters.last_error}", file=sys.stderr)
                        continue
                    counters.frames += 1
                    if verbose:
                        print(summary.line(), file=out, flush=True)
                    if record is not None:
                        record.write(json.dumps(summary.__dict__) + "\n")
                        record.flush()
                elif isinstance(event, SeriesEnd):
                    counters.series_ended += 1
                    if verbose:
                        print(f"series {event.series} end", file=out, flush=True)
            if max_series is not None and counters.series_ended >= max_series:
                break
            if max_frames is not None and counters.frames >= max_frames:
                break
    finally:
        socket.close()
    elapsed = time.monotonic() - started
    print(
        f"monitor: {counters.frames} frames, {counters.series_ended} series ended, {counters.errors} errors "
        f"in {elapsed:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return counters
