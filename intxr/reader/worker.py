"""A Reader rank: ask the Splitter for a frame, decode, pre-screen, find spots, score, push the
result (JSON) to the Collector. Every frame it takes gets a result, `failed` with the error when
something goes wrong, so the Collector can account for every frame number.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from intxr.config import Configuration
from intxr.launch import current_placement, page_numa_node
from intxr.models import Geometry
from intxr.reader.source import FrameSource, ServedFrame
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams

STATUS_INTERVAL = 1.0  # seconds between a reader's status messages to the Collector


def _first(dicts, *keys, default=None):
    for d in dicts:
        if isinstance(d, dict):
            for key in keys:
                value = d.get(key)
                if value is not None:
                    return value
    return default


def geometry_from_series(series_info: dict, shape: tuple[int, int]) -> Geometry:
    """Geometry from the series header as the Splitter served it: the v1 / cbfToEiger config part
    (EIGER names, lengths in metres) or the v2 start message (its own names)."""
    sources = [series_info.get("config"), series_info.get("header")]
    wavelength = _first(sources, "wavelength", "incident_wavelength")
    distance = _first(sources, "detector_distance")
    pixel_x = _first(sources, "x_pixel_size", "pixel_size_x")
    pixel_y = _first(sources, "y_pixel_size", "pixel_size_y", default=pixel_x)
    beam_x = _first(sources, "beam_center_x")
    beam_y = _first(sources, "beam_center_y")
    cutoff = _first(sources, "countrate_correction_count_cutoff", "saturation_value")
    known = None not in (wavelength, distance, pixel_x, beam_x, beam_y)
    return Geometry(
        wavelength=float(wavelength or 1.0),
        distance=float(distance) * 1000.0 if distance else 200.0,
        beam_center_x=float(beam_x if beam_x is not None else shape[1] / 2),
        beam_center_y=float(beam_y if beam_y is not None else shape[0] / 2),
        pixel_size_x=float(pixel_x) * 1000.0 if pixel_x else 0.075,
        pixel_size_y=float(pixel_y) * 1000.0 if pixel_y else 0.075,
        count_time=float(_first(sources, "count_time", default=0.01)),
        frame_time=float(_first(sources, "frame_time", default=0.01)),
        count_cutoff=int(cutoff) if cutoff is not None else None,
        description=str(_first(sources, "description", "detector_description", default="unknown detector")),
        sensor_material=str(_first(sources, "sensor_material", default="Si")),
        sensor_thickness=float(_first(sources, "sensor_thickness", default=0.00045)) * 1000.0,
        known=known,
    )


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
        self._complaints = 0
        self._complained_at: float | None = None
        self._bad_replies = 0

    def _send(self, kind: str, body: dict) -> None:
        try:
            self.results.send_multipart([kind.encode(), json.dumps(body).encode()])
        except zmq.Again:
            pass  # the Collector is gone or stuck; its absence is reported where it matters

    def status(self, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        self._send(
            "status",
            {
                "rank": self.settings.rank,
                **self.placement,
                "frames": self.frames,
                "failed": self.failed,
                "rate": self.frames / elapsed,
                "reconnects": self.source.counters.reconnects,
                "bad_replies": self.source.counters.bad_replies,
                "time": time.time(),
            },
        )

    def finder_for(self, frame: ServedFrame) -> tuple[SpotFinder, str]:
        bl = self.configuration.beamline
        run_mode = frame.header(bl.run_mode_key) if bl.run_mode_key else None
        section = self.configuration.processing.for_run_mode(run_mode, bl.run_mode_key_index)
        key = (frame.series, section.name, frame.shape)
        if key not in self._finders:
            if len(self._finders) > 8:
                self._finders.clear()
            geometry = geometry_from_series(frame.series_info, frame.shape)
            self._finders[key] = SpotFinder(SpotFinderParams.from_processing(section), geometry)
        return self._finders[key], section.name

    def process(self, frame: ServedFrame) -> dict:
        timing = {}
        t0 = time.perf_counter()
        bl = self.configuration.beamline
        result = {
            "series": frame.series,
            "series_name": frame.series_name,
            "frame": frame.frame,
            "rank": self.settings.rank,
        }
        try:
            if frame.error is not None:
                raise ValueError(frame.error)
            forwarded, received = frame.meta.get("forwarded"), frame.meta.get("received")
            if isinstance(forwarded, int | float) and not isinstance(forwarded, bool):
                timing["receive"] = max(frame.received - forwarded, 0.0)
            if isinstance(received, int | float) and not isinstance(received, bool):
                result["received"] = received
            if isinstance(frame.meta.get("master_file"), str):
                result["master_file"] = frame.meta["master_file"]
            for key in ("mapping", "reporting", "master_file", *(bl.custom_keys or ())):
                value = frame.header(key)
                if value is not None:
                    result.setdefault("header", {})[key] = value
            if bl.output_prefix_key:
                prefix = frame.header(bl.output_prefix_key)
                if prefix:
                    result.setdefault("header", {})[bl.output_prefix_key] = prefix
            if self._buffer is None or self._buffer.shape != frame.shape or self._buffer.dtype != frame.dtype:
                self._buffer = np.zeros(frame.shape, frame.dtype)  # touched here, so placed on this rank's node
                self.placement["buffer_numa"] = page_numa_node(self._buffer.ctypes.data)
            image = frame.pixels(self._buffer)
            timing["decode"] = time.perf_counter() - t0
            finder, section = self.finder_for(frame)
            found = finder.find(image, skip_prescreen=self.settings.skip_prescreen)
            score = found.score
            result.update(
                status="blank" if found.prescreened else "processed",
                processing_section=section,
                n_spots=score.n_spots,
                n_overloads=score.n_overloads,
                score=score.score,
                hres=score.hres,
                n_ice_rings=score.n_ice_rings,
                mean_shape_ratio=score.mean_shape_ratio,
                n_strong_pixels=found.n_strong_pixels,
                n_spots_total=len(found.spots),
                errors=[*score.errors, *found.errors],
                indexing="not available",
            )
            if len(found.spots):
                # What the GUI circles: centroids (x, y) in pixels of the 500 strongest spots.
                strongest = np.argsort(-found.spots.intensity, kind="stable")[:500]
                xs, ys = found.spots.x[strongest], found.spots.y[strongest]
                result["spots_xy"] = [[round(float(x), 1), round(float(y), 1)] for x, y in zip(xs, ys, strict=True)]
            for name, seconds in found.timing.items():
                # The spot finder's stages under the result's names: threshold + labelling = spot finding.
                stage = {"threshold": "spotfinding", "spots": "spotfinding", "stats": "scoring"}.get(name, name)
                timing[stage] = timing.get(stage, 0.0) + seconds
        except Exception as exc:  # a bad frame must never stop the reader
            self.failed += 1
            self.complain(f"series {frame.series} frame {frame.frame}: {exc}")
            result.update(status="failed", errors=[f"series {frame.series} frame {frame.frame}: {exc}"],
                          n_spots=0, n_overloads=0, score=0, hres=99.9, n_ice_rings=0, mean_shape_ratio=0.0)
        timing["total"] = time.perf_counter() - t0 + timing.get("receive", 0.0)
        result["timing"] = {k: round(v, 6) for k, v in timing.items()}
        result["done"] = time.time()
        return result

    def complain(self, what: str) -> None:
        """One line for the first failed frame or bad reply, then at most one every 10 s with a count."""
        self._complaints += 1
        now = time.monotonic()
        if self._complained_at is None or now - self._complained_at >= 10.0:
            more = f" ({self._complaints} in all)" if self._complaints > 1 else ""
            print(f"reader rank {self.settings.rank}: {what}{more}", file=sys.stderr, flush=True)
            self._complained_at = now

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
                    self.complain(self.source.counters.last_error)
            if frame is not None:
                result = self.process(frame)
                self.frames += 1
                self._send("result", result)
                del frame
            if time.monotonic() - last_status >= STATUS_INTERVAL:
                self.status(started)
                last_status = time.monotonic()
        self.status(started)
        self.source.close()
        self.results.close(linger=2000)
        if self.control is not None:
            self.control.close(linger=0)
        return 0
