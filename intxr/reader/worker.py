"""A Reader rank: ask the Splitter for a frame, decode, pre-screen, find spots, score, push the
result (JSON) to the Collector. Every frame it takes gets a result, `failed` with the error when
something goes wrong, so the Collector can account for every frame number.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import zmq

from intxr.config import Configuration
from intxr.geometry import Geometry, GeometryError
from intxr.launch import current_placement, page_numa_node
from intxr.messages import FrameResult, ReaderStatus, is_hit
from intxr.reader.indexing import index_if_asked, result_fields
from intxr.reader.source import FrameSource, ServedFrame
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams
from intxr.report import Reporter

STATUS_INTERVAL = 1.0  # seconds between a reader's status messages to the Collector


def geometry_from_series(series_info: dict, shape: tuple[int, int]) -> Geometry:
    """The series' geometry as the Splitter normalised it from the header (series info `"geometry"`, the
    wire dict of `intxr.geometry`). A series info without one gives a geometry that says so: its results
    carry that error instead of numbers from made-up values."""
    wire = series_info.get("geometry")
    if wire is None:
        return Geometry.unknown("series info without geometry")
    geometry = Geometry.from_wire(wire)
    fast, slow = geometry.frame_size
    if fast > shape[1] or slow > shape[0]:
        raise GeometryError(f"geometry ({geometry.source}) covers {fast}x{slow} pixels, the frame is "
                            f"{shape[1]}x{shape[0]}")
    return geometry


@dataclass
class ReaderSettings:
    rank: int
    splitter_endpoint: str
    collector_endpoint: str
    control_endpoint: str | None  # the Collector's PUB: a `stop` there ends the reader
    timeout: float
    skip_prescreen: bool = False


class Reader:
    def __init__(self, settings: ReaderSettings, configuration: Configuration):
        self.settings = settings
        self.configuration = configuration
        self.placement = current_placement()
        self.context = zmq.Context.instance()
        self.results = self.context.socket(zmq.PUSH)
        self.results.setsockopt(zmq.LINGER, 2000)
        self.results.setsockopt(zmq.SNDTIMEO, int(settings.timeout * 1000))
        self.results.connect(settings.collector_endpoint)
        self.control = None
        if settings.control_endpoint:
            self.control = self.context.socket(zmq.SUB)
            self.control.setsockopt(zmq.SUBSCRIBE, b"stop")
            self.control.connect(settings.control_endpoint)
        identity = {"rank": settings.rank, **self.placement}
        self.source = FrameSource(settings.splitter_endpoint, timeout=settings.timeout, identity=identity,
                                  context=self.context)
        self._finders: dict[tuple, SpotFinder] = {}
        self._buffer: np.ndarray | None = None
        self.frames = 0
        self.failed = 0
        self.stopping = False
        prefix = f"reader rank {settings.rank}"
        self.failures = Reporter(prefix, "failed frame", note="; reported failed")
        self.bad_reply = Reporter(prefix, "bad reply", f"the Splitter's socket {settings.splitter_endpoint}")
        self._bad_replies = 0

    def _send(self, kind: str, body: dict) -> None:
        try:
            self.results.send_multipart([kind.encode(), json.dumps(body).encode()])
        except zmq.Again:
            pass  # the Collector is gone or stuck; its absence is reported where it matters

    def status(self, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        status = ReaderStatus(
            rank=self.settings.rank, pid=self.placement.get("pid"), host=self.placement.get("host"),
            cpus=self.placement.get("cpus"), cpu=self.placement.get("cpu"), numa=self.placement.get("numa"),
            buffer_numa=self.placement.get("buffer_numa"), frames=self.frames, failed=self.failed,
            rate=self.frames / elapsed, reconnects=self.source.counters.reconnects,
            bad_replies=self.source.counters.bad_replies, time=time.time())
        self._send("status", status.to_wire())
        self.failures.tick()
        self.bad_reply.tick()

    def finder_for(self, frame: ServedFrame):
        """The spot finder for this frame's series, section and shape, and that processing section."""
        bl = self.configuration.beamline
        run_mode = frame.header(bl.run_mode_key) if bl.run_mode_key else None
        section = self.configuration.processing.for_run_mode(run_mode, bl.run_mode_key_index)
        key = (frame.series, section.name, frame.shape)
        if key not in self._finders:
            if len(self._finders) > 8:
                self._finders.clear()
            geometry = geometry_from_series(frame.series_info, frame.shape)
            self._finders[key] = SpotFinder(SpotFinderParams.from_processing(section), geometry)
        return self._finders[key], section

    def process(self, frame: ServedFrame) -> FrameResult:
        timing = {}
        t0 = time.perf_counter()
        bl = self.configuration.beamline
        result = FrameResult(series=frame.series, series_name=frame.series_name, frame=frame.frame,
                             rank=self.settings.rank, status="failed", hit=False)
        try:
            if frame.error is not None:
                raise ValueError(frame.error)
            forwarded, received = frame.meta.get("forwarded"), frame.meta.get("received")
            if isinstance(forwarded, int | float) and not isinstance(forwarded, bool):
                timing["receive"] = max(frame.received - forwarded, 0.0)
            if isinstance(received, int | float) and not isinstance(received, bool):
                result.received = received
            if isinstance(frame.meta.get("master_file"), str):
                result.master_file = frame.meta["master_file"]
            header = {}
            for key in ("mapping", "reporting", "master_file", *(bl.custom_keys or ())):
                value = frame.header(key)
                if value is not None:
                    header[key] = value
            if bl.output_prefix_key:
                prefix = frame.header(bl.output_prefix_key)
                if prefix:
                    header[bl.output_prefix_key] = prefix
            result.header = header or None
            if self._buffer is None or self._buffer.shape != frame.shape or self._buffer.dtype != frame.dtype:
                self._buffer = np.zeros(frame.shape, frame.dtype)  # touched here, so placed on this rank's node
                self.placement["buffer_numa"] = page_numa_node(self._buffer.ctypes.data)
            finder, section = self.finder_for(frame)
            # Decoded and, for the pre-screen, binned in the same pass (counted as decode time).
            frame.binning = finder.binning_for(frame.dtype, frame.shape, self.settings.skip_prescreen)
            image = frame.pixels(self._buffer)
            timing["decode"] = time.perf_counter() - t0
            found = finder.find(image, skip_prescreen=self.settings.skip_prescreen, binned=frame.binned)
            score = found.score
            status = "blank" if found.prescreened else "processed"
            result.status = status
            # The hit is decided here, once, with the section this frame was processed with.
            result.hit = is_hit(status, score.n_spots, finder.params.min_bragg_peaks)
            result.processing_section = section.name
            result.algorithm = finder.params.threshold.algorithm
            result.n_spots = score.n_spots
            result.n_overloads = score.n_overloads
            result.score = score.score
            result.hres = score.hres
            result.n_ice_rings = score.n_ice_rings
            result.mean_shape_ratio = score.mean_shape_ratio
            result.n_strong_pixels = found.n_strong_pixels
            result.n_spots_total = len(found.spots)
            result.errors = list(score.errors)  # the finder's own errors are already in its score's
            t_index = time.perf_counter()
            word, indexed = index_if_asked(section, finder.geometry, found.spots.x, found.spots.y,
                                           score.n_spots if status == "processed" else 0)
            for name, value in result_fields(word, indexed).items():
                setattr(result, name, value)
            if indexed is not None:
                timing["indexing"] = time.perf_counter() - t_index
                for error in indexed.errors:
                    if error not in result.errors:
                        result.errors.append(error)
            elif word.startswith("not indexed"):
                result.errors.append(word)
            if len(found.spots):
                # What the GUI circles: centroids (x, y) in pixels of the 500 strongest spots.
                strongest = np.argsort(-found.spots.intensity, kind="stable")[:500]
                xs, ys = found.spots.x[strongest], found.spots.y[strongest]
                result.spots_xy = [[round(float(x), 1), round(float(y), 1)] for x, y in zip(xs, ys, strict=True)]
            for name, seconds in found.timing.items():
                # The spot finder's stages under the result's names: threshold + labelling = spot finding.
                stage = {"threshold": "spotfinding", "spots": "spotfinding", "stats": "scoring"}.get(name, name)
                timing[stage] = timing.get(stage, 0.0) + seconds
        except Exception as exc:  # a bad frame must never stop the reader
            self.failed += 1
            error = f"series {frame.series} frame {frame.frame}: {exc}"
            self.failures(error)
            result.status, result.hit, result.errors = "failed", False, [error]
            result.n_spots, result.n_overloads, result.score, result.hres = 0, 0, 0, 99.9
            result.n_ice_rings, result.mean_shape_ratio = 0, 0.0
        timing["total"] = time.perf_counter() - t0 + timing.get("receive", 0.0)
        result.timing = {k: round(v, 6) for k, v in timing.items()}
        result.done = time.time()
        return result

    def stop_requested(self) -> bool:
        if self.stopping:
            return True
        if self.control is not None and self.control.poll(0):
            self.control.recv_multipart()
            self.stopping = True
        return self.stopping

    def run(self, stop=None) -> int:
        """Until the Collector says stop, or `stop()` (a signal) does."""
        started = time.monotonic()
        last_status = 0.0
        while not (self.stop_requested() or (stop is not None and stop())):
            frame = self.source.next_frame(wait=0.25)
            if self.source.counters.bad_replies != self._bad_replies:
                self._bad_replies = self.source.counters.bad_replies
                if frame is None or frame.error is None:  # a failed frame says it itself
                    self.bad_reply(self.source.counters.last_error)
            if frame is not None:
                result = self.process(frame)
                self.frames += 1
                self._send("result", result.to_wire())
                del frame
            if time.monotonic() - last_status >= STATUS_INTERVAL:
                self.status(started)
                last_status = time.monotonic()
        self.status(started)
        self.failures.flush()
        self.bad_reply.flush()
        self.source.close()
        self.results.close(linger=2000)
        if self.control is not None:
            self.control.close(linger=0)
        return 0
