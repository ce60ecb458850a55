"""What the GUI shows, kept apart from how it is drawn: one `SeriesView` per series (run) with its
results in arrival order, counts, raster layout; the Splitter's counters; per-rank health.

Results may arrive far faster than anyone can draw them: the model only appends and bumps a
version number, and each browser session asks at its own pace for what is new since its last
update (`series_since` for the series it shows, `rows_since` for the series list, `status_since`,
`timeline_since`), so bursts are coalesced into one update per draw and an update's cost follows
what is new, not how many series have finished. `delta` gives everything at once (scripts, tests).

Series are keyed by the Splitter's `series_name` (unique per output directory: a second series 1
after a detector restart is `series_000001_r2`, its own tab `1 r2`), else by the series number.
Every message comes from a socket anyone on the host can write to: `add_result` / `add_event`
read it with its model in intxr.messages (`BadMessage` otherwise) before anything is stored, so
one bad message can never break the views built from the good ones. Hits are the readers' word
(`hit` in each result) and the counts are intxr.messages' `SeriesTally` summary, the Collector's
own code, until the Collector's SERIES summary replaces them: nothing here decides them again.

Indexing, as readers report it per frame (`indexed`, `lattice`, `space_group`, `unit_cell`, ...), is summed up per
series in an `IndexingTally`: frames indexed, and per lattice and space group how many and a bounded sample of
their cells (median and spread). The orientation matrix of the latest indexed frames is kept, as their spots
are, for the frame view's predicted spots.
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from intxr.messages import (
    BadMessage,
    FrameResult,
    SeriesEnd,
    SeriesSummary,
    SeriesTally,
    SeriesWritten,
    SplitterCounters,
    scalars,
    series_key,
    series_label,
)
from intxr.raster import grid_cell, place

# Fields of a result the views need; the rest (spot lists, timings) stays out of the live feed.
# `indexed` costs a point nothing: 10 keys fit the dict's table as 9 do.
POINT_FIELDS = ("frame", "n_spots", "hres", "score", "status", "hit", "rank", "latency", "indexed")
MAX_SERIES = 20  # series kept in memory, newest first; older ones are dropped and counted
MAX_LISTED = 2000  # series in the series list (their counts only): a run of days stays searchable
TIMELINE_BINS = 1800  # one-second bins of the rates over time: the last half hour
# The resolution histogram's bins: equal in 1/d from 0 to 1 / 1.0 A (a hit's hres beyond falls in the last)
RESOLUTION_BINS = 25
RESOLUTION_MAX_DSTAR = 1.0
MAX_SPOT_FRAMES = 2000  # frames per series whose spots are kept for the frame view
# Spot centroids kept in all, as float32 pairs (8 bytes a spot; as JSON-decoded lists they took
# ~130): beyond it the oldest series' oldest frames lose their circles first. A run of weeks levels
# off here instead of growing with every spot of every series kept.
MAX_SPOT_BYTES = 24 << 20
MAX_CRYSTALS = 200  # crystals of a series kept for the map, strongest first
CRYSTAL_NUMBERS = ("x", "y", "width", "height", "left", "top", "score", "n_frames", "best_frame", "best_x", "best_y")
MAX_TEXT = 300  # characters kept of any text from a message (errors, names)
MAX_RANGES_SHOWN = 8
MAX_LATTICES = 12  # (lattice, space group) rows per series; further ones are counted as other
MAX_CELLS = 500  # cells kept per row: a uniform sample of all (reservoir), for the median and spread
MAX_NAME = 16  # characters of a lattice or space group name
BRAVAIS = frozenset({"aP", "mP", "mC", "oP", "oC", "oF", "oI", "tP", "tI", "hP", "hR", "cP", "cF", "cI"})

__all__ = ["BadMessage", "RunModel", "SeriesCursor", "SeriesView", "grid_position"]


def _clip(text: str | None) -> str | None:
    return text[:MAX_TEXT] if text is not None else None


def _nbytes(xy: array | None) -> int:
    return 0 if xy is None else xy.itemsize * len(xy)


def grid_position(
    mapping, frame: int, row_length: int | None, first_frame: int, snake: bool = False
) -> tuple[int, int] | None:
    """(row, column) of a frame in a raster, as the Collector places it for its crystals
    (intxr.raster): from a `mapping` header value naming it (`row 3 col 7`, `3,7`, `3x7`, ...),
    else from a row length (frames in order, row by row), else None."""
    cell = grid_cell(mapping)
    if cell is not None:
        return cell
    if row_length:
        return place(frame, first_frame, row_length, snake)
    return None


def show_ranges(ranges: list) -> str:
    """`[[3, 5], [9, 9]]` as `3-5, 9`; a long list is cut (a 10^6-frame series may have many)."""
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:MAX_RANGES_SHOWN])
    return text + (f", ... ({len(ranges)} ranges)" if len(ranges) > MAX_RANGES_SHOWN else "")


@dataclass
class LatticeRow:
    count: int = 0
    cells: array = field(default_factory=lambda: array("f"))  # a, b, c, alpha, beta, gamma: a sample


class IndexingTally:
    """A series' indexing: frames tried and indexed, and per (lattice, space group) the frames and a uniform sample
    of at most MAX_CELLS cells, so kilobytes whatever the series' length. Each frame counts once (its first
    result), as SeriesTally counts it."""

    def __init__(self):
        self.tried = 0
        self.indexed = 0
        self.rows: dict[tuple[str, str], LatticeRow] = {}
        self.other = 0  # indexed frames beyond MAX_LATTICES rows
        self._rng = random.Random(0)  # the sample's choice; reproducible
        self._summary: list | None = None

    def add(self, result: FrameResult) -> None:
        if result.indexed is None or result.status != "processed":
            return
        self.tried += 1
        if not result.indexed:
            return
        self.indexed += 1
        self._summary = None
        key = (_name(result.lattice), _name(result.space_group))
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= MAX_LATTICES:
                self.other += 1
                return
            row = self.rows[key] = LatticeRow()
        row.count += 1
        cell = result.unit_cell
        if cell is None:
            return
        if len(row.cells) < 6 * MAX_CELLS:
            row.cells.extend(float(v) for v in cell)
        else:  # reservoir sampling: every cell so far equally likely kept
            j = self._rng.randrange(row.count)
            if j < MAX_CELLS:
                row.cells[6 * j : 6 * j + 6] = array("f", (float(v) for v in cell))

    def lattices(self) -> list[dict]:
        """Rows, most frames first: lattice, space group, frames, fraction of the indexed, and the median cell
        with its spread (the interquartile range / 1.349: a standard deviation for normally scattered cells, not
        moved by a few wrong ones), over the kept sample."""
        if self._summary is None:
            rows = []
            for (lattice, group), row in sorted(self.rows.items(), key=lambda kv: -kv[1].count):
                entry = {
                    "lattice": lattice,
                    "space_group": group,
                    "frames": row.count,
                    "fraction": round(row.count / self.indexed, 4) if self.indexed else 0.0,
                    "cell": None,
                    "cell_spread": None,
                    "cells_used": len(row.cells) // 6,
                }
                if row.cells:
                    cells = np.frombuffer(row.cells, dtype=np.float32).reshape(-1, 6).astype(np.float64)
                    q1, median, q3 = np.percentile(cells, [25, 50, 75], axis=0)
                    entry["cell"] = [round(float(v), 2) for v in median]
                    entry["cell_spread"] = [round(float(v), 2) for v in (q3 - q1) / 1.349]
                rows.append(entry)
            self._summary = rows
        return self._summary

    def summary(self, hits: int, frames: int) -> dict:
        return {
            "tried": self.tried,
            "indexed": self.indexed,
            "rate_of_hits": round(self.indexed / hits, 4) if hits else None,
            "rate_of_frames": round(self.indexed / frames, 4) if frames else None,
            "lattices": self.lattices(),
            "other": self.other,
        }


def _name(text: str | None) -> str:
    """A lattice or space group name from a message, kept short (and shared: one string per name)."""
    return sys.intern(text[:MAX_NAME]) if text else "?"


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
    # frame -> (lattice, space group, 17 doubles: unit cell, rmsd_px, n_indexed, A) of the latest indexed frames,
    # for the frame view
    indexed_frames: dict[int, tuple[str, str, array]] = field(default_factory=dict)
    indexing: IndexingTally = field(default_factory=IndexingTally)
    tally: SeriesTally | None = None  # the live counts, as the Collector counts them
    master_file: str | None = None
    summary: SeriesSummary | None = None  # the Collector's SERIES summary
    end: SeriesEnd | None = None  # the Splitter's series_end: counts and the received frames
    written: int | None = None
    first_frame: int | None = None
    crystals: list[dict] | None = None  # the Collector's crystals of a raster series (its `raster`)
    crystals_version: int = 0
    version: int = 0  # model version of the last change
    replaced: list[int] = field(default_factory=list)  # indexes in points of repeated frames, in order
    resolution: list[int] = field(default_factory=lambda: [0] * RESOLUTION_BINS)  # hits per 1/d bin
    latest_hit: int | None = None  # frame: the frame view shows it while nothing is picked

    def __post_init__(self):
        self.tally = self.tally or SeriesTally(self.series, self.key)

    @property
    def label(self) -> str:
        return series_label(self.series, self.name)

    def counts(self) -> dict:
        """The Collector's summary once it came (frames whose reader died are failed there), else
        the same summary computed live from the results so far."""
        counts = self.tally.summary(self.end, self.written, self.master_file, final=False).to_wire()
        if self.summary is not None:  # what it does not know (written, when that came later) stays
            counts.update((k, v) for k, v in self.summary.to_wire().items() if v is not None)
        del counts["htype"]
        counts.update(name=self.name, label=self.label, results=len(self.points), ended=self.summary is not None)
        for key in ("lost_ranges", "skipped_ranges"):  # the frames named, as text
            if counts[key] is not None:
                counts[key] = show_ranges(counts[key])
            else:
                del counts[key]
        return counts

    def disk_index(self, frame: int) -> int | None:
        """Where `frame` is in the series' files: its position among the received frames once the
        series has ended, else counted from the first frame seen; None when it is not there."""
        received = self.end.received_frames() if self.end is not None else None
        if received is not None:
            return received.position(frame)
        first = self.first_frame if self.first_frame is not None else 0
        if frame < first:
            return None
        return frame - first


class RunModel:
    """Thread-safe: a subscriber thread feeds it, request threads read it."""

    def __init__(self, row_length: int | None = None, snake: bool = False):
        self.row_length = row_length
        self.snake = snake  # rows of raster_row_length frames alternate direction, as the Collector reads them
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
        self.by_order: dict[int, SeriesView] = {}  # the kept views by creation number (a key may change)
        # The series list: order -> version of its last change, the most recent last; rows of
        # series no longer kept are frozen in `_listed`.
        self._row_changes: OrderedDict[int, int] = OrderedDict()
        self._listed: dict[int, dict] = {}
        self.list_version = 0  # a series added to or removed from the list
        self.status_version = 0  # health, splitter, errors, bad messages
        self._bins: deque[tuple] = deque(maxlen=TIMELINE_BINS)  # (t, results, hits, tried, indexed)
        self.bins_total = 0  # bins closed so far
        self._bin = [0.0, 0, 0, 0, 0]  # the second being counted
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def _touch(self, view: SeriesView | None = None, status: bool = False) -> None:
        self.version += 1
        if view is not None:
            view.version = self.version
            self._row_changes[view.order] = self.version
            self._row_changes.move_to_end(view.order)
        if status:
            self.status_version = self.version
        self.changed.notify_all()

    def _view(self, number: int, name: str | None) -> SeriesView:
        """The series a message belongs to: by `series_name`, else the newest view of that number."""
        name = _clip(name) or None
        if name is not None:
            view = self.series.get(name)
            if view is not None:
                return view
            # A view opened by messages without the name (an older sender) takes it.
            newest = self._newest(number)
            if newest is not None and newest.name is None and newest.key == series_key(number, None):
                del self.series[newest.key]
                newest.key = newest.name = newest.tally.name = name
                self.series[name] = newest
                return newest
        else:
            newest = self._newest(number)
            if newest is not None:
                return newest
        key = series_key(number, name)
        self._created += 1
        view = self.series[key] = SeriesView(number, key=key, name=name, order=self._created)
        self.by_order[view.order] = view
        self.list_version = self.version + 1
        while len(self.series) > MAX_SERIES:
            oldest = self.series.pop(min(self.series.values(), key=lambda v: v.order).key)
            del self.by_order[oldest.order]
            self._listed[oldest.order] = self._row(oldest)  # its counts stay in the list
            self._spot_bytes -= sum(_nbytes(xy) for xy in oldest.spots.values())
            self.series_dropped += 1
        while len(self._row_changes) + (view.order not in self._row_changes) > MAX_LISTED:
            gone = min(self._row_changes)
            del self._row_changes[gone]
            self._listed.pop(gone, None)
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

    @staticmethod
    def _keep_crystal(view: SeriesView, frame: int, crystal: tuple | None) -> None:
        """The latest MAX_SPOT_FRAMES indexed frames' crystals (a frame's later result replaces its own)."""
        view.indexed_frames.pop(frame, None)
        if crystal is not None:
            view.indexed_frames[frame] = crystal
            while len(view.indexed_frames) > MAX_SPOT_FRAMES:
                del view.indexed_frames[next(iter(view.indexed_frames))]

    def _newest(self, number: int) -> SeriesView | None:
        views = [v for v in self.series.values() if v.series == number]
        return max(views, key=lambda v: v.order) if views else None

    def bad_message(self, text: str) -> None:
        with self._lock:
            self.bad_messages += 1
            self.last_bad = text[:MAX_TEXT]
            self._touch(status=True)

    def note(self, what: str) -> None:
        """Count something the server saw (a dropped browser, a refused request): shown, not said."""
        with self._lock:
            self.gui_counts[what] = self.gui_counts.get(what, 0) + 1
            self.status_version = self.version = self.version + 1

    def add_result(self, body) -> None:
        result = FrameResult.from_wire(body)
        point = {key: getattr(result, key) for key in POINT_FIELDS}
        mapping = (result.header or {}).get("mapping")
        spots = array("f", [v for xy in result.spots_xy or () for v in xy])
        errors = [e[:MAX_TEXT] for e in result.errors]
        frame = result.frame
        crystal = _crystal(result)
        with self._lock:
            view = self._view(result.series, result.series_name)
            self.received += 1
            point["v"] = self.version + 1
            if frame in view.frames:
                view.points[view.frames[frame]] = point
                view.replaced.append(view.frames[frame])
            else:
                view.frames[frame] = len(view.points)
                view.points.append(point)
            first = view.tally.add_result(result, result.done)
            if first:
                view.indexing.add(result)
                self._count_bin(result)
                if result.hit and result.status == "processed" and result.hres and 0 < result.hres < 99:
                    view.resolution[_resolution_bin(result.hres)] += 1
            if result.hit and result.status == "processed" and (view.latest_hit is None or frame > view.latest_hit):
                view.latest_hit = frame
            view.first_frame = frame if view.first_frame is None else min(view.first_frame, frame)
            if isinstance(mapping, str) and mapping:
                view.mappings[frame] = mapping[:MAX_TEXT]
            self._keep_spots(view, frame, spots)
            self._keep_crystal(view, frame, crystal)
            view.master_file = view.master_file or _clip(result.master_file)
            failed = result.status == "failed" and bool(errors)
            if failed:
                self.errors = (self.errors + errors)[-50:]
            self._touch(view, status=failed)

    def add_event(self, topic: str, body) -> None:
        if topic == "series":
            event = SeriesSummary.from_wire(body)
        elif topic == "splitter_series_end":
            event = SeriesEnd.from_wire(body)
        elif topic == "splitter_series_written":
            event = SeriesWritten.from_wire(body)
        elif topic == "splitter":
            event = SplitterCounters.from_wire(body)
        elif topic == "health":
            event = self._health(body)
        elif topic == "raster":
            event = self._raster(body)
        else:
            raise BadMessage(f"unknown topic {topic!r}")
        with self._lock:
            view = None
            if isinstance(event, SeriesSummary):
                view = self._view(event.series, event.series_name)
                view.summary = event
                view.master_file = _clip(event.master_file) or view.master_file
            elif isinstance(event, SeriesEnd):
                view = self._view(event.series, event.series_name)
                view.end = event
            elif isinstance(event, SeriesWritten):
                view = self._view(event.series, event.series_name)
                view.written = event.frames_written
                view.master_file = _clip(event.master_file) or view.master_file
            elif isinstance(event, tuple) and event[0] == "raster":
                _, series, name, crystals = event
                view = self._view(series, name)
                view.crystals = crystals
                view.crystals_version = self.version + 1
            elif isinstance(event, SplitterCounters):
                self.splitter = scalars(event.values, "splitter counters", MAX_TEXT)
                if self.splitter.get("last_error"):
                    error = f"splitter: {self.splitter['last_error']}"
                    if not self.errors or self.errors[-1] != error:
                        self.errors = (self.errors + [error])[-50:]
            else:
                self.health, splitter = event
                if splitter is not None:
                    self.splitter = splitter
            self._touch(view, status=view is None)

    @staticmethod
    def _raster(body) -> tuple:
        """The Collector's crystals of a raster series (intxr.raster.RasterReport.to_wire): the
        numbers the map draws, each checked; at most MAX_CRYSTALS, strongest first."""
        if not isinstance(body, dict):
            raise BadMessage(f"raster is {str(body)[:40]!r}, not an object")
        series = body.get("series")
        name = body.get("series_name")
        crystals = body.get("crystals")
        if not isinstance(series, int) or isinstance(series, bool) or not (name is None or isinstance(name, str)):
            raise BadMessage("raster: no series")
        if not isinstance(crystals, list):
            raise BadMessage(f"raster 'crystals' is {str(crystals)[:40]!r}, not a list")
        out = []
        for crystal in crystals[:MAX_CRYSTALS]:
            row = scalars(crystal, "a raster crystal", MAX_TEXT)
            for key in CRYSTAL_NUMBERS:
                value = row.get(key)
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise BadMessage(f"a raster crystal's {key!r} is {str(value)[:40]!r}, not a number")
            out.append({k: row.get(k) for k in (*CRYSTAL_NUMBERS, "d_min", "n_spots")})
        return "raster", series, _clip(name), out

    @staticmethod
    def _health(body) -> tuple[dict, dict | None]:
        """The Collector's health (`Collector.health`): per-rank rows (`dead`, `lost`, `starting`,
        `given_up`, `restarts`, ...) plus the job's state (`readers_alive`, `no_readers`,
        `no_readers_for`, `reader_restarts`, `job_restarts`, `malformed_results`, ...); every field
        optional. With the Splitter's counters it holds, when it holds them."""
        health = scalars(body, "health", MAX_TEXT)
        ranks = body.get("ranks") or []
        if not isinstance(ranks, list):
            raise BadMessage(f"health 'ranks' is {str(ranks)[:40]!r}, not a list")
        rows = []
        for rank in ranks:
            row = scalars(rank, "a health rank", MAX_TEXT)
            if not isinstance(row.get("rank"), int) or isinstance(row.get("rank"), bool):
                raise BadMessage(f"a health rank's 'rank' is {str(row.get('rank'))[:40]!r}, not an integer")
            rows.append(row)
        health.pop("splitter", None)
        health["ranks"] = rows
        splitter = body.get("splitter")
        if splitter is not None:
            splitter = scalars(splitter, "health's splitter counters", MAX_TEXT)
        return health, splitter

    def delta(self, since: int, points: bool = True) -> dict:
        """Everything a view holding version `since` lacks: new points per series (none without
        `points`), and the small state (counts, health) in full; a series' grid only when it changed."""
        with self._lock:
            series = []
            for view in sorted(self.series.values(), key=lambda v: v.order, reverse=True):  # newest first
                if not points:
                    new = []
                elif since:
                    new = [p for p in view.points if p["v"] > since]
                else:
                    new = list(view.points)
                entry = {
                    "key": view.key,
                    "series": view.series,
                    "label": view.label,
                    "points": new,
                    "counts": view.counts(),
                }
                if not since or view.version > since:
                    entry["grid"] = self._grid(view)
                    entry["crystals"] = view.crystals or []
                    entry["indexing"] = view.indexing.summary(entry["counts"]["hits"], entry["counts"]["results"])
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
            }

    def _grid(self, view: SeriesView) -> dict[str, tuple[int, int]]:
        grid = {}
        for frame in view.frames:
            pos = grid_position(view.mappings.get(frame), frame, self.row_length, _first_frame(view), self.snake)
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

    def crystal(self, key: str, frame: int) -> dict | None:
        """An indexed frame's crystal as kept (None when not indexed, or no longer kept): lattice, space group,
        unit cell, rmsd_px, n_indexed and the orientation matrix (rows)."""
        with self._lock:
            view = self.series.get(key)
            kept = view.indexed_frames.get(frame) if view else None
        if kept is None:
            return None
        lattice, group, v = kept
        return {
            "lattice": lattice,
            "space_group": group,
            "unit_cell": [round(x, 3) for x in v[:6]],
            "rmsd_px": None if v[6] != v[6] else round(v[6], 3),
            "n_indexed": None if v[7] < 0 else int(v[7]),
            "orientation_matrix": [list(v[8:11]), list(v[11:14]), list(v[14:17])],
        }

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

    # ---- what a browser session lacks since its last update -----------------------------------------------

    @staticmethod
    def _row(view: SeriesView) -> dict:
        """The series list's row: a few counts, cheap enough to make at every change."""
        tally = view.tally
        return {
            "order": view.order,
            "key": view.key,
            "label": view.label,
            "results": len(view.points),
            "hits": tally.hits,
            "indexed": view.indexing.indexed,
            "crystals": len(view.crystals or ()),
            "ended": view.summary is not None,
        }

    def rows_since(self, since: int) -> tuple[list[dict], int]:
        """Rows of the series list changed after version `since`, most recent first (only those are
        looked at: the changes are kept in the order they happened), and the version they are of."""
        with self._lock:
            rows = []
            for order in reversed(self._row_changes):
                if self._row_changes[order] <= since:
                    break
                view = self.by_order.get(order)
                rows.append(self._row(view) if view is not None else self._listed[order])
            return rows, self.version

    def listed(self) -> tuple[list[dict], int]:
        """The whole series list, newest first (a session builds its table from it once per new series),
        and the version it is of."""
        with self._lock:
            rows = []
            for order in sorted(self._row_changes, reverse=True):
                view = self.by_order.get(order)
                rows.append(self._row(view) if view is not None else self._listed[order])
            return rows, self.version

    def status_since(self, since: int) -> dict | None:
        """Health, the Splitter's counters, errors and what the GUI counted; None when unchanged."""
        with self._lock:
            if self.status_version <= since:
                return None
            return {
                "version": self.status_version,
                "splitter": dict(self.splitter),
                "health": dict(self.health),
                "errors": self.errors[-10:],
                "series_dropped": self.series_dropped,
                "gui": {"bad_messages": self.bad_messages, "last_bad": self.last_bad, **self.gui_counts},
            }

    def series_since(self, order: int, cursor: SeriesCursor, details: bool = True) -> dict | None:
        """What a session showing series `order` lacks: points after the `cursor.points` it has, the
        repeats since, their raster cells, and (with `details`) counts, indexing, histogram and crystals
        when they changed. Advances the cursor; None when the series is no longer kept."""
        with self._lock:
            view = self.by_order.get(order)
            if view is None:
                return None
            first = _first_frame(view)
            out: dict = {"regrid": first != cursor.first_frame and cursor.points > 0}
            if out["regrid"]:  # an earlier frame came: every cell moves (rare; the whole grid again)
                cursor.points = 0
                cursor.replaced = len(view.replaced)
            new = view.points[cursor.points :]
            out["start"] = cursor.points
            out["points"] = new
            out["replaced"] = [(i, view.points[i]) for i in view.replaced[cursor.replaced :] if i < cursor.points]
            out["cells"] = [
                grid_position(view.mappings.get(p["frame"]), p["frame"], self.row_length, first, self.snake)
                for p in new
            ]
            out["replaced_cells"] = [
                grid_position(view.mappings.get(p["frame"]), p["frame"], self.row_length, first, self.snake)
                for _, p in out["replaced"]
            ]
            cursor.points, cursor.replaced, cursor.first_frame = len(view.points), len(view.replaced), first
            if details and view.version > cursor.version:
                counts = view.counts()
                out["counts"] = counts
                out["indexing"] = view.indexing.summary(counts["hits"], counts["results"])
                out["resolution"] = list(view.resolution)
                out["latest_hit"] = view.latest_hit
                cursor.version = view.version
            if details and view.crystals_version > cursor.crystals:
                out["crystals"] = list(view.crystals or ())
                cursor.crystals = view.crystals_version
            return out

    def _count_bin(self, result: FrameResult) -> None:
        now = time.time()
        self._close_bins(now)
        b = self._bin
        b[1] += 1
        if result.hit and result.status == "processed":
            b[2] += 1
            if result.indexed is not None:
                b[3] += 1
                b[4] += bool(result.indexed)

    def _close_bins(self, now: float) -> None:
        second = math.floor(now)
        if self._bin[0] == second:
            return
        if self._bin[1]:
            if self._bins and self._bin[0] - self._bins[-1][0] > 1:  # a pause: a gap in the lines, not zeros
                self._bins.append((self._bin[0] - 1, 0, 0, 0, 0))
                self.bins_total += 1
            self._bins.append(tuple(self._bin))
            self.bins_total += 1
        self._bin = [second, 0, 0, 0, 0]

    def timeline_since(self, total: int) -> tuple[list[tuple], int]:
        """Seconds closed after the first `total` (at most the bins kept), and the new total."""
        with self._lock:
            self._close_bins(time.time())
            n = min(self.bins_total - total, len(self._bins))
            return (list(self._bins)[len(self._bins) - n :] if n > 0 else []), self.bins_total


@dataclass
class SeriesCursor:
    """How far a session has shown one series (RunModel.series_since moves it on)."""

    points: int = 0
    replaced: int = 0
    version: int = 0
    crystals: int = 0
    first_frame: int | None = None


def _resolution_bin(hres: float) -> int:
    return min(RESOLUTION_BINS - 1, int(1.0 / hres / RESOLUTION_MAX_DSTAR * RESOLUTION_BINS))


def resolution_edges() -> list[float]:
    """The histogram's bin edges in 1/d (1/A)."""
    return [RESOLUTION_MAX_DSTAR * k / RESOLUTION_BINS for k in range(RESOLUTION_BINS + 1)]


def _crystal(result: FrameResult) -> tuple[str, str, array] | None:
    """What the frame view needs of an indexed frame, compact: None unless indexed with a matrix and a cell."""
    if not result.indexed or result.orientation_matrix is None or result.unit_cell is None:
        return None
    values = [
        *result.unit_cell,
        result.rmsd_px if result.rmsd_px is not None else float("nan"),
        result.n_indexed if result.n_indexed is not None else -1,
        *(v for row in result.orientation_matrix for v in row),
    ]
    return _name(result.lattice), _name(result.space_group), array("d", (float(v) for v in values))


def _first_frame(view: SeriesView) -> int:
    return view.first_frame if view.first_frame is not None else 0
