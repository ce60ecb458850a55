"""What the GUI shows, kept apart from how it is drawn: one `SeriesView` per series (run) with its
results in arrival order, counts, raster layout; the Splitter's counters; per-rank health.

Results may arrive far faster than anyone can draw them: the model only appends and bumps a
version number, and each browser asks for what changed since the version it has (`delta`), at
its own pace, so bursts are coalesced into one update per draw.

Series are keyed by the Splitter's `series_name` (unique per output directory: a second series 1
after a detector restart is `series_000001_r2`, its own tab `1 r2`), else by the series number.
Every message comes from a socket anyone on the host can write to: `add_result` / `add_event`
check each field's type before anything is stored (`BadMessage` otherwise), so one bad message
can never break the views built from the good ones.
"""

from __future__ import annotations

import math
import re
import statistics
import threading
from array import array
from dataclasses import dataclass, field

# Fields of a result the views need; the rest (spot lists, timings) stays out of the live feed.
POINT_FIELDS = ("frame", "n_spots", "hres", "score", "status", "rank", "latency")
MAX_SERIES = 20  # series kept in memory, newest first; older ones are dropped and counted
MAX_SPOT_FRAMES = 2000  # frames per series whose spots are kept for the frame view
MAX_SPOTS = 20_000  # spot centroids kept per frame
# Spot centroids kept in all, as float32 pairs (8 bytes a spot; as JSON-decoded lists they took
# ~130): beyond it the oldest series' oldest frames lose their circles first. A run of weeks levels
# off here instead of growing with every spot of every series kept.
MAX_SPOT_BYTES = 24 << 20
MAX_TEXT = 300  # characters kept of any text from a message (errors, names)
COUNT_FIELDS = ("received", "written", "processed", "hits", "blank", "skipped", "failed", "lost")
RANGE_FIELDS = ("lost_ranges", "skipped_ranges")  # a SERIES summary's frame ranges, shown as text
MAX_RANGES_SHOWN = 8
_REPEAT = re.compile(r"_r(\d+)$")


class BadMessage(ValueError):
    """A message whose fields are missing or of the wrong type: counted and reported, never stored."""


def _int(body: dict, key: str, *, required: bool = False, minimum: int | None = 0) -> int | None:
    value = body.get(key)
    if value is None:
        if required:
            raise BadMessage(f"no {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise BadMessage(f"{key!r} is {_show(value)}, not an integer{bound}")
    return value


def _num(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadMessage(f"{key!r} is {_show(value)}, not a number")
    return value


def _str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadMessage(f"{key!r} is {_show(value)}, not text")
    return value[:MAX_TEXT]


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _spots(value) -> array:
    """`spots_xy` checked, kept as float32 x, y pairs."""
    if value is None:
        return array("f")
    if not isinstance(value, list) or len(value) > MAX_SPOTS:
        raise BadMessage(f"'spots_xy' is {_show(value)}, not a list of [x, y]")
    for xy in value:
        if (not isinstance(xy, list) or len(xy) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in xy)):
            raise BadMessage(f"'spots_xy' holds {_show(xy)}, not [x, y]")
    return array("f", [v for xy in value for v in xy])


def _nbytes(xy: array | None) -> int:
    return 0 if xy is None else xy.itemsize * len(xy)


def _scalars(body, what: str) -> dict:
    """A flat dict of numbers, text, booleans and nulls (the Splitter's counters, a rank's health)."""
    if not isinstance(body, dict):
        raise BadMessage(f"{what} is {_show(body)}, not an object")
    out = {}
    for key, value in body.items():
        if isinstance(value, str):
            out[str(key)[:64]] = value[:MAX_TEXT]
        elif value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
            out[str(key)[:64]] = value
        # lists and objects (per-series lists, nested maps) are not shown: left out
    return out


def series_label(number: int, name: str | None) -> str:
    """The tab's label: the series number, with the Splitter's repeat suffix (`1 r2`)."""
    m = _REPEAT.search(name or "")
    return f"{number} r{m.group(1)}" if m else str(number)


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


def ranges_count(ranges) -> int | None:
    """Frames in `[[first, last], ...]`, or None when it is not such a list."""
    if not isinstance(ranges, list):
        return None
    total = 0
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                and r[0] <= r[1]):
            return None
        total += r[1] - r[0] + 1
    return total


def show_ranges(ranges: list) -> str:
    """`[[3, 5], [9, 9]]` as `3-5, 9`; a long list is cut (a 10^6-frame series may have many)."""
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:MAX_RANGES_SHOWN])
    return text + (f", ... ({len(ranges)} ranges)" if len(ranges) > MAX_RANGES_SHOWN else "")


def ranges_position(ranges, frame: int) -> int | None:
    """Position of `frame` among the frames of sorted ranges (its index on disk), None when absent."""
    before = 0
    for first, last in ranges:
        if first <= frame <= last:
            return before + frame - first
        before += last - first + 1
    return None


@dataclass
class SeriesView:
    series: int
    key: str = ""
    name: str | None = None
    order: int = 0  # creation order: the newest series has the highest
    points: list[dict] = field(default_factory=list)  # arrival order
    frames: dict[int, int] = field(default_factory=dict)  # frame -> index in points
    mappings: dict[int, str] = field(default_factory=dict)  # frame -> the header's mapping value
    spots: dict[int, array] = field(default_factory=dict)  # frame -> x, y, x, y ... (float32), latest frames
    master_file: str | None = None
    summary: dict | None = None  # the Collector's SERIES summary, counts only
    end: dict | None = None  # the Splitter's series_end: counts and the received frames' ranges
    written: int | None = None
    first_frame: int | None = None
    first_time: float | None = None
    last_time: float | None = None
    version: int = 0  # model version of the last change

    @property
    def label(self) -> str:
        return series_label(self.series, self.name)

    def counts(self, min_bragg_peaks: int) -> dict:
        statuses = [p["status"] for p in self.points]
        hits = [p for p in self.points if p["status"] == "processed" and (p["n_spots"] or 0) >= min_bragg_peaks]
        hres = [p["hres"] for p in hits if p.get("hres") and 0 < p["hres"] < 99]
        latencies = sorted(p["latency"] for p in self.points if p.get("latency") is not None)
        span = (self.last_time - self.first_time) if self.first_time and self.last_time else 0
        end = self.end or {}
        counts = {
            "series": self.series,
            "name": self.name,
            "label": self.label,
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
        # The Collector's summary is the account (frames whose reader died are failed there).
        for key, value in (self.summary or {}).items():
            if value is not None:
                counts[key] = value
        return counts

    def disk_index(self, frame: int) -> int | None:
        """Where `frame` is in the series' files: its position among the received frames once the
        series has ended, else counted from the first frame seen; None when it is not there."""
        end = self.end or {}
        received = end.get("received_ranges")
        if received is not None:
            return ranges_position(received, frame)
        first = self.first_frame if self.first_frame is not None else 0
        if frame < first:
            return None
        return frame - first


class RunModel:
    """Thread-safe: a subscriber thread feeds it, request threads read it."""

    def __init__(self, min_bragg_peaks: int = 10, row_length: int | None = None):
        self.min_bragg_peaks = min_bragg_peaks
        self.row_length = row_length
        self.series: dict[str, SeriesView] = {}  # by key, oldest first
        self.series_dropped = 0  # older series no longer kept
        self.splitter: dict = {}
        self.health: dict = {}
        self.errors: list[str] = []
        self.bad_messages = 0  # messages the subscriber could not use (see gui_health)
        self.last_bad: str | None = None
        self.gui_counts = {"dropped_connections": 0, "bad_requests": 0, "failed_requests": 0}
        self.version = 0
        self.received = 0
        self._created = 0
        self._spot_bytes = 0  # of all views' spots
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def _touch(self, view: SeriesView | None = None) -> None:
        self.version += 1
        if view is not None:
            view.version = self.version
        self.changed.notify_all()

    def _view(self, body: dict) -> SeriesView:
        """The series a message belongs to: by `series_name`, else the newest view of that number."""
        number = _int(body, "series", required=True)
        name = _str(body, "series_name") or None
        if name is not None:
            view = self.series.get(name)
            if view is not None:
                return view
            # A view opened by messages without the name (an older sender) takes it.
            newest = self._newest(number)
            if newest is not None and newest.name is None and newest.key == str(number):
                del self.series[newest.key]
                newest.key, newest.name = name, name
                self.series[name] = newest
                return newest
            key = name
        else:
            newest = self._newest(number)
            if newest is not None:
                return newest
            key = str(number)
        self._created += 1
        view = self.series[key] = SeriesView(number, key=key, name=name, order=self._created)
        while len(self.series) > MAX_SERIES:
            oldest = self.series.pop(min(self.series.values(), key=lambda v: v.order).key)
            self._spot_bytes -= sum(_nbytes(xy) for xy in oldest.spots.values())
            self.series_dropped += 1
        return view

    def _keep_spots(self, view: SeriesView, frame: int, xy: array) -> None:
        """Keep a frame's spots within both bounds: MAX_SPOT_FRAMES a series, MAX_SPOT_BYTES in all."""
        self._spot_bytes -= _nbytes(view.spots.pop(frame, None))
        if xy:
            view.spots[frame] = xy
            self._spot_bytes += _nbytes(xy)
        while len(view.spots) > MAX_SPOT_FRAMES:
            self._spot_bytes -= _nbytes(view.spots.pop(next(iter(view.spots))))
        while self._spot_bytes > MAX_SPOT_BYTES:
            # Oldest series first; the newest frame just added is the last to go.
            holder = min((v for v in self.series.values() if v.spots), key=lambda v: v.order)
            self._spot_bytes -= _nbytes(holder.spots.pop(next(iter(holder.spots))))

    def _newest(self, number: int) -> SeriesView | None:
        views = [v for v in self.series.values() if v.series == number]
        return max(views, key=lambda v: v.order) if views else None

    def bad_message(self, text: str) -> None:
        with self._lock:
            self.bad_messages += 1
            self.last_bad = text[:MAX_TEXT]
            self._touch()

    def note(self, what: str) -> None:
        """Count something the server saw (a dropped browser, a refused request): shown, not said."""
        with self._lock:
            self.gui_counts[what] = self.gui_counts.get(what, 0) + 1

    def add_result(self, result) -> None:
        if not isinstance(result, dict):
            raise BadMessage(f"result is {_show(result)}, not an object")
        frame = _int(result, "frame", required=True)
        point = {
            "frame": frame,
            "n_spots": _int(result, "n_spots"),
            "hres": _num(result, "hres"),
            "score": _num(result, "score"),
            "status": _str(result, "status") or "unknown",
            "rank": _int(result, "rank", minimum=None),
            "latency": _num(result, "latency"),
        }
        header = result.get("header")
        if header is not None and not isinstance(header, dict):
            raise BadMessage(f"'header' is {_show(header)}, not an object")
        mapping = _str(header or {}, "mapping")
        spots = _spots(result.get("spots_xy"))
        master_file = _str(result, "master_file")
        done = _num(result, "done")
        errors = result.get("errors") or []
        if not isinstance(errors, list):
            raise BadMessage(f"'errors' is {_show(errors)}, not a list")
        errors = [str(e)[:MAX_TEXT] for e in errors]
        with self._lock:
            view = self._view(result)
            self.received += 1
            point["v"] = self.version + 1
            if frame in view.frames:
                view.points[view.frames[frame]] = point
            else:
                view.frames[frame] = len(view.points)
                view.points.append(point)
            view.first_frame = frame if view.first_frame is None else min(view.first_frame, frame)
            if mapping:
                view.mappings[frame] = mapping
            self._keep_spots(view, frame, spots)
            view.master_file = view.master_file or master_file
            if done:
                view.first_time = done if view.first_time is None else min(view.first_time, done)
                view.last_time = done if view.last_time is None else max(view.last_time, done)
            if point["status"] == "failed":
                self.errors = (self.errors + errors)[-50:]
            self._touch(view)

    def add_event(self, topic: str, body) -> None:
        if not isinstance(body, dict):
            raise BadMessage(f"{topic} is {_show(body)}, not an object")
        with self._lock:
            view = None
            if topic == "series":
                summary: dict = {k: _int(body, k) for k in COUNT_FIELDS if body.get(k) is not None}
                for key in RANGE_FIELDS:
                    value = body.get(key)
                    if value is None:
                        continue
                    if ranges_count(value) is None:
                        raise BadMessage(f"{key!r} is {_show(value)}, not [[first, last], ...]")
                    summary[key] = show_ranges(value)
                master_file = _str(body, "master_file")
                view = self._view(body)
                view.summary = summary
                view.master_file = master_file or view.master_file
            elif topic == "splitter_series_end":
                end = {k: _int(body, k) for k in ("received", "skipped", "forwarded", "malformed")
                       if body.get(k) is not None}
                received = self._received_ranges(body)
                if received is not None:
                    end["received_ranges"] = received
                    end.setdefault("received", ranges_count(received))
                    if "skipped" not in end:
                        skipped = ranges_count(body.get("skipped_ranges"))
                        end["skipped"] = skipped if skipped is not None else len(body.get("skipped_frames") or [])
                view = self._view(body)
                view.end = end
            elif topic == "splitter_series_written":
                written = _int(body, "frames_written")
                master_file = _str(body, "master_file")
                view = self._view(body)
                view.written = written
                view.master_file = master_file or view.master_file
            elif topic == "splitter":
                self.splitter = _scalars(body, "splitter counters")
                if self.splitter.get("last_error"):
                    error = f"splitter: {self.splitter['last_error']}"
                    if not self.errors or self.errors[-1] != error:
                        self.errors = (self.errors + [error])[-50:]
            elif topic == "health":
                self.health = self._health(body)
                if body.get("splitter") is not None:
                    self.splitter = _scalars(body["splitter"], "health's splitter counters")
            else:
                raise BadMessage(f"unknown topic {topic!r}")
            self._touch(view)

    @staticmethod
    def _received_ranges(body: dict) -> list | None:
        """The received frames as sorted, merged ranges, from `forwarded_ranges` + `skipped_ranges`
        (or the older frame lists); None when the message has neither."""
        ranges = []
        for key in ("forwarded_ranges", "skipped_ranges"):
            value = body.get(key)
            if value is None:
                continue
            if ranges_count(value) is None:
                raise BadMessage(f"{key!r} is {_show(value)}, not [[first, last], ...]")
            ranges += value
        for key in ("forwarded_frames", "skipped_frames"):  # the Splitter's older form
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise BadMessage(f"{key!r} is {_show(value)}, not a list of frame numbers")
            ranges += [[v, v] for v in value]
        if not ranges and not any(k in body for k in ("forwarded_ranges", "skipped_ranges", "forwarded_frames",
                                                      "skipped_frames")):
            return None
        merged: list[list[int]] = []
        for first, last in sorted(ranges):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        return merged

    @staticmethod
    def _health(body: dict) -> dict:
        """The Collector's health (`Collector.health`): per-rank rows (`dead`, `lost`, `starting`,
        `given_up`, `restarts`, ...) plus the job's state (`readers_alive`, `no_readers`,
        `no_readers_for`, `reader_restarts`, `job_restarts`, `malformed_results`, ...); every field
        optional."""
        ranks = body.get("ranks") or []
        if not isinstance(ranks, list):
            raise BadMessage(f"health 'ranks' is {_show(ranks)}, not a list")
        rows = []
        for rank in ranks:
            row = _scalars(rank, "a health rank")
            _int(row, "rank", required=True, minimum=None)
            rows.append(row)
        health = _scalars(body, "health")
        health.pop("splitter", None)
        health["ranks"] = rows
        return health

    def delta(self, since: int) -> dict:
        """Everything a view holding version `since` lacks: new points per series, and the small
        state (counts, health) in full; a series' grid only when it changed."""
        with self._lock:
            series = []
            for view in sorted(self.series.values(), key=lambda v: v.order, reverse=True):  # newest first
                new = [p for p in view.points if p["v"] > since] if since else list(view.points)
                entry = {
                    "key": view.key,
                    "series": view.series,
                    "label": view.label,
                    "points": new,
                    "counts": view.counts(self.min_bragg_peaks),
                }
                if not since or view.version > since:
                    entry["grid"] = self._grid(view)
                series.append(entry)
            return {
                "version": self.version,
                "since": since,
                "series": series,
                "series_dropped": self.series_dropped,
                "splitter": self.splitter,
                "health": self.health,
                "gui": {"bad_messages": self.bad_messages, "last_bad": self.last_bad, **self.gui_counts},
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

    def find(self, series: str) -> SeriesView | None:
        """A series by its key (`series_000001_r2`), or by number (the newest of that number)."""
        with self._lock:
            view = self.series.get(series)
            if view is None and series.isdigit():
                view = self._newest(int(series))
            return view

    def spots(self, key: str, frame: int) -> list:
        with self._lock:
            view = self.series.get(key)
            xy = view.spots.get(frame) if view else None
            if not xy:
                return []
            return [[round(x, 2), round(y, 2)] for x, y in zip(xy[::2], xy[1::2], strict=True)]

    def wait(self, version: int, timeout: float) -> int:
        with self._lock:
            if self.version == version:
                self.changed.wait(timeout)
            return self.version

    def master_file(self, series: int | str) -> str | None:
        view = self.find(str(series))
        return view.master_file if view else None

    def point(self, key: str, frame: int) -> dict | None:
        with self._lock:
            view = self.series.get(key)
            if view is None or frame not in view.frames:
                return None
            return dict(view.points[view.frames[frame]])


def _first_frame(view: SeriesView) -> int:
    return view.first_frame if view.first_frame is not None else 0
