"""The live view as a Bokeh document, one per browser session, fed from the shared `RunModel`.

Each session's periodic callback (UPDATE_MS) asks the model only for what is new since its last
update: the new points of the series it shows (streamed into its strip chart and raster map), the
series list's changed rows, the health when it changed, the closed seconds of the rates. Nothing
is recomputed for finished series, so an update costs what arrived, however long the run. Frames
are read from disk on a worker thread and handed back to the session's document.

Sources are named (`Bokeh.documents[0].get_model_by_name("strip")`) for tests and curious users.
"""

from __future__ import annotations

import html
import math
import time
from concurrent.futures import Executor
from functools import partial

import numpy as np
from bokeh.document import Document
from bokeh.events import Tap
from bokeh.layouts import column, row
from bokeh.models import (
    Checkbox,
    ColumnDataSource,
    CustomJS,
    DataRange1d,
    DataTable,
    Div,
    HoverTool,
    LinearAxis,
    LinearColorMapper,
    Range1d,
    Select,
    TableColumn,
    TextInput,
)
from bokeh.palettes import Greys256, Viridis256
from bokeh.plotting import figure
from bokeh.transform import linear_cmap

from intxr.gui.frames import FrameError, Frames
from intxr.gui.model import MAX_SERIES, RunModel, SeriesCursor, resolution_edges

UPDATE_MS = 200  # a session's update period: 5 a second, whatever the rate of results
DETAILS_EVERY = 1.0  # seconds between two updates of a session's counts, tables and series list
POINTS_PER_SECOND_DRAWN = 20_000
DRAWN_WAIT = 5.0  # seconds an update waits for the page to say it drew the last one before it goes anyway
LATEST_HIT_EVERY = 2.0  # seconds between two reads of the latest hit while no frame is picked
STRIP_ROLLOVER = 200_000  # points a strip chart keeps (a series' points beyond scroll out)
TIMELINE_ROLLOVER = 1800
# What the page shows, as (label, field) by the names the Collector's health, the Splitter's counters and the
# series counts (SeriesSummary) send them.
JOB_FIELDS = (
    ("reader restarts", "reader_restarts"),
    ("job restarts", "job_restarts"),
    ("bad results", "malformed_results"),
    ("results of another version", "other_version_results"),
    ("bad Splitter messages", "malformed_splitter"),
    ("late results", "late_results"),
    ("results of unknown series", "unknown_series"),
    ("UI lines dropped", "ui_dropped"),
)
SPLITTER_FIELDS = (
    ("splitter received", "frames_received"),
    ("written", "frames_written"),
    ("not written", "frames_not_written"),
    ("forwarded", "frames_forwarded"),
    ("skipped", "frames_skipped"),
    ("malformed", "malformed"),
    ("disk full", "disk_full"),
)
COUNT_FIELDS = (
    ("hits", "hits"),
    ("hit rate", "hit_rate"),
    ("median hres (A)", "median_hres"),
    ("frames/s", "rate"),
    ("received", "received"),
    ("written", "written"),
    ("processed", "processed"),
    ("blank", "blank"),
    ("skipped", "skipped"),
    ("failed", "failed"),
    ("lost (no result)", "lost"),
    ("latency p50 (s)", "latency_p50"),
    ("results", "results"),
)
HIT, NO_HIT, INDEXED, HRES = "#1a9850", "#999999", "#1f3a5f", "#d95f02"
SPOT, PREDICTED, RING, ICE = "#e7298a", "#00a6a6", "#3182bd", "#e6550d"
TITLE = "font:600 16px system-ui;color:#1f3a5f"
ALARM = "background:#b00;color:#fff;font-weight:600;padding:4px 8px;border-radius:3px"


def _fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _cells(pairs) -> str:
    """Label-value cells, every value escaped: messages come from a socket anyone on the host can write to."""
    # Inline styles: a Bokeh Div is drawn in its own shadow DOM, out of reach of a page's style sheet.
    cells = "".join(
        f"<div>{html.escape(str(k))}<span style='display:block;font-size:17px;font-weight:600'>"
        f"{html.escape(_fmt(v))}</span></div>"
        for k, v in pairs
    )
    return f"<div style='display:grid;grid-template-columns:repeat(4,1fr);gap:2px 14px;font-size:12px'>{cells}</div>"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _columns(points: list[dict]) -> dict:
    hit = np.fromiter((bool(p["hit"]) for p in points), np.int8, len(points))  # 0 / 1: coloured by the page
    indexed = np.fromiter(
        (1 if p["indexed"] else (0 if p["indexed"] is False else -1) for p in points), np.int8, len(points)
    )
    return {
        "frame": np.fromiter((p["frame"] for p in points), np.int64, len(points)),
        "n_spots": np.fromiter((p["n_spots"] or 0 for p in points), np.int64, len(points)),
        "hres": np.fromiter(
            (p["hres"] if p["hres"] and p["hres"] < 99 else np.nan for p in points), float, len(points)
        ),
        "score": np.fromiter((p["score"] if p["score"] is not None else np.nan for p in points), float, len(points)),
        "hit": hit,
        "indexed": indexed,
    }


def _table(name: str, fields: list[tuple[str, str]], width: int, height: int, hidden: tuple[str, ...] = (),
           table_name: str | None = None) -> tuple[ColumnDataSource, DataTable]:
    """A table and its source, named `name` for the page and the tests: one (field, title) per
    column shown, and `hidden` fields the source carries without showing them."""
    source = ColumnDataSource({f: [] for f in (*hidden, *(f for f, _ in fields))}, name=name)
    table = DataTable(
        source=source,
        name=table_name,
        height=height,
        width=width,
        index_position=None,
        columns=[TableColumn(field=f, title=t) for f, t in fields],
    )
    return source, table


class Session:
    """One browser's document: its widgets, and what it has shown so far."""

    def __init__(self, doc: Document, model: RunModel, frames: Frames, executor: Executor):
        self.doc, self.model, self.frames, self.executor = doc, model, frames, executor
        self.order: int | None = None  # the series shown
        self.series_gone = False  # the series shown is no longer kept by the model
        self.newest: int | None = None  # the newest series listed
        self.cursor = SeriesCursor()
        self.rows_version = 0
        self.list_version = -1
        self.row_index: dict[int, int] = {}  # series order -> row of the table shown
        self.status_version = -1  # the first update shows the state as it is
        self.bins_total = 0
        self.cell_frame: dict[tuple[int, int], int] = {}  # (row, column) -> frame, for taps
        self.raster_index: dict[int, int] = {}  # frame -> row of the raster source
        self.strip_dropped = 0  # points rolled out of the strip chart
        self.latest_hit: int | None = None
        self.pinned = False
        self.shown_frame: tuple[int, int] | None = None  # (order, frame) in the frame view
        self.last_frame_load = 0.0
        self.details_at = 0.0
        self.streamed_at = 0.0
        self.update_seq = 0  # updates sent; the page says which one it has drawn
        self.drawn_seq = 0
        self.sent_at = 0.0
        self.loading = False
        self._selecting = False
        self.build()
        self.closed = False
        doc.add_periodic_callback(self.update, UPDATE_MS)
        doc.on_session_destroyed(self._destroyed)
        doc.title = "Interceptor"

    def _destroyed(self, session_context) -> None:
        self.closed = True

    # ---- layout -----------------------------------------------------------------------------------------------

    def build(self) -> None:
        # Every text a fixed size: a Div whose size changes makes the page lay out and redraw everything.
        self.title = Div(
            text=f"<span style='{TITLE}'>Interceptor: waiting for results</span>", name="title", width=640, height=28
        )
        self.counts = Div(text="", name="counts", width=640, height=180)
        # Series: a searchable list, newest first (hundreds stay usable: a table, not a row of tabs).
        self.series_source, self.series_table = _table(
            "series_list",
            [("label", "series"), ("results", "frames"), ("hits", "hits"), ("indexed", "indexed"),
             ("crystals", "crystals"), ("ended", "ended")],
            width=420,
            height=180,
            hidden=("order",),
            table_name="series_table",
        )
        self.series_source.selected.on_change("indices", self.on_pick_series)
        self.search = TextInput(placeholder="search series (number or name)", name="search", width=260)
        self.search.on_change("value_input", lambda attr, old, new: self.rebuild_list())
        self.follow = Checkbox(label="follow newest", active=True, name="follow")
        # A patched row is not redrawn by the table by itself (Bokeh redraws a table when its rows change):
        # the page asks it to, costing the server nothing per row.
        self.series_source.js_on_change(
            "patching",
            CustomJS(args=dict(table=self.series_table), code="const v = Bokeh.index.find_one(table); v?.updateGrid()"),
        )
        self.series_note = Div(text="", name="series_note", width=420, height=36)

        # Strip chart: spots per frame, hits coloured, indexed frames ringed, hres on the right.
        self.strip = ColumnDataSource(_columns([]), name="strip")
        self.strip_indexed = ColumnDataSource(dict(frame=[], n_spots=[]), name="strip_indexed")
        strip = figure(
            height=260,
            width=640,
            title="Spots per frame",
            x_axis_label="frame",
            y_axis_label="spots",
            tools="xpan,xwheel_zoom,box_zoom,reset,save",
            name="strip_plot",
        )
        strip.scatter("frame", "n_spots", color=linear_cmap("hit", [NO_HIT, HIT], 0, 1), size=4, source=self.strip)
        strip.scatter(
            "frame", "n_spots", source=self.strip_indexed, marker="circle", size=8, fill_color=None, line_color=INDEXED
        )
        hres = strip.scatter("frame", "hres", source=self.strip, color=HRES, size=2, y_range_name="hres")
        strip.extra_y_ranges = {"hres": DataRange1d(renderers=[hres])}
        strip.add_layout(LinearAxis(y_range_name="hres", axis_label="hres (A)"), "right")
        strip.add_tools(
            HoverTool(
                tooltips=[("frame", "@frame"), ("spots", "@n_spots"), ("hres", "@hres{0.00}")],
                renderers=strip.renderers[:1],
            )
        )

        # Raster map: one cell per frame where the grid is known, the Collector's crystals outlined.
        self.raster = ColumnDataSource(dict(frame=[], row=[], col=[], n_spots=[], score=[]), name="raster")
        self.crystals = ColumnDataSource(
            dict(
                left=[],
                right=[],
                top=[],
                bottom=[],
                x=[],
                y=[],
                score=[],
                n_frames=[],
                best_frame=[],
                d_min=[],
                rank=[],
            ),
            name="crystals",
        )
        self.raster_fig = figure(
            height=300,
            width=640,
            title="Raster (click a cell or a crystal)",
            tools="pan,wheel_zoom,reset,save",
            match_aspect=True,
            name="raster_plot",
            x_axis_label="column",
            y_axis_label="row",
        )
        self.raster_fig.y_range.flipped = True  # row 0 on top, as the scan starts
        self.cell_mapper = LinearColorMapper(palette=Viridis256)
        self.cells = self.raster_fig.rect(
            "col",
            "row",
            1,
            1,
            source=self.raster,
            line_color=None,
            fill_color={"field": "n_spots", "transform": self.cell_mapper},
        )
        self.raster_fig.quad(
            left="left",
            right="right",
            top="top",
            bottom="bottom",
            source=self.crystals,
            fill_color=None,
            line_color="#e41a1c",
            line_width=3,
            name="crystal_boxes",
        )
        self.raster_fig.scatter(
            "x", "y", source=self.crystals, marker="cross", size=14, line_color="#e41a1c", line_width=2
        )
        self.raster_fig.text(
            "right", "top", text="rank", source=self.crystals, text_color="#e41a1c", text_font_size="11px"
        )
        self.raster_fig.add_tools(
            HoverTool(
                tooltips=[("frame", "@frame"), ("spots", "@n_spots"), ("score", "@score")], renderers=[self.cells]
            )
        )
        self.raster_fig.on_event(Tap, self.on_tap_raster)
        self.raster_by = Select(title="colour by", value="n_spots", options=["n_spots", "score"], width=120)
        self.raster_by.on_change("value", self.on_raster_by)
        self.raster_note = Div(text="", name="raster_note", width=500, height=36)

        # Rates over time (one-second bins, every series) and the resolution of the hits, per series.
        self.timeline = ColumnDataSource(dict(t=[], results=[], hit_rate=[], indexing_rate=[]), name="timeline")
        rates = figure(
            height=200,
            width=640,
            title="Hit rate and indexing rate (per second)",
            x_axis_type="datetime",
            y_axis_label="%",
            y_range=Range1d(0, 105),
            tools="xpan,xwheel_zoom,reset",
            name="rates_plot",
        )
        rates.line("t", "hit_rate", source=self.timeline, color=HIT, legend_label="hits / frames", line_width=2)
        rates.line(
            "t", "indexing_rate", source=self.timeline, color=INDEXED, legend_label="indexed / hits", line_width=2
        )
        rates.scatter("t", "hit_rate", source=self.timeline, color=HIT, size=3)
        rates.scatter("t", "indexing_rate", source=self.timeline, color=INDEXED, size=3)
        rates.legend.location = "top_left"
        self.resolution = ColumnDataSource(dict(left=[], right=[], hits=[], d=[]), name="resolution")
        histogram = figure(
            height=200,
            width=420,
            title="Resolution of the hits (hres)",
            x_axis_label="1/d (1/A)",
            y_axis_label="hits",
            tools="reset,save",
            name="resolution_plot",
        )
        histogram.quad(
            left="left", right="right", bottom=0, top="hits", source=self.resolution, color=HRES, line_color="white"
        )
        histogram.add_tools(HoverTool(tooltips=[("d (A)", "@d"), ("hits", "@hits")]))

        # The frame view: the frame as an image, rings, found spots circled, predicted spots squared.
        self.frame_image = ColumnDataSource(dict(image=[], dw=[], dh=[]), name="frame_image")
        self.frame_spots = ColumnDataSource(dict(x=[], y=[]), name="frame_spots")
        self.frame_predicted = ColumnDataSource(dict(x=[], y=[]), name="frame_predicted")
        self.frame_rings = ColumnDataSource(
            dict(x=[], y=[], r=[], color=[], label=[], lx=[], ly=[]), name="frame_rings"
        )
        self.frame_state = ColumnDataSource(
            dict(key=[""], series=[-1], frame=[-1], spots=[0], predicted=[0], pinned=[False], loaded=[False]),
            name="frame",
        )
        self.frame_fig = figure(
            height=560,
            width=560,
            title="Frame (latest hit)",
            match_aspect=True,
            tools="pan,wheel_zoom,box_zoom,reset,save",
            name="frame_plot",
            x_range=Range1d(0, 1),
            y_range=Range1d(1, 0),
        )
        self.frame_fig.image(
            "image",
            x=0,
            y=0,
            dw="dw",
            dh="dh",
            source=self.frame_image,
            color_mapper=LinearColorMapper(palette=Greys256, low=0, high=255),
        )
        self.frame_fig.circle(
            "x",
            "y",
            radius="r",
            source=self.frame_rings,
            fill_color=None,
            line_color="color",
            line_dash="dashed",
            line_alpha=0.8,
        )
        self.frame_fig.text(
            "lx", "ly", text="label", source=self.frame_rings, text_color="color", text_font_size="10px"
        )
        self.predicted_glyph = self.frame_fig.scatter(
            "x", "y", source=self.frame_predicted, marker="square", size=7, fill_color=None, line_color=PREDICTED
        )
        self.frame_fig.scatter(
            "x",
            "y",
            source=self.frame_spots,
            marker="circle",
            size=10,
            fill_color=None,
            line_color=SPOT,
            line_width=1.5,
        )
        self.frame_fig.grid.visible = False
        self.show_predicted = Checkbox(
            label="predicted spots of the indexed lattice", active=True, name="show_predicted"
        )
        self.show_predicted.on_change("active", lambda attr, old, new: setattr(self.predicted_glyph, "visible", new))
        self.frame_note = Div(text="", name="frame_note", width=560, height=36)

        # Indexing and health.
        self.indexing = Div(text="", name="indexing", width=640, height=44)
        self.lattices, lattice_table = _table(
            "lattices",
            [("lattice", "lattice"), ("space_group", "space group"), ("frames", "frames"), ("share", "share"),
             ("a", "a"), ("b", "b"), ("c", "c"), ("alpha", "alpha"), ("beta", "beta"), ("gamma", "gamma")],
            width=640,
            height=120,
        )
        self.job_state = Div(text="", name="job_state", visible=False, width=560, height=30)
        self.ranks, ranks_table = _table(
            "ranks",
            [("rank", "rank"), ("host", "host"), ("cpu", "CPU"), ("numa", "NUMA"), ("buffers", "buffers"),
             ("frames", "frames"), ("rate", "frames/s"), ("state", "state")],
            width=560,
            height=140,
        )
        self.splitter = Div(text="", name="splitter", width=560, height=200)
        self.errors = Div(
            text="",
            name="errors",
            width=560,
            height=100,
            styles={"color": "#b00", "white-space": "pre-wrap", "overflow": "auto"},
        )

        left = column(
            self.counts,
            row(self.raster_by, self.raster_note),
            self.raster_fig,
            strip,
            rates,
            Div(text="<b>Indexing</b>"),
            self.indexing,
            lattice_table,
        )
        right = column(
            row(self.search, self.follow),
            self.series_table,
            self.series_note,
            row(self.show_predicted),
            self.frame_note,
            self.frame_fig,
            histogram,
            Div(text="<b>Health</b>"),
            self.job_state,
            ranks_table,
            self.splitter,
            self.errors,
        )
        self.doc.add_root(column(self.title, row(left, right)))
        self.doc.add_root(self.frame_state)  # drawn by nothing: a root, so the page has it (tests read it)
        # Flow control: the page says which update it has drawn (once the frame after it is painted), and
        # the next goes only then. A page that draws slower than results come gets fewer, larger updates
        # instead of a queue that grows; a hidden tab, which paints nothing, gets one every DRAWN_WAIT.
        self.sent = Div(text="0", name="update_sent", visible=False)
        self.drawn = Div(text="0", name="update_drawn", visible=False)
        self.sent.js_on_change(
            "text",
            CustomJS(
                args=dict(drawn=self.drawn),
                code="const seq = cb_obj.text; requestAnimationFrame(() => setTimeout(() => { drawn.text = seq }))",
            ),
        )
        self.drawn.on_change("text", self.on_drawn)
        self.doc.add_root(self.sent)
        self.doc.add_root(self.drawn)

    # ---- the periodic update ------------------------------------------------------------------------------------

    def on_drawn(self, attr, old, new) -> None:
        try:
            self.drawn_seq = int(new)
        except ValueError:  # what a page sends is not trusted: a bad value only ends the wait early
            self.drawn_seq = self.update_seq

    def update(self) -> None:
        now = time.monotonic()
        if self.drawn_seq < self.update_seq and now - self.sent_at < DRAWN_WAIT:
            return  # the page is still drawing the last update: what is new waits in the model
        self.update_seq += 1
        self.sent_at = now
        # Points stream at every update; counts, tables and the list, which change with every result
        # too, once a second: fewer messages for the page to take in when results pour in.
        details = now - self.details_at >= DETAILS_EVERY
        if details:
            self.details_at = now
            self.update_list()
        self.update_status()
        # A page redraws its plots whole at each change: the more points drawn, the fewer updates (up to one
        # a second at POINTS_PER_SECOND_DRAWN points), so a long series does not leave the page behind.
        shown = len(self.strip.data["frame"])
        if details or now - self.streamed_at >= shown / POINTS_PER_SECOND_DRAWN:
            self.streamed_at = now
            self.update_series(details)
        self.update_timeline()
        self.update_frame()
        self.sent.text = str(self.update_seq)  # last: the page sees it after this update's changes

    def update_status(self) -> None:
        status = self.model.status_since(self.status_version)
        if status is None:
            return
        self.status_version = status["version"]
        h, sp, g = status["health"], status["splitter"], status["gui"]
        ranks = [r for r in h.get("ranks") or () if r.get("rank", 0) > 0]

        def state_of(r) -> str:
            text = (
                ("DEAD, not replaced" if r.get("given_up") else "DEAD")
                if r.get("dead")
                else ("LOST" if r.get("lost") else "starting" if r.get("starting") else "ok")
            )
            return text + (f" (replaced {r['restarts']}x)" if r.get("restarts") else "")

        self.ranks.data = {
            "rank": [r["rank"] for r in ranks],
            "host": [_fmt(r.get("host")) for r in ranks],
            "cpu": [_fmt(r.get("cpu")) for r in ranks],
            "numa": [_fmt(r.get("numa")) for r in ranks],
            "buffers": [_fmt(r.get("buffer_numa")) for r in ranks],
            "frames": [_fmt(r.get("frames", r.get("results", 0))) for r in ranks],
            "rate": [_fmt(r.get("rate"), 1) for r in ranks],
            "state": [state_of(r) for r in ranks],
        }
        alive = h.get("readers_alive")
        if not isinstance(alive, int):
            alive = (
                sum(1 for r in ranks if not (r.get("lost") or r.get("dead") or r.get("starting"))) if ranks else None
            )
        no_readers = h.get("no_readers") is True or alive == 0
        since = h.get("no_readers_for")
        since = f" for {since:.0f} s" if isinstance(since, int | float) and since > 0 else ""
        self.job_state.text = (
            f"<div style='{ALARM}'>NO READERS{since}: frames are written but not processed</div>" if no_readers else ""
        )
        self.job_state.visible = no_readers
        fill = f"{100 * (sp.get('queued_bytes') or 0) / sp['buffer_bytes']:.1f}%" if sp.get("buffer_bytes") else "-"
        job = [(k, h.get(f)) for k, f in JOB_FIELDS if f in h]
        self.splitter.text = _cells(
            [
                ("readers alive", alive),
                *job,
                *((k, sp.get(f)) for k, f in SPLITTER_FIELDS),
                ("buffer fill", fill),
                ("readers waiting", sp.get("readers_waiting")),
                ("GUI bad messages", g["bad_messages"]),
            ]
        )
        errors = list(status["errors"])
        if g["bad_messages"]:
            errors.append(f"gui: {g['bad_messages']} bad messages ignored (last: {g['last_bad']})")
        self.errors.text = html.escape("\n".join(errors))

    def update_list(self) -> None:
        if self.model.list_version != self.list_version:
            self.rebuild_list()
            return
        rows, self.rows_version = self.model.rows_since(self.rows_version)
        patches: dict[str, list] = {}
        for r in rows:
            i = self.row_index.get(r["order"])
            if i is None:
                continue
            for field in ("results", "hits", "indexed", "crystals", "ended"):
                patches.setdefault(field, []).append((i, r[field]))
        if patches:
            self.series_source.patch(patches)

    def rebuild_list(self) -> None:
        """The whole table again: when a series starts or goes, or the search changes (not per update)."""
        self.list_version = self.model.list_version
        rows, self.rows_version = self.model.listed()
        newest = self.newest = rows[0]["order"] if rows else None
        text = (self.search.value_input or "").strip().lower()
        if text:
            rows = [r for r in rows if text in r["label"].lower() or text in r["key"].lower()]
        self.row_index = {r["order"]: i for i, r in enumerate(rows)}
        self._selecting = True
        try:
            self.series_source.data = {f: [r[f] for r in rows] for f in self.series_source.data}
            self.series_source.selected.indices = [self.row_index[self.order]] if self.order in self.row_index else []
        finally:
            self._selecting = False
        if newest is not None and (self.order is None or (self.follow.active and newest != self.order)):
            self.select(newest)

    def on_pick_series(self, attr, old, new) -> None:
        if self._selecting or not new:
            return
        order = self.series_source.data["order"][new[0]]
        if order != self.order:
            self.follow.active = order == self.newest  # an older series picked: stay on it
            self.select(order)

    def select(self, order: int) -> None:
        self.order = order
        self.series_gone = False
        self.cursor = SeriesCursor()
        self.cell_frame.clear()
        self.raster_index.clear()
        self.strip_dropped = 0
        self.latest_hit = None
        self.pinned = False
        self.shown_frame = None
        for source in (self.strip, self.strip_indexed, self.raster, self.crystals, self.resolution, self.lattices):
            source.data = {k: [] for k in source.data}
        self.strip.data = _columns([])
        self._selecting = True
        try:
            self.series_source.selected.indices = [self.row_index[order]] if order in self.row_index else []
        finally:
            self._selecting = False
        self.update_series()

    def update_series(self, details: bool = True) -> None:
        if self.order is None:
            return
        delta = self.model.series_since(self.order, self.cursor, details)
        if delta is None:
            if self.series_gone:
                return
            self.series_gone = True  # said once: not looked up again at every update
            row = next((r for r in self.model.listed()[0] if r["order"] == self.order), None)
            label = row["label"] if row else "?"
            self.title.text = f"<span style='{TITLE}'>Series {html.escape(label)}</span>"
            self.series_note.text = (
                f"series {html.escape(label)}: its frames are no longer kept (the newest "
                f"{MAX_SERIES} series are); its counts are in the list"
            )
            return
        if delta["regrid"]:
            self.select(self.order)
            return
        points = delta["points"]
        if points:
            columns = _columns(points)
            self.strip.stream(columns, rollover=STRIP_ROLLOVER)
            self.strip_dropped = max(0, delta["start"] + len(points) - STRIP_ROLLOVER)
            indexed = columns["indexed"] == 1
            if indexed.any():
                self.strip_indexed.stream(
                    {"frame": columns["frame"][indexed], "n_spots": columns["n_spots"][indexed]},
                    rollover=STRIP_ROLLOVER,
                )
            self.stream_cells(points, columns, delta["cells"])
        if delta["replaced"]:
            self.patch_points(delta["replaced"], delta["replaced_cells"])
        if "counts" in delta:
            self.show_counts(delta["counts"], delta["indexing"], delta["resolution"])
            self.latest_hit = delta["latest_hit"]
        if "crystals" in delta:
            self.show_crystals(delta["crystals"])

    def stream_cells(self, points: list[dict], columns: dict, cells: list) -> None:
        keep = [i for i, cell in enumerate(cells) if cell is not None]
        if len(keep) < len(cells) and not self.raster_index:
            self.raster_note.text = "frames not placed on the grid: no mapping header and no raster_row_length"
        if not keep:
            return
        start = len(self.raster.data["frame"])
        rows = np.fromiter((cells[i][0] for i in keep), np.int64, len(keep))
        cols = np.fromiter((cells[i][1] for i in keep), np.int64, len(keep))
        frames = columns["frame"][keep]
        for k, i in enumerate(keep):
            self.cell_frame[cells[i]] = points[i]["frame"]
            self.raster_index[points[i]["frame"]] = start + k
        self.raster.stream(
            {
                "frame": frames,
                "row": rows,
                "col": cols,
                "n_spots": columns["n_spots"][keep],
                "score": columns["score"][keep],
            }
        )
        self.raster_note.text = ""

    def patch_points(self, replaced: list, cells: list) -> None:
        """A frame's later result (a reader's repeat) replaces its point and its cell's colour."""
        strip, raster = {}, {}
        for (index, point), cell in zip(replaced, cells, strict=True):
            at = index - self.strip_dropped
            columns = _columns([point])
            if 0 <= at < len(self.strip.data["frame"]):
                for field in ("n_spots", "hres", "score", "hit", "indexed"):
                    strip.setdefault(field, []).append((at, columns[field][0].item()))
            r = self.raster_index.get(point["frame"])
            if r is not None and cell is not None:
                raster.setdefault("n_spots", []).append((r, int(columns["n_spots"][0])))
                raster.setdefault("score", []).append((r, float(columns["score"][0])))
        if strip:
            self.strip.patch(strip)
        if raster:
            self.raster.patch(raster)

    def show_counts(self, c: dict, ix: dict, resolution: list[int]) -> None:
        self.title.text = (
            f"<span style='{TITLE}'>Series {html.escape(c['label'])}{' (ended)' if c['ended'] else ''}</span>"
        )
        self.series_note.text = ""
        hit_rate = _pct(c.get("hit_rate")) if c.get("results") else "-"
        shown = {"hit_rate": hit_rate, "rate": _fmt(c.get("rate"), 1), "latency_p50": _fmt(c.get("latency_p50"), 3)}
        cells = [(k, shown[f] if f in shown else c.get(f)) for k, f in COUNT_FIELDS]
        if c.get("lost_ranges"):
            cells.append(("lost frames", c["lost_ranges"]))
        if c.get("skipped_ranges"):
            cells.append(("skipped frames", c["skipped_ranges"]))
        self.counts.text = _cells(cells)
        self.indexing.text = _cells(
            [
                ("indexed", ix["indexed"]),
                ("of hits", _pct(ix["rate_of_hits"])),
                ("of frames", _pct(ix["rate_of_frames"])),
                ("tried", ix["tried"]),
            ]
        )
        rows = ix["lattices"] + (
            [{"lattice": "other", "space_group": "", "frames": ix["other"], "fraction": None, "cell": None}]
            if ix["other"]
            else []
        )
        names = ("a", "b", "c", "alpha", "beta", "gamma")
        data = {
            "lattice": [r["lattice"] for r in rows],
            "space_group": [r["space_group"] for r in rows],
            "frames": [r["frames"] for r in rows],
            "share": [_pct(r["fraction"]) for r in rows],
        }
        for i, name in enumerate(names):
            data[name] = [f"{r['cell'][i]:.2f} ± {r['cell_spread'][i]:.2f}" if r.get("cell") else "-" for r in rows]
        self.lattices.data = data
        edges = resolution_edges()
        self.resolution.data = {
            "left": edges[:-1],
            "right": edges[1:],
            "hits": resolution,
            "d": [
                f"{1 / b:.2f}-{1 / a:.2f}" if a else f">{1 / b:.2f}" for a, b in zip(edges[:-1], edges[1:], strict=True)
            ],
        }

    def show_crystals(self, crystals: list[dict]) -> None:
        self.crystals.data = {
            "left": [c["left"] - 0.5 for c in crystals],
            "right": [c["left"] + c["width"] - 0.5 for c in crystals],
            "top": [c["top"] - 0.5 for c in crystals],
            "bottom": [c["top"] + c["height"] - 0.5 for c in crystals],
            "x": [c["x"] for c in crystals],
            "y": [c["y"] for c in crystals],
            "score": [c["score"] for c in crystals],
            "n_frames": [c["n_frames"] for c in crystals],
            "best_frame": [c["best_frame"] for c in crystals],
            "d_min": [c["d_min"] if isinstance(c.get("d_min"), int | float) else float("nan") for c in crystals],
            "rank": [str(k + 1) for k in range(len(crystals))],
        }

    def update_timeline(self) -> None:
        bins, self.bins_total = self.model.timeline_since(self.bins_total)
        if not bins:
            return
        n = np.array([b[1] for b in bins], float)
        hits = np.array([b[2] for b in bins], float)
        tried = np.array([b[3] for b in bins], float)
        indexed = np.array([b[4] for b in bins], float)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.timeline.stream(
                {
                    "t": np.array([b[0] * 1000.0 for b in bins]),
                    "results": n,
                    "hit_rate": np.where(n > 0, 100 * hits / n, np.nan),
                    "indexing_rate": np.where(tried > 0, 100 * indexed / tried, np.nan),
                },
                rollover=TIMELINE_ROLLOVER,
            )

    # ---- interaction and the frame view ----------------------------------------------------------------------

    def on_raster_by(self, attr, old, new) -> None:
        self.cells.glyph.fill_color = {"field": new, "transform": self.cell_mapper}

    def on_tap_raster(self, event: Tap) -> None:
        """A tap inside a crystal's box opens its best frame (the strongest crystal's, where boxes overlap);
        elsewhere the frame of the cell tapped."""
        x, y = event.x, event.y
        if x is None or y is None:
            return
        c = self.crystals.data
        for k in range(len(c["left"])):
            if c["left"][k] <= x <= c["right"][k] and c["top"][k] <= y <= c["bottom"][k]:
                self.show_frame(int(c["best_frame"][k]), pinned=True)
                return
        frame = self.cell_frame.get((round(y), round(x)))
        if frame is not None:
            self.show_frame(frame, pinned=True)

    def update_frame(self) -> None:
        """While no frame is picked, the latest hit, at most every LATEST_HIT_EVERY seconds."""
        if self.pinned or self.latest_hit is None or self.loading or self.order is None:
            return
        if self.shown_frame == (self.order, self.latest_hit):
            return
        if time.monotonic() - self.last_frame_load < LATEST_HIT_EVERY:
            return
        self.show_frame(self.latest_hit, pinned=False)

    def show_frame(self, frame: int, pinned: bool) -> None:
        order = self.order
        view = self.model.by_order.get(order) if order is not None else None
        if view is None:
            return
        self.pinned = self.pinned or pinned
        self.loading = True
        self.last_frame_load = time.monotonic()
        future = self.executor.submit(self._read_frame, view, frame)
        future.add_done_callback(partial(self._hand_back, order, frame, pinned))

    def _hand_back(self, order: int, frame: int, pinned: bool, future) -> None:
        """On the worker: the frame read goes to the session's document (the one thread-safe way in),
        unless the browser has gone meanwhile."""
        if self.closed:
            return
        try:
            self.doc.add_next_tick_callback(partial(self._frame_read, order, frame, pinned, future))
        except Exception:  # the session closed between the check and the call: nobody to show it to
            pass

    def _read_frame(self, view, frame: int):
        try:
            return self.frames.info(view, frame)
        except FrameError as exc:
            return str(exc)
        except Exception as exc:  # a bug must not stop the session: said on the page
            return f"cannot show frame {frame}: {type(exc).__name__}: {exc}"

    def _frame_read(self, order: int, frame: int, pinned: bool, future) -> None:
        self.loading = False
        if order != self.order or (self.pinned and not pinned):
            return  # another series or a picked frame came meanwhile
        outcome = future.result()
        if isinstance(outcome, str):
            self.shown_frame = (order, frame)
            self.frame_note.text = html.escape(outcome)
            self.frame_fig.title.text = f"Frame {frame}"
            return
        rendered, info = outcome
        h, w = rendered.image.shape
        self.frame_image.data = {"image": [rendered.image], "dw": [w], "dh": [h]}
        self.frame_fig.x_range.update(start=0, end=w)
        self.frame_fig.y_range.update(start=h, end=0)
        spots = np.array(info["spots"], float).reshape(-1, 2)
        self.frame_spots.data = {"x": spots[:, 0], "y": spots[:, 1]}
        found = np.array(info["predicted"], float).reshape(-1, 2)
        self.frame_predicted.data = {"x": found[:, 0], "y": found[:, 1]}
        bx, by = info["beam"]
        rings = info["rings"]
        diagonal = [r["radius"] / math.sqrt(2) for r in rings]
        self.frame_rings.data = {
            "x": [bx] * len(rings),
            "y": [by] * len(rings),
            "r": [r["radius"] for r in rings],
            "color": [ICE if r["ice"] else RING for r in rings],
            "label": ["" if r["ice"] else f"{r['d']:g} A" for r in rings],
            "lx": [bx + d for d in diagonal],
            "ly": [by - d for d in diagonal],
        }
        self.frame_state.data = {
            "key": [info["key"]],
            "series": [info["series"]],
            "frame": [frame],
            "spots": [len(spots)],
            "predicted": [len(found)],
            "pinned": [pinned],
            "loaded": [True],
        }
        self.shown_frame = (order, frame)
        point, crystal = info["result"] or {}, info["indexing"]
        what = f"series {info['label']} frame {frame}: {point.get('n_spots', '?')} spots"
        if crystal:
            cell = " ".join(f"{v:.2f}" for v in crystal["unit_cell"])
            what += f"; indexed {crystal['lattice']} {crystal['space_group']} {cell}"
        elif info["predicted_note"]:
            what += f"; {info['predicted_note']}"
        self.frame_note.text = html.escape(what)
        self.frame_fig.title.text = f"Frame {frame}" + ("" if pinned else " (latest hit)")


def make_document(model: RunModel, frames: Frames, executor: Executor):
    """The function Bokeh's server calls for each new browser session."""

    def modify(doc: Document) -> None:
        Session(doc, model, frames, executor)

    return modify
