"""Crystals in a raster (grid) scan: where they are, how big and how good, from the per-frame
results of one series.

A raster series is one whose frames were processed with a raster section (`rastering`, the run
mode the header names) or whose frames carry a grid position. Each frame's cell on the grid comes
from, in this order:
- its `mapping` header value, when that names one: `row 3 col 7`, `rastering.row3.col7`, `r3c7`,
  `3,7`, `3x7` (row, then column, counted from 0);
- else the frame's place in the series and the configured row length (`raster_row_length`),
  rows one after the other from the series' first frame, every other row backwards when the scan
  is a snake (serpentine) scan;
- else the series is one row (a line scan): the column is the frame's place in the series.

A crystal is an 8-connected region of hit cells (a hit: the reader's word, `hit`, or a score at
least `min_score` when one is set). For each: the centre of mass weighted by score (x the column,
y the row, in grid cells counted from 0; plain mean when no frame of it scored above 0), the
bounding box's width and height in cells, the best score and its frame and cell, the number of
frames, the total spots, the median resolution (hres) of its frames with one, and the indexed cell
of its best indexed frame when the reader indexed. Crystals are listed strongest first: by best
score, then total spots, then number of frames.

The line BluIce gets, once per raster series (Tcl lists, as the result line):
`RASTER: series N crystals K {x y width height score n_frames d_min n_spots best_frame best_x best_y
{sg a b c alpha beta gamma}} ...` with `{}` for the cell where nothing was indexed.

Two raster series over one sample at orthogonal orientations (their `mapping` values name an
`omega`: `row 3 col 7 omega 90`, `rastering.row3.col7.omega90`, at most 5 degrees off 90 apart),
the second summed up right after the first, are combined into 3-D (`combine_3d`): the columns
run along the rotation axis and so are shared, the first scan's rows are y and the second's z.
Every pair of crystals, one of each scan, that share a column is a 3-D crystal:
`RASTER3D: series N M crystals K {x y z width height depth score best_frame_N best_frame_M} ...`.

Only hits of a raster series are kept (one small record each, at most MAX_HITS a series), from the
first result that says the series is one: any other series costs a few counters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from statistics import median

MAX_HITS = 100_000  # hits kept per series; past it the scan is reported cut
MAX_CRYSTALS = 100  # crystals listed (the strongest); `found` says how many there were
ORTHOGONAL_WITHIN = 5.0  # degrees off 90 two scans' omegas may be and still be combined into 3-D
NO_RESOLUTION = 99.9  # the original's hres when there is no estimate

_ROW_COL = (
    re.compile(r"\brow\D{0,3}?(\d+)\D{1,5}?col(?:umn)?\D{0,3}?(\d+)", re.I),
    re.compile(r"(?:^|[^A-Za-z])r(\d+)[ ._,:-]?c(\d+)\b", re.I),
    re.compile(r"^\s*(\d+)\s*[,x: ]\s*(\d+)\s*$"),
)


_OMEGA = re.compile(r"(?:^|[^A-Za-z])omega\W{0,3}?(-?\d+(?:\.\d+)?)", re.I)


def grid_cell(mapping) -> tuple[int, int] | None:
    """(row, column) a `mapping` header value names, else None."""
    if not isinstance(mapping, str) or not mapping or len(mapping) > 300:
        return None
    for pattern in _ROW_COL:
        m = pattern.search(mapping)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def grid_omega(mapping) -> float | None:
    """The orientation (omega, degrees) a `mapping` header value names, else None."""
    if not isinstance(mapping, str) or not mapping or len(mapping) > 300:
        return None
    m = _OMEGA.search(mapping)
    return float(m.group(1)) if m else None


def place(frame: int, first_frame: int, row_length: int | None, snake: bool) -> tuple[int, int]:
    """(row, column) of a frame from its place in the series: rows of `row_length` frames (every
    other one backwards in a snake scan); one row when no length is known."""
    k = frame - first_frame
    if not row_length:
        return 0, k
    row, col = divmod(k, row_length)
    if snake and row % 2:
        col = row_length - 1 - col
    return row, col


@dataclass(slots=True)
class Hit:
    frame: int
    score: float
    n_spots: int
    hres: float | None
    cell: tuple[int, int] | None  # (row, column) from the header, else placed later
    unit_cell: tuple | None = None  # (sg, a, b, c, alpha, beta, gamma) where indexed

    def to_row(self) -> list:
        """As a JSON list (the Collector's journal)."""
        return [self.frame, self.score, self.n_spots, self.hres, list(self.cell) if self.cell else None,
                list(self.unit_cell) if self.unit_cell else None]

    @classmethod
    def from_row(cls, row) -> Hit:
        """From `to_row()`'s list; ValueError or TypeError for anything else."""
        frame, score, n_spots, hres, cell, unit_cell = row
        if cell is not None:
            row_, column = cell
            cell = (int(row_), int(column))
        if unit_cell is not None:
            unit_cell = (str(unit_cell[0]), *(float(v) for v in unit_cell[1:7]))
        return cls(int(frame), float(score), int(n_spots), None if hres is None else float(hres), cell, unit_cell)


@dataclass
class Crystal:
    x: float  # centre of mass, column
    y: float  # centre of mass, row
    width: int  # columns covered
    height: int  # rows covered
    score: float  # the best frame's score
    n_frames: int
    d_min: float | None  # median hres of its frames with one
    n_spots: int  # all its frames' spots
    best_frame: int
    best_x: int
    best_y: int
    unit_cell: tuple | None = None  # (sg, a, b, c, alpha, beta, gamma) of its best indexed frame
    cells: list[list[int]] = field(default_factory=list)  # [[column, row], ...]: the region, for the GUI
    column_weights: dict[int, float] = field(default_factory=dict, repr=False)  # for combine_3d

    def brace(self) -> str:
        d_min = self.d_min if self.d_min is not None else NO_RESOLUTION
        cell = ""
        if self.unit_cell:
            cell = " ".join([str(self.unit_cell[0])] + [f"{v:.2f}" for v in self.unit_cell[1:]])
        return (f"{{{self.x:.2f} {self.y:.2f} {self.width} {self.height} {self.score:.2f} {self.n_frames} "
                f"{d_min:.2f} {self.n_spots} {self.best_frame} {self.best_x} {self.best_y} {{{cell}}}}}")

    def to_wire(self) -> dict:
        return {"x": round(self.x, 3), "y": round(self.y, 3), "width": self.width, "height": self.height,
                "score": self.score, "n_frames": self.n_frames, "d_min": self.d_min, "n_spots": self.n_spots,
                "best_frame": self.best_frame, "best_x": self.best_x, "best_y": self.best_y,
                "left": min((c for c, _ in self.cells), default=self.best_x),
                "top": min((r for _, r in self.cells), default=self.best_y),
                "unit_cell": list(self.unit_cell) if self.unit_cell else None, "cells": self.cells}


@dataclass
class RasterReport:
    """A raster series' crystals: the RASTER line, the record's and the GUI's `raster`."""

    series: int
    series_name: str | None
    crystals: list[Crystal]
    placed_by: str  # mapping | row_length | one_row (how frames got their cells)
    rows: int
    columns: int
    frames: int  # frames with a result
    hits: int
    cut: bool = False  # more than MAX_HITS hits: the rest were not kept
    final: bool = True  # False: the series still runs (the GUI's live view)
    found: int | None = None  # crystals found, when more than the MAX_CRYSTALS listed
    omega: float | None = None  # the orientation its mapping header names (for combine_3d)

    def line(self) -> str:
        return " ".join([f"RASTER: series {self.series} crystals {len(self.crystals)}",
                         *(c.brace() for c in self.crystals)]).rstrip()

    def to_wire(self) -> dict:
        return {"series": self.series, "series_name": self.series_name, "placed_by": self.placed_by,
                "rows": self.rows, "columns": self.columns, "frames": self.frames, "hits": self.hits,
                "cut": self.cut, "final": self.final,
                "found": self.found if self.found is not None else len(self.crystals), "omega": self.omega,
                "crystals": [c.to_wire() for c in self.crystals],
                "line": self.line()}


def _unit_cell(result) -> tuple | None:
    """(sg, a, b, c, alpha, beta, gamma) of an indexed result (FrameResult's `indexed`, `space_group`,
    `unit_cell`), else None."""
    if getattr(result, "indexed", None) is False:
        return None
    sg = getattr(result, "space_group", None)
    cell = getattr(result, "unit_cell", None)
    if not sg or not isinstance(cell, list | tuple) or len(cell) != 6:
        return None
    try:
        return (str(sg)[:20], *(float(v) for v in cell))
    except (TypeError, ValueError):
        return None


@dataclass
class RasterScan:
    """One series' raster account, as results come (in any order)."""

    sections: tuple[str, ...] = ()  # processing sections whose series are rasters (the config's raster_sections)
    min_score: float | None = None
    raster: bool = False  # a raster section or a grid position was seen
    first_frame: int | None = None
    last_frame: int | None = None
    frames: int = 0
    hits: dict[int, Hit] = field(default_factory=dict)
    cut: bool = False
    changed: bool = False  # a hit kept since the last report
    omega: float | None = None  # the first orientation a frame's mapping named

    def is_hit(self, result) -> bool:
        if result.status != "processed":
            return False
        if self.min_score is not None:
            return result.score is not None and result.score >= self.min_score
        return bool(result.hit)

    def add(self, result) -> Hit | None:
        """Take one FrameResult (validated: see intxr.messages); the hit it adds, if any."""
        frame = result.frame
        self.frames += 1
        self.first_frame = frame if self.first_frame is None else min(self.first_frame, frame)
        self.last_frame = frame if self.last_frame is None else max(self.last_frame, frame)
        mapping = (result.header or {}).get("mapping")
        cell = grid_cell(mapping)
        if self.omega is None:
            self.omega = grid_omega(mapping)
        if cell is not None or result.processing_section in self.sections:
            self.raster = True
        if not self.raster or not self.is_hit(result):
            return None  # a series not (yet) known as a raster keeps nothing: serial runs of 10^6 hits cost nothing
        hres = result.hres if result.hres is not None and 0 < result.hres < NO_RESOLUTION - 0.5 else None
        return self.keep(Hit(frame, float(result.score or 0.0), int(result.n_spots or 0), hres, cell,
                             _unit_cell(result)))

    def keep(self, hit: Hit) -> Hit | None:
        if len(self.hits) >= MAX_HITS and hit.frame not in self.hits:
            self.cut = True
            return None
        self.hits[hit.frame] = hit
        self.changed = True
        return hit

    def report(self, series: int, name: str | None, row_length: int | None = None, snake: bool = False,
               first_frame: int | None = None) -> RasterReport:
        """The crystals: `first_frame` is the series' first frame where known better than from the
        results (the Splitter's received frames)."""
        self.changed = False
        first = self.first_frame if self.first_frame is not None else 0
        if first_frame is not None:
            first = min(first, first_frame)
        by_header = [h for h in self.hits.values() if h.cell is not None]
        placed_by = "mapping" if by_header else "row_length" if row_length else "one_row"
        cells: dict[tuple[int, int], list[Hit]] = {}
        for hit in self.hits.values():
            cell = hit.cell if hit.cell is not None else place(hit.frame, first, row_length, snake)
            cells.setdefault(cell, []).append(hit)
        crystals = [_crystal(region, cells) for region in regions(cells)]
        crystals.sort(key=lambda c: (-c.score, -c.n_spots, -c.n_frames, c.y, c.x))
        found = len(crystals)
        crystals = crystals[:MAX_CRYSTALS]
        if placed_by == "mapping" or not self.frames:
            rows = 1 + max((r for r, _ in cells), default=-1)
            columns = 1 + max((c for _, c in cells), default=-1)
        else:
            n = (self.last_frame or 0) - first + 1
            columns = row_length or n
            rows = -(-n // columns)
        return RasterReport(series, name, crystals, placed_by, rows, columns, self.frames, len(self.hits),
                            self.cut, found=found, omega=self.omega)


def regions(cells) -> list[list[tuple[int, int]]]:
    """The 8-connected regions of a set of (row, column) cells, each in row-major order."""
    left = set(cells)
    out = []
    for start in sorted(cells):
        if start not in left:
            continue
        left.discard(start)
        region, todo = [], [start]
        while todo:
            r, c = todo.pop()
            region.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    n = (r + dr, c + dc)
                    if n in left:
                        left.discard(n)
                        todo.append(n)
        out.append(sorted(region))
    return out


def _crystal(region, cells) -> Crystal:
    hits = [h for cell in region for h in cells[cell]]
    where = {h.frame: cell for cell in region for h in cells[cell]}
    weights = [max(h.score, 0.0) for h in hits]
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(hits), float(len(hits))
    y = sum(w * where[h.frame][0] for w, h in zip(weights, hits, strict=True)) / total
    x = sum(w * where[h.frame][1] for w, h in zip(weights, hits, strict=True)) / total
    best = max(hits, key=lambda h: (h.score, h.n_spots, -h.frame))
    indexed = [h for h in hits if h.unit_cell]
    resolutions = [h.hres for h in hits if h.hres is not None]
    rows = [r for r, _ in region]
    columns = [c for _, c in region]
    by_column: dict[int, float] = {}
    for w, h in zip(weights, hits, strict=True):
        by_column[where[h.frame][1]] = by_column.get(where[h.frame][1], 0.0) + w
    return Crystal(
        x=x, y=y, width=max(columns) - min(columns) + 1, height=max(rows) - min(rows) + 1, score=best.score,
        n_frames=len(hits), d_min=median(resolutions) if resolutions else None,
        n_spots=sum(h.n_spots for h in hits), best_frame=best.frame, best_x=where[best.frame][1],
        best_y=where[best.frame][0],
        unit_cell=max(indexed, key=lambda h: (h.score, -h.frame)).unit_cell if indexed else None,
        cells=[[c, r] for r, c in region], column_weights=by_column,
    )


# ---------------------------------------------------------------------------------------------
# Two orthogonal scans: crystals in 3-D


def orthogonal(a: float | None, b: float | None) -> bool:
    """Two omegas (degrees) 90 apart (or 270), within ORTHOGONAL_WITHIN."""
    if a is None or b is None:
        return False
    return abs((a - b) % 180 - 90) <= ORTHOGONAL_WITHIN


@dataclass
class Crystal3D:
    x: float  # column (along the rotation axis, shared by both scans)
    y: float  # row of the first scan
    z: float  # row of the second scan
    width: int  # columns the two crystals share
    height: int  # rows of the first scan's crystal
    depth: int  # rows of the second scan's crystal
    score: float  # the weaker of the two best scores: a crystal is as sure as its poorer view
    best_frames: tuple[int, int]

    def brace(self) -> str:
        return (f"{{{self.x:.2f} {self.y:.2f} {self.z:.2f} {self.width} {self.height} {self.depth} "
                f"{self.score:.2f} {self.best_frames[0]} {self.best_frames[1]}}}")

    def to_wire(self) -> dict:
        return {"x": round(self.x, 3), "y": round(self.y, 3), "z": round(self.z, 3), "width": self.width,
                "height": self.height, "depth": self.depth, "score": self.score, "best_frames": list(self.best_frames)}


@dataclass
class Raster3DReport:
    series: tuple[int, int]
    crystals: list[Crystal3D]

    def line(self) -> str:
        return " ".join([f"RASTER3D: series {self.series[0]} {self.series[1]} crystals {len(self.crystals)}",
                         *(c.brace() for c in self.crystals)]).rstrip()

    def to_wire(self) -> dict:
        return {"series": list(self.series), "crystals": [c.to_wire() for c in self.crystals], "line": self.line()}


def combine_3d(first: RasterReport, second: RasterReport) -> Raster3DReport:
    """The 3-D crystals of two orthogonal scans of one sample whose columns run along the rotation
    axis: each pair of crystals (one of each) sharing a column. x is the mean of the shared columns
    weighted by the product of the two crystals' scores in each (where both views see diffraction),
    y and z the two crystals' centres of mass across their rows. Two crystals in one scan over the
    same columns pair with each of the other scan's there: two projections cannot tell which is
    which, so every pairing is listed (strongest first)."""
    out = []
    for a in first.crystals:
        for b in second.crystals:
            shared = a.column_weights.keys() & b.column_weights.keys()
            if not shared:
                continue
            weights = {c: a.column_weights[c] * b.column_weights[c] for c in shared}
            total = sum(weights.values())
            x = sum(c * w for c, w in weights.items()) / total if total > 0 else sum(shared) / len(shared)
            out.append(Crystal3D(x, a.y, b.y, max(shared) - min(shared) + 1, a.height, b.height,
                                 min(a.score, b.score), (a.best_frame, b.best_frame)))
    out.sort(key=lambda c: (-c.score, -c.width * c.height * c.depth, c.x, c.y, c.z))
    return Raster3DReport((first.series, second.series), out[:MAX_CRYSTALS])
