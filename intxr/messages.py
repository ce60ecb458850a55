"""The messages between the pipeline's processes, as typed models: one definition each, used by the
readers, the Collector and the GUI.

- `FrameResult` (reader -> Collector -> record, GUI): one frame's result. The reader decides
  whether it is a hit (`is_hit`, with the processing section it used) and says so in `hit`;
  nobody downstream decides it again.
- `ReaderStatus` (reader -> Collector): a reader's placement and counters.
- `SeriesStart`, `SeriesEnd`, `SeriesWritten`, `SplitterCounters` (the Splitter's PUB, passed on
  by the Collector as `splitter_series_end`, `splitter_series_written`, `splitter`).
- `SeriesSummary` (Collector -> stdout SERIES line, record, GUI), computed by one `SeriesTally`:
  the Collector's account of a series and the GUI's live counts are the same code.

Every message comes from a socket anyone on the host can write to: `from_wire(dict)` checks each
field once and raises `BadMessage` naming the field; `to_wire()` gives the JSON object, with the
field names beamline scripts read (unchanged from the untyped messages) and unknown fields left
out. Our own messages carry their version in `htype` (`intxr-result-1.0`, `intxr-status-1.0`,
`intxr-summary-1.0`): a message of the same kind and another major version raises
`VersionMismatch` (the sender is of another intxr install), one with none is malformed (readers
and Collector are started together from one install, so there is no older sender to accept). The
Splitter's messages carry no htype: it is built from the same checkout, and they are validated by
their fields alone.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, fields

RESULT_HTYPE = "intxr-result-1.0"
STATUS_HTYPE = "intxr-status-1.0"
SUMMARY_HTYPE = "intxr-summary-1.0"
STATUSES = ("processed", "blank", "failed")
MAX_RANK = 1 << 16
MAX_SPOTS = 20_000  # spot centroids a result may carry (a reader sends the 500 strongest)
_REPEAT = re.compile(r"_r(\d+)$")


class BadMessage(ValueError):
    """A message that does not parse, lacks a field or has one of the wrong type; the text names it."""


class VersionMismatch(BadMessage):
    """A message of our kind but another major version (a sender of another intxr install)."""


# ---------------------------------------------------------------------------------------------
# Names


def series_key(series: int, name: str | None) -> str:
    """A series' key: the Splitter's `series_name` (unique per output directory), else its number."""
    return name or str(series)


def series_label(series: int, name: str | None) -> str:
    """`1`, or `1 r2` when the Splitter gave the series a repeat name (`series_000001_r2`)."""
    m = _REPEAT.search(name or "")
    return f"{series} r{m.group(1)}" if m else str(series)


def is_hit(status: str, n_spots: int | None, min_bragg_peaks: int) -> bool:
    """A hit: a processed frame with at least `min_bragg_peaks` spots (the processing section's
    `min_Bragg_peaks`, the section the reader used for the frame)."""
    return status == "processed" and (n_spots or 0) >= min_bragg_peaks


# ---------------------------------------------------------------------------------------------
# Field checks


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_json(body: bytes) -> dict:
    """A message body as a JSON object, else BadMessage."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadMessage(f"not JSON ({_show(bytes(body[:30]))}: {str(exc)[:80]})") from None
    if not isinstance(message, dict):
        raise BadMessage(f"JSON {type(message).__name__}, not an object")
    return message


def _object(body, what: str) -> dict:
    if not isinstance(body, dict):
        raise BadMessage(f"{what} is {_show(body)}, not an object")
    return body


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, key: str, *, required: bool = False, low: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        if required:
            raise BadMessage(f"no {key!r}")
        return None
    if not _is_int(value):
        raise BadMessage(f"{key!r} is {_show(value)}, not an integer")
    if low is not None and value < low:
        raise BadMessage(f"{key!r} is {value}, below {low}")
    return value


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value)):
        raise BadMessage(f"{key!r} is {_show(value)}, not a number")
    return value


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadMessage(f"{key!r} is {_show(value)}, not text")
    return value


def _bool(body: dict, key: str, *, required: bool = False) -> bool | None:
    value = body.get(key)
    if value is None and required:
        raise BadMessage(f"no {key!r}")
    if value is not None and not isinstance(value, bool):
        raise BadMessage(f"{key!r} is {_show(value)}, not true or false")
    return value


def _htype(body: dict, expected: str) -> None:
    htype = body.get("htype")
    if htype == expected:
        return
    kind, _, version = expected.rpartition("-")
    if htype is None:
        raise BadMessage(f"no 'htype' (expected {expected})")
    if not isinstance(htype, str) or not htype.startswith(kind + "-"):
        raise BadMessage(f"'htype' is {_show(htype)}, not {expected}")
    if htype.removeprefix(kind + "-").split(".")[0] != version.split(".")[0]:
        raise VersionMismatch(f"{htype!r:.60}: this intxr reads {expected} (a sender of another intxr install?)")


def _texts(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not (isinstance(value, list) and all(isinstance(e, str) for e in value)):
        raise BadMessage(f"{key!r} is {_show(value)}, not a list of text")
    return value


def _ranges(body: dict, name: str) -> RangeSet | None:
    """`<name>_ranges` ([[first, last], ...]), else the older `<name>_frames` list; None with neither."""
    ranges = body.get(f"{name}_ranges")
    if ranges is None:
        frames = body.get(f"{name}_frames")
        if frames is None:
            return None
        if not (isinstance(frames, list) and all(_is_int(f) for f in frames)):
            raise BadMessage(f"'{name}_frames' is {_show(frames)}, not a list of frame numbers")
        return RangeSet.of(frames)
    if not isinstance(ranges, list):
        raise BadMessage(f"'{name}_ranges' is {_show(ranges)}, not a list")
    for pair in ranges:
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair) and pair[0] <= pair[1]):
            raise BadMessage(f"'{name}_ranges' holds {_show(pair)}, not [first, last]")
    return RangeSet(ranges)


def _numbers(body: dict, key: str, n: int) -> list | None:
    value = body.get(key)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == n and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise BadMessage(f"{key!r} is {_show(value)}, not {n} numbers")
    return value


def _matrix(body: dict, key: str) -> list | None:
    value = body.get(key)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3):
        raise BadMessage(f"{key!r} is {_show(value)}, not a 3x3 matrix")
    for i in range(3):
        _numbers({key: value[i]}, key, 3)
    return value


def _lattices(body: dict) -> list | None:
    """Every crystal indexed on the frame, the result's own lattice first: at most 5 objects (the config's
    indexing_max_lattices bound), each checked as the result's own fields are."""
    value = body.get("lattices")
    if value is None:
        return None
    if not (isinstance(value, list) and 1 <= len(value) <= 5 and all(isinstance(v, dict) for v in value)):
        raise BadMessage(f"'lattices' is {_show(value)}, not a list of 1 to 5 lattices")
    for one in value:
        if _text(one, "lattice") is None or _text(one, "space_group") is None:
            raise BadMessage(f"'lattices' has {_show(one)}, without its lattice and space group")
        _numbers(one, "unit_cell", 6)
        _int(one, "n_indexed", low=0)
        _number(one, "rmsd_px")
        _matrix(one, "orientation_matrix")
    return value


def _spots(body: dict) -> list | None:
    value = body.get("spots_xy")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_SPOTS:
        raise BadMessage(f"'spots_xy' is {_show(value)}, not a list of [x, y]")
    for xy in value:
        if (not isinstance(xy, list) or len(xy) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in xy)):
            raise BadMessage(f"'spots_xy' holds {_show(xy)}, not [x, y]")
    return value


def scalars(body, what: str, clip: int | None = None) -> dict:
    """The numbers, text, booleans and nulls of a flat object (lists and objects left out); text
    and keys cut to `clip` characters when given."""
    body = _object(body, what)
    out = {}
    for key, value in body.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BadMessage(f"{what} {str(key)[:40]!r} is {value}, not a number")
        if value is None or isinstance(value, str | bool | int | float):
            out[str(key)[:clip]] = value[:clip] if isinstance(value, str) else value
    return out


def _wire(message, htype: str | None = None) -> dict:
    """A model's fields as JSON: None left out, the htype first."""
    out = {"htype": htype} if htype else {}
    for f in fields(message):
        value = getattr(message, f.name)
        if value is not None:
            out[f.name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Compact accounts: frame numbers as ranges, values in bins


class RangeSet:
    """A set of frame numbers as sorted, merged, inclusive ranges: results arrive nearly in
    order, so a series of 10^6 frames is a handful of ranges."""

    __slots__ = ("starts", "ends", "count")

    def __init__(self, ranges=()):
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.count = 0
        for first, last in ranges:
            self.add_range(first, last)

    @classmethod
    def of(cls, values) -> RangeSet:
        out = cls()
        for value in sorted(values):
            out.add_range(value, value)
        return out

    def __len__(self) -> int:
        return self.count

    def __contains__(self, value: int) -> bool:
        i = bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ends[i]

    def add(self, value: int) -> bool:
        """Add one number; False when it was there already."""
        return self.add_range(value, value) == 1

    def add_range(self, first: int, last: int) -> int:
        """Add [first, last]; the count of numbers that were not there yet."""
        if last < first:
            return 0
        i = bisect_left(self.ends, first - 1)  # the first range that ends at or after first - 1
        j = bisect_right(self.starts, last + 1)  # ranges before j start at or before last + 1
        if i >= j:
            self.starts.insert(i, first)
            self.ends.insert(i, last)
            self.count += last - first + 1
            return last - first + 1
        old = sum(e - s + 1 for s, e in zip(self.starts[i:j], self.ends[i:j], strict=True))
        start, end = min(first, self.starts[i]), max(last, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]
        added = (end - start + 1) - old
        self.count += added
        return added

    def ranges(self) -> list[list[int]]:
        return [[s, e] for s, e in zip(self.starts, self.ends, strict=True)]

    def union(self, other: RangeSet) -> RangeSet:
        return RangeSet(self.ranges() + other.ranges())

    def position(self, value: int) -> int | None:
        """How many numbers of the set come before `value` (its index on disk); None when absent."""
        i = bisect_right(self.starts, value) - 1
        if i < 0 or value > self.ends[i]:
            return None
        return sum(e - s + 1 for s, e in zip(self.starts[:i], self.ends[:i], strict=True)) + value - self.starts[i]

    def minus(self, other: RangeSet) -> RangeSet:
        """The numbers here that are not in `other`."""
        out = RangeSet()
        j = 0
        for start, end in zip(self.starts, self.ends, strict=True):
            cursor = start
            while j < len(other.starts) and other.ends[j] < cursor:
                j += 1
            k = j
            while k < len(other.starts) and other.starts[k] <= end and cursor <= end:
                if other.starts[k] > cursor:
                    out.add_range(cursor, other.starts[k] - 1)
                cursor = max(cursor, other.ends[k] + 1)
                k += 1
            if cursor <= end:
                out.add_range(cursor, end)
        return out


class Quantiles:
    """Counts in fixed bins (a linear step, or ~1% wide on a log scale): the median and p99 of a
    million values from a few hundred counters."""

    __slots__ = ("step", "log", "bins", "n")

    def __init__(self, step: float, log: bool = False):
        self.step, self.log = step, log
        self.bins: dict[int, int] = {}
        self.n = 0

    def add(self, value: float) -> None:
        if self.log:
            key = -(1 << 30) if value <= 0 else round(math.log(value) / math.log1p(self.step))
        else:
            key = round(value / self.step)
        self.bins[key] = self.bins.get(key, 0) + 1
        self.n += 1

    def _value(self, key: int) -> float:
        if self.log:
            return 0.0 if key == -(1 << 30) else math.exp(key * math.log1p(self.step))
        return key * self.step

    def at_rank(self, k: int) -> float | None:
        """The k-th smallest value (0-based), to the bin's resolution."""
        if not self.n:
            return None
        seen = 0
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen > k:
                return self._value(key)
        return self._value(max(self.bins))

    def median(self) -> float | None:
        return self.at_rank(self.n // 2)

    def p99(self) -> float | None:
        return self.at_rank(min(self.n - 1, int(0.99 * self.n))) if self.n else None


# ---------------------------------------------------------------------------------------------
# A frame's result


@dataclass
class FrameResult:
    """One frame's result, as the reader sends it (`intxr-result-1.0`). The Collector adds
    `latency` (seconds from the Splitter's receipt to the Collector's) and `line` (the result line)."""

    series: int
    frame: int
    status: str  # processed | blank (pre-screened) | failed
    hit: bool  # the reader's word: is_hit() with the section it used
    series_name: str | None = None
    rank: int | None = None
    processing_section: str | None = None  # the processing config section the reader used
    algorithm: str | None = None  # that section's spot-finding threshold algorithm
    n_spots: int | None = None
    n_overloads: int | None = None
    score: float | None = None
    hres: float | None = None
    n_ice_rings: int | None = None
    mean_shape_ratio: float | None = None
    n_strong_pixels: int | None = None
    n_spots_total: int | None = None
    errors: list[str] = field(default_factory=list)
    indexing: str | None = None  # indexed | not indexed | not asked (spotfinding mode) | not a hit | ...
    indexed: bool | None = None  # None: indexing was not tried
    n_indexed: int | None = None
    lattice: str | None = None  # Bravais lattice: aP, mP, mC, oP, oC, oF, oI, tP, tI, hP, hR, cP, cF, cI
    space_group: str | None = None  # the lattice's lowest-symmetry group, as the original reports it
    unit_cell: list | None = None  # [a, b, c, alpha, beta, gamma] (A, degrees)
    rmsd_px: float | None = None
    orientation_matrix: list | None = None  # A = UB, rows of a 3x3 (1/A, lab frame)
    lattices: list | None = None  # every crystal indexed (indexing_max_lattices > 1 finds more), this one first
    spots_xy: list | None = None  # centroids [x, y] of the strongest spots, for the GUI
    header: dict | None = None  # header values the result line and the GUI use
    master_file: str | None = None
    received: float | None = None  # when the Splitter had the frame (Unix time)
    timing: dict | None = None  # stage -> seconds
    done: float | None = None  # when the reader was done (Unix time)
    latency: float | None = None
    line: str | None = None

    @classmethod
    def from_wire(cls, body) -> FrameResult:
        body = _object(body, "result")
        _htype(body, RESULT_HTYPE)
        status = body.get("status")
        if status not in STATUSES:
            raise BadMessage(f"'status' is {_show(status)}, not one of {', '.join(STATUSES)}")
        header = body.get("header")
        if header is not None and not isinstance(header, dict):
            raise BadMessage(f"'header' is {_show(header)}, not an object")
        timing = body.get("timing")
        if timing is not None and not (isinstance(timing, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in timing.values())):
            raise BadMessage(f"'timing' is {_show(timing)}, not an object of seconds")
        return cls(
            series=_int(body, "series", required=True),
            frame=_int(body, "frame", required=True, low=0),
            status=status,
            hit=_bool(body, "hit", required=True),
            series_name=_text(body, "series_name"),
            rank=_int(body, "rank"),
            processing_section=_text(body, "processing_section"),
            algorithm=_text(body, "algorithm"),
            n_spots=_int(body, "n_spots", low=0),
            n_overloads=_int(body, "n_overloads", low=0),
            score=_number(body, "score"),
            hres=_number(body, "hres"),
            n_ice_rings=_int(body, "n_ice_rings", low=0),
            mean_shape_ratio=_number(body, "mean_shape_ratio"),
            n_strong_pixels=_int(body, "n_strong_pixels", low=0),
            n_spots_total=_int(body, "n_spots_total", low=0),
            errors=_texts(body, "errors"),
            indexing=_text(body, "indexing"),
            indexed=_bool(body, "indexed"),
            n_indexed=_int(body, "n_indexed", low=0),
            lattice=_text(body, "lattice"),
            space_group=_text(body, "space_group"),
            unit_cell=_numbers(body, "unit_cell", 6),
            rmsd_px=_number(body, "rmsd_px"),
            orientation_matrix=_matrix(body, "orientation_matrix"),
            lattices=_lattices(body),
            spots_xy=_spots(body),
            header=header,
            master_file=_text(body, "master_file"),
            received=_number(body, "received"),
            timing=timing,
            done=_number(body, "done"),
            latency=_number(body, "latency"),
            line=_text(body, "line"),
        )

    def to_wire(self) -> dict:
        return _wire(self, RESULT_HTYPE)


# ---------------------------------------------------------------------------------------------
# A reader's status


@dataclass
class ReaderStatus:
    """A reader's word about itself, every second (`intxr-status-1.0`)."""

    rank: int
    pid: int | None = None
    host: str | None = None
    cpus: list[int] | None = None
    cpu: int | None = None
    numa: int | None = None
    buffer_numa: int | None = None
    frames: int | None = None
    failed: int | None = None
    rate: float | None = None
    reconnects: int | None = None
    bad_replies: int | None = None
    time: float | None = None

    # What a status may change of the Collector's row of its rank (pid and host are the rank's
    # identity, checked against it; the rest of a row is the Collector's own).
    READER_FIELDS = ("cpus", "cpu", "numa", "buffer_numa", "frames", "failed", "rate", "reconnects",
                     "bad_replies", "time")

    @classmethod
    def from_wire(cls, body) -> ReaderStatus:
        body = _object(body, "status")
        _htype(body, STATUS_HTYPE)
        rank = _int(body, "rank", required=True, low=1)
        if rank >= MAX_RANK:
            raise BadMessage(f"'rank' {rank} is not a reader rank")
        cpus = body.get("cpus")
        if cpus is not None and not (isinstance(cpus, list) and all(_is_int(c) and c >= 0 for c in cpus)):
            raise BadMessage(f"'cpus' is {_show(cpus)}, not a list of CPU numbers")
        return cls(rank=rank, pid=_int(body, "pid", low=1), host=_text(body, "host"), cpus=cpus,
                   cpu=_int(body, "cpu", low=0), numa=_int(body, "numa"), buffer_numa=_int(body, "buffer_numa"),
                   frames=_int(body, "frames", low=0), failed=_int(body, "failed", low=0), rate=_number(body, "rate"),
                   reconnects=_int(body, "reconnects", low=0), bad_replies=_int(body, "bad_replies", low=0),
                   time=_number(body, "time"))

    def to_wire(self) -> dict:
        return _wire(self, STATUS_HTYPE)

    def reader_fields(self) -> dict:
        return {k: getattr(self, k) for k in self.READER_FIELDS if getattr(self, k) is not None}


# ---------------------------------------------------------------------------------------------
# The Splitter's messages (no htype: see the module's docstring)


@dataclass
class SeriesStart:
    series: int
    series_name: str | None = None
    time: float | None = None

    @classmethod
    def from_wire(cls, body) -> SeriesStart:
        body = _object(body, "series_start")
        return cls(_int(body, "series", required=True), _text(body, "series_name"), _number(body, "time"))

    def to_wire(self) -> dict:
        return _wire(self)


@dataclass
class SeriesEnd:
    """The Splitter's end of a series: what it received, and which frames it forwarded to readers
    or skipped (no reader free), as ranges."""

    series: int
    series_name: str | None = None
    timed_out: bool | None = None
    received: int | None = None
    forwarded: int | None = None
    skipped: int | None = None
    malformed: int | None = None
    forwarded_frames: RangeSet | None = None  # from `forwarded_ranges` (or the older `forwarded_frames`)
    skipped_frames: RangeSet | None = None
    bytes: int | None = None
    md5_mismatches: int | None = None
    time: float | None = None

    @classmethod
    def from_wire(cls, body) -> SeriesEnd:
        body = _object(body, "series_end")
        return cls(
            series=_int(body, "series", required=True), series_name=_text(body, "series_name"),
            timed_out=_bool(body, "timed_out"), received=_int(body, "received", low=0),
            forwarded=_int(body, "forwarded", low=0), skipped=_int(body, "skipped", low=0),
            malformed=_int(body, "malformed", low=0), forwarded_frames=_ranges(body, "forwarded"),
            skipped_frames=_ranges(body, "skipped"), bytes=_int(body, "bytes", low=0),
            md5_mismatches=_int(body, "md5_mismatches", low=0), time=_number(body, "time"),
        )

    def to_wire(self) -> dict:
        out = _wire(self)
        for name in ("forwarded", "skipped"):
            frames = out.pop(f"{name}_frames", None)
            if frames is not None:
                out[f"{name}_ranges"] = frames.ranges()
        return out

    @property
    def forwarded_set(self) -> RangeSet:
        return self.forwarded_frames or RangeSet()

    @property
    def skipped_set(self) -> RangeSet:
        return self.skipped_frames or RangeSet()

    @property
    def skipped_count(self) -> int:
        return len(self.skipped_frames) if self.skipped_frames is not None else self.skipped or 0

    def received_frames(self) -> RangeSet | None:
        """Every frame received (forwarded or skipped); None when the message names none."""
        if self.forwarded_frames is None and self.skipped_frames is None:
            return None
        return self.forwarded_set.union(self.skipped_set)


@dataclass
class SeriesWritten:
    """The Splitter closed a series' files."""

    series: int
    series_name: str | None = None
    frames_written: int | None = None
    master_file: str | None = None
    time: float | None = None

    @classmethod
    def from_wire(cls, body) -> SeriesWritten:
        body = _object(body, "series_written")
        return cls(_int(body, "series", required=True), _text(body, "series_name"),
                   _int(body, "frames_written", low=0), _text(body, "master_file"), _number(body, "time"))

    def to_wire(self) -> dict:
        return _wire(self)


@dataclass
class SplitterCounters:
    """The Splitter's counters (frames_received, frames_written, queued_bytes, last_error, ...):
    a flat object of numbers, text, booleans and nulls; its lists and objects (per-series lists,
    file lists) are left out of what is passed on."""

    values: dict

    @classmethod
    def from_wire(cls, body, what: str = "splitter counters") -> SplitterCounters:
        return cls(scalars(body, what))

    def to_wire(self) -> dict:
        return dict(self.values)


def splitter_event(topic: str, body) -> SeriesStart | SeriesEnd | SeriesWritten | SplitterCounters:
    """A message on the Splitter's PUB socket, by its topic."""
    kinds = {"series_start": SeriesStart, "series_end": SeriesEnd, "series_written": SeriesWritten,
             "counters": SplitterCounters}
    if topic not in kinds:
        raise BadMessage(f"unknown topic {_show(topic)}")
    return kinds[topic].from_wire(body)


# ---------------------------------------------------------------------------------------------
# A series' summary, and the tally it is computed from


@dataclass
class SeriesSummary:
    """A series summed up (`intxr-summary-1.0`): the SERIES line, the record's `summary`, the GUI's
    counts. Once the Collector has summed a series up, every frame of it is in exactly one of
    processed, blank, skipped, failed (lost frames, forwarded and never answered, count failed)."""

    series: int
    series_name: str | None = None
    received: int | None = None
    written: int | None = None
    processed: int = 0
    hits: int = 0
    blank: int = 0
    skipped: int | None = None
    failed: int = 0
    lost: int | None = None
    lost_ranges: list | None = None
    skipped_ranges: list | None = None
    hit_rate: float = 0.0
    median_hres: float | None = None
    rate: float | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None
    master_file: str | None = None
    timed_out: bool = False

    @property
    def label(self) -> str:
        return series_label(self.series, self.series_name)

    @classmethod
    def from_wire(cls, body) -> SeriesSummary:
        body = _object(body, "summary")
        _htype(body, SUMMARY_HTYPE)
        ranges = {}
        for name in ("lost", "skipped"):
            found = _ranges(body, name)
            ranges[name] = found.ranges() if found is not None else None
        return cls(
            series=_int(body, "series", required=True), series_name=_text(body, "series_name"),
            received=_int(body, "received", low=0), written=_int(body, "written", low=0),
            processed=_int(body, "processed", low=0) or 0, hits=_int(body, "hits", low=0) or 0,
            blank=_int(body, "blank", low=0) or 0, skipped=_int(body, "skipped", low=0),
            failed=_int(body, "failed", low=0) or 0, lost=_int(body, "lost", low=0),
            lost_ranges=ranges["lost"], skipped_ranges=ranges["skipped"],
            hit_rate=_number(body, "hit_rate") or 0.0, median_hres=_number(body, "median_hres"),
            rate=_number(body, "rate"), latency_p50=_number(body, "latency_p50"),
            latency_p99=_number(body, "latency_p99"), master_file=_text(body, "master_file"),
            timed_out=bool(_bool(body, "timed_out")),
        )

    def to_wire(self) -> dict:
        out = {"htype": SUMMARY_HTYPE}
        out.update((f.name, getattr(self, f.name)) for f in fields(self))
        return out

    def line(self) -> str:
        """The SERIES line on stdout."""
        rate = f"{self.rate:.1f} frames/s" if self.rate else "rate n/a"
        lat = (f"latency p50 {self.latency_p50:.3f} s p99 {self.latency_p99:.3f} s" if self.latency_p50 is not None
               else "latency n/a")
        hres = f"{self.median_hres:.2f} A" if self.median_hres is not None else "n/a"
        return (
            f"SERIES {self.label}: received {self.received if self.received is not None else '?'}, "
            f"written {self.written if self.written is not None else '?'}, "
            f"processed {self.processed} (hits {self.hits}, median hres {hres}), blank {self.blank}, "
            f"skipped {self.skipped if self.skipped is not None else '?'}, failed {self.failed}; {rate}, {lat}"
        )



@dataclass
class SeriesTally:
    """The results of one series as they come: which frames, how many of each status, the hits,
    binned hres and latencies, the first and last time. A few kilobytes for 10^6 frames."""

    series: int
    name: str
    results: RangeSet = field(default_factory=RangeSet)  # every frame with a result
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    hits: int = 0
    hres: Quantiles = field(default_factory=lambda: Quantiles(0.01))
    latencies: Quantiles = field(default_factory=lambda: Quantiles(0.01, log=True))
    first: float | None = None
    last: float | None = None

    def add(self, frame: int, status: str, hit: bool, hres: float | None = None, latency: float | None = None,
            at: float | None = None) -> bool:
        """Count one result (hres is kept for hits only); False, counting nothing, for a frame
        that has one already."""
        if not self.results.add(frame):
            return False
        self.counts[status] += 1
        if hit and status == "processed":
            self.hits += 1
            if hres and 0 < hres < 99:
                self.hres.add(hres)
        if latency is not None:
            self.latencies.add(latency)
        if at is not None:
            self.first = at if self.first is None else min(self.first, at)
            self.last = at if self.last is None else max(self.last, at)
        return True

    def add_result(self, result: FrameResult, at: float | None = None) -> bool:
        return self.add(result.frame, result.status, result.hit, result.hres, result.latency, at)

    def summary(self, end: SeriesEnd | None = None, written: int | None = None, master_file: str | None = None,
                final: bool = True) -> SeriesSummary:
        """The summary: `final` (the Collector's, the series over) counts frames forwarded without
        a result as lost and failed; a live one (the GUI's, results still coming) does not."""
        n = len(self.results)
        lost = (end.forwarded_set if end is not None else RangeSet()).minus(self.results) if final else None
        skipped = end.skipped_set if end is not None else RangeSet()
        elapsed = self.last - self.first if self.first is not None and self.last is not None else 0.0
        received = end.received if end is not None and end.received is not None else (n if final else None)
        return SeriesSummary(
            series=self.series,
            series_name=self.name,
            received=received,
            written=written,
            processed=self.counts["processed"],
            hits=self.hits,
            blank=self.counts["blank"],
            skipped=end.skipped_count if end is not None else (0 if final else None),
            failed=self.counts["failed"] + (len(lost) if lost is not None else 0),
            lost=len(lost) if lost is not None else None,
            lost_ranges=lost.ranges() if lost is not None else None,
            skipped_ranges=skipped.ranges() if final or end is not None else None,
            hit_rate=self.hits / n if n else 0.0,
            median_hres=self.hres.median(),
            rate=(n - 1) / elapsed if elapsed > 0 and n > 1 else None,
            latency_p50=self.latencies.median(),
            latency_p99=self.latencies.p99(),
            master_file=master_file,
            timed_out=bool(end.timed_out) if end is not None else False,
        )
