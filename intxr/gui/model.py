"""What the GUI shows, kept apart from how it is drawn: one `SeriesView` per series (run) with its
results in arrival order, counts, raster layout; the Splitter's counters; per-rank health.

Results may arrive far faster than anyone can draw them: the model only appends and bumps a
version number, and each browser asks for what changed since the version it has (`delta`), at
its own pace, so bursts are coalesced into one update per draw.
"""

from __future__ import annotations

import re
import statistics
import threading
from dataclasses import dataclass, field

# Fields of a result the views need; the rest (spot lists, timings) stays out of the live feed.
POINT_FIELDS = ("frame", "n_spots", "hres", "score", "status", "rank", "latency")
MAX_SERIES = 20  # series kept in memory, newest first
MAX_SPOT_FRAMES = 2000  # frames per series whose spots are kept for the frame view


def grid_position(mapping, frame: int, row_length: int | None, first_frame: int) -> tuple[int, int] | None:
    """(row, column) of a frame in a raster: from a `mapping` header value naming it (`row 3 col 7`,
    `3,7`, `3x7`), else from a row length (frames in order, row by row), else None."""
    if isinstance(mapping, str):
        m = re.search(r"row\D*(\d+)\D+col\D*(\d+)", mapping, re.I) or re.fullmatch(r"\s*(\d+)\s*[,x: ]\s*(\d+)\s*",
                                                                                   mapping)
        if m:
            return int(m.group(1)), int(m.group(2))
    if row_length:
        k = frame - first_frame
        return k // row_length, k % row_length
    return None


@dataclass
class SeriesView:
    series: int
    points: list[dict] = field(default_factory=list)  # arrival order
    frames: dict[int, int] = field(default_factory=dict)  # frame -> index in points
    mappings: dict[int, str] = field(default_factory=dict)  # frame -> the header's mapping value
    spots: dict[int, list] = field(default_factory=dict)  # frame -> spot centroids, the latest frames only
    master_file: str | None = None
    summary: dict | None = None
    end: dict | None = None
    written: int | None = None
    first_frame: int | None = None
    first_time: float | None = None
    last_time: float | None = None

    def counts(self, min_bragg_peaks: int) -> dict:
        statuses = [p["status"] for p in self.points]
        hits = [p for p in self.points if p["status"] == "processed" and p["n_spots"] >= min_bragg_peaks]
        hres = [p["hres"] for p in hits if p.get("hres") and 0 < p["hres"] < 99]
        latencies = sorted(p["latency"] for p in self.points if p.get("latency") is not None)
        span = (self.last_time - self.first_time) if self.first_time and self.last_time else 0
        end = self.end or {}
        return {
            "series": self.series,
            "received": end.get("received"),
            "written": self.written,
            "processed": statuses.count("processed"),
            "blank": statuses.count("blank"),
            "failed": statuses.count("failed"),
            "skipped": end.get("skipped"),
            "results": len(self.points),
            "hits": len(hits),
            "hit_rate": len(hits) / len(self.points) if self.points else 0.0,
            "median_hres": statistics.median(hres) if hres else None,
            "rate": (len(self.points) - 1) / span if span > 0 and len(self.points) > 1 else None,
            "latency_p50": latencies[len(latencies) // 2] if latencies else None,
            "ended": self.summary is not None,
            "master_file": self.master_file,
        }


class RunModel:
    """Thread-safe: a subscriber thread feeds it, request threads read it."""

    def __init__(self, min_bragg_peaks: int = 10, row_length: int | None = None):
        self.min_bragg_peaks = min_bragg_peaks
        self.row_length = row_length
        self.series: dict[int, SeriesView] = {}
        self.splitter: dict = {}
        self.health: dict = {}
        self.errors: list[str] = []
        self.version = 0
        self.received = 0
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def _touch(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def _view(self, series: int) -> SeriesView:
        view = self.series.get(series)
        if view is None:
            view = self.series[series] = SeriesView(series)
            for old in sorted(self.series)[:-MAX_SERIES]:
                del self.series[old]
        return view

    def add_result(self, result: dict) -> None:
        with self._lock:
            self.received += 1
            view = self._view(int(result["series"]))
            frame = int(result["frame"])
            point = {k: result.get(k) for k in POINT_FIELDS}
            point["v"] = self.version + 1
            if frame in view.frames:
                view.points[view.frames[frame]] = point
            else:
                view.frames[frame] = len(view.points)
                view.points.append(point)
            view.first_frame = frame if view.first_frame is None else min(view.first_frame, frame)
            mapping = (result.get("header") or {}).get("mapping")
            if mapping:
                view.mappings[frame] = mapping
            view.spots[frame] = result.get("spots_xy") or []
            while len(view.spots) > MAX_SPOT_FRAMES:
                del view.spots[next(iter(view.spots))]
            view.master_file = view.master_file or result.get("master_file")
            done = result.get("done")
            if done:
                view.first_time = done if view.first_time is None else min(view.first_time, done)
                view.last_time = done if view.last_time is None else max(view.last_time, done)
            for error in result.get("errors") or []:
                if result.get("status") == "failed":
                    self.errors = (self.errors + [error])[-50:]
            self._touch()

    def add_event(self, topic: str, body: dict) -> None:
        with self._lock:
            if topic == "series":
                view = self._view(int(body["series"]))
                view.summary = body
                view.master_file = body.get("master_file") or view.master_file
            elif topic == "splitter_series_end":
                self._view(int(body["series"])).end = body
            elif topic == "splitter_series_written":
                view = self._view(int(body["series"]))
                view.written = body.get("frames_written")
                view.master_file = body.get("master_file") or view.master_file
            elif topic == "splitter":
                self.splitter = body
                if body.get("last_error"):
                    self.errors = (self.errors + [f"splitter: {body['last_error']}"])[-50:] if (
                        not self.errors or self.errors[-1] != f"splitter: {body['last_error']}") else self.errors
            elif topic == "health":
                self.health = body
                self.splitter = body.get("splitter") or self.splitter
            else:
                return
            self._touch()

    def delta(self, since: int) -> dict:
        """Everything a view holding version `since` lacks: new points per series, and the small
        state (counts, grid, health) in full."""
        with self._lock:
            series = []
            for number in sorted(self.series, reverse=True):  # newest first
                view = self.series[number]
                new = [p for p in view.points if p["v"] > since] if since else list(view.points)
                series.append(
                    {
                        "series": number,
                        "points": new,
                        "counts": view.counts(self.min_bragg_peaks),
                        "grid": self._grid(view),
                    }
                )
            return {
                "version": self.version,
                "since": since,
                "series": series,
                "splitter": self.splitter,
                "health": self.health,
                "errors": self.errors[-10:],
                "min_bragg_peaks": self.min_bragg_peaks,
            }

    def _grid(self, view: SeriesView) -> dict[str, tuple[int, int]]:
        grid = {}
        for frame in view.frames:
            pos = grid_position(view.mappings.get(frame), frame, self.row_length, _first_frame(view))
            if pos is not None:
                grid[str(frame)] = pos
        return grid

    def spots(self, series: int, frame: int) -> list:
        with self._lock:
            view = self.series.get(series)
            return list(view.spots.get(frame, [])) if view else []

    def wait(self, version: int, timeout: float) -> int:
        with self._lock:
            if self.version == version:
                self.changed.wait(timeout)
            return self.version

    def master_file(self, series: int) -> str | None:
        with self._lock:
            view = self.series.get(series)
            return view.master_file if view else None

    def point(self, series: int, frame: int) -> dict | None:
        with self._lock:
            view = self.series.get(series)
            if view is None or frame not in view.frames:
                return None
            return dict(view.points[view.frames[frame]])


def _first_frame(view: SeriesView) -> int:
    return view.first_frame if view.first_frame is not None else 0
