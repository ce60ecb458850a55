"""The Collector (MPI rank 0): gathers the readers' results and the Splitter's accounting, and
hands each frame's result to the sinks: the BluIce result line (UI endpoint, never blocking),
stdout (`--verbose`), a JSON-lines record (`--record`) and the GUI (PUB).

Every frame number of a series ends up exactly once in one of: processed, blank (pre-screened),
skipped (no reader free; from the Splitter), failed (an error, or its reader died with it).
A series is summed up once the Splitter has ended it and every forwarded frame has a result,
or, when a reader died holding frames, after the reader timeout. Accounts are keyed by the
Splitter's `series_name` and kept as frame-number ranges and binned counts, so a series of 10^6
frames costs a few kilobytes.

It also supervises the readers: a reader on this host that dies is noticed within a second and
replaced by a plain process on the dead rank's CPUs (readers talk ZeroMQ only, so no MPI is
needed for that); "no readers left" is said when it starts and when it ends.

Its accounts survive its own death: each result is appended to the open series' journal (a small
file in the daemon's state directory) before it is handed to the sinks, and a restarted Collector
(or the daemon, when none is left) replays the journals of series not yet summed up, so a frame
whose result was emitted is counted as that result said, once, and never emitted again.

Every message on its sockets is untrusted: one that does not parse, lacks a field or has a wrong
type is counted and reported (the first at once, then a count at most every 10 s), never raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from intxr.config import Configuration, _bind_host
from intxr.daemon import pid_alive
from intxr.messages import (
    STATUSES,
    BadMessage,
    FrameResult,
    RangeSet,
    ReaderStatus,
    SeriesEnd,
    SeriesSummary,
    SeriesTally,
    SeriesWritten,
    SplitterCounters,
    VersionMismatch,
    parse_json,
    series_key,
    series_label,
    splitter_event,
)
from intxr.raster import Hit, RasterReport, RasterScan, combine_3d, orthogonal
from intxr.report import Reporter
from intxr.sinks.result_line import format_result_line

HEALTH_INTERVAL = 1.0
KEEP_SERIES = 100  # finished series whose accounts are kept
KEEP_DONE_NAMES = 10_000  # names of series summed up (never summed up twice)
RANK_SILENT_AFTER = 3.0  # seconds without a status message before a reader is reported lost
READER_CHECK_INTERVAL = 0.5  # seconds between checks that the readers on this host are alive
REPLACE_LIMIT = 5  # replacements of one reader rank within REPLACE_WINDOW before giving up on it
REPLACE_WINDOW = 600.0
UNCONFIRMED_AFTER = 600.0  # seconds an account the Splitter never named is kept without a result
MAX_MESSAGE = 64 << 20  # bytes on the results socket, as the GUI's and the Splitter's
MAX_UNCONFIRMED = 100  # accounts the Splitter never named (a flood of made-up series numbers)
RASTER_LIVE_INTERVAL = 2.0  # seconds between the GUI's updates of a running raster series' crystals
RASTER_LIVE_MAX_HITS = 5_000  # a running series with more hits gets its crystals at its end only (~0.1 s a report)
JOURNAL_COMPACT_AFTER = 50_000  # result lines appended to a journal before it is rewritten as one snapshot


def bind_form(endpoint: str) -> str:
    """tcp://HOST:PORT as a bind address (localhost binds 127.0.0.1; see config._bind_host)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return f"tcp://{_bind_host(host)}:{port}"


def open_ui_socket(context, bl, *, linger_ms: int, immediate: bool):
    """BluIce's socket as the startup section says (uistype): a PUB bound to ui_endpoint, or a PUSH
    connected to it; 1000 lines queued at most. Whoever opens it closes it."""
    kind = zmq.PUB if bl.uistype == "pub" else zmq.PUSH
    sock = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    try:
        if kind == zmq.PUB:
            sock.bind(bind_form(bl.ui_endpoint))
        else:
            sock.connect(bl.ui_endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


# ---------------------------------------------------------------------------------------------
# A series' account: the tally of its results (intxr.messages, the GUI's too) and the Splitter's word


@dataclass
class SeriesAccount(SeriesTally):
    end: SeriesEnd | None = None  # the Splitter's series_end
    ended_at: float | None = None  # monotonic time the series_end arrived
    written: int | None = None
    master_file: str | None = None
    done: bool = False
    confirmed: bool = False  # the Splitter published something of this series
    touched: float = field(default_factory=time.monotonic)  # its latest result or event
    raster: RasterScan | None = None  # its hits on the grid (intxr.raster), until it is summed up
    raster_journaled: bool = False  # its journal says it is a raster ("R *")

    def take_end(self, end: SeriesEnd) -> None:
        self.end = end
        self.ended_at = time.monotonic()

    def lost(self) -> RangeSet:
        """Frames forwarded to readers that have no result (their reader, or the job, died)."""
        return (self.end.forwarded_set if self.end is not None else RangeSet()).minus(self.results)

    def complete(self) -> bool:
        return self.end is not None and len(self.lost()) == 0

    def summary(self) -> SeriesSummary:
        """The final summary: frames forwarded without a result count failed (lost)."""
        return SeriesTally.summary(self, self.end, self.written, self.master_file, final=True)


# ---------------------------------------------------------------------------------------------
# Journals: a series' account on disk, so that it survives the Collector
#
# One append-only text file per open series: a JSON header line ({"series", "series_name"}), then
# per batch of results "@<time>" and one line per result "<frame> <code> <hres|-> <latency|->"
# (code: h a hit, p processed without one, b blank, f failed), and "C" once the Splitter has named
# the series (a replayed account is not dropped as made up): what the account needs, about 20
# bytes a frame, never the spots. Past JOURNAL_COMPACT_AFTER lines it is rewritten as the header
# and one "S <account JSON>" line. A kill mid-write leaves a torn last line: ignored and cut off.
# A raster series (intxr.raster) adds "R *" once it is known to be one, and "R <hit JSON>" after
# each hit's line (its score, spots, hres, grid cell, indexed cell): its crystals survive too.

CODES = {"h": "processed", "p": "processed", "b": "blank", "f": "failed"}


def raster_journal_lines(account: SeriesAccount, hit) -> list[str]:
    """What the journal gets of a raster series for one result: "R *" and every hit kept so far
    the first time the series is known to be a raster, else the hit the result added."""
    scan = account.raster
    if scan is None or not scan.raster:
        return []
    if not account.raster_journaled:
        account.raster_journaled = True
        return ["R *\n"] + [f"R {json.dumps(h.to_row())}\n" for h in scan.hits.values()]
    return [f"R {json.dumps(hit.to_row())}\n"] if hit is not None else []


def journal_path(directory: str | os.PathLike, name: str) -> str:
    # A series name may be any file-path key's basename: the file is named by its digest.
    return os.path.join(directory, f"journal-{hashlib.sha1(name.encode()).hexdigest()[:20]}.txt")


def journal_paths(directory: str | os.PathLike) -> list[str]:
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, e) for e in sorted(entries) if e.startswith("journal-") and e.endswith(".txt")]


def _snapshot(account: SeriesAccount) -> dict:
    return {"results": account.results.ranges(), "counts": account.counts, "hits": account.hits,
            "hres": account.hres.bins, "hres_n": account.hres.n, "latencies": account.latencies.bins,
            "latencies_n": account.latencies.n, "first": account.first, "last": account.last}


def _take_snapshot(account: SeriesAccount, state: dict) -> None:
    account.results = RangeSet(state["results"])
    account.counts = {k: int(state["counts"].get(k, 0)) for k in STATUSES}
    account.hits = int(state["hits"])
    for q, key in ((account.hres, "hres"), (account.latencies, "latencies")):
        q.bins = {int(k): int(v) for k, v in state[key].items()}
        q.n = int(state[f"{key}_n"])
    account.first, account.last = state["first"], state["last"]


def read_journal(path: str) -> tuple[SeriesAccount, int, int]:
    """The account a journal holds, the length of its whole lines (what follows is a torn last
    line) and the number of lines it could not use. Raises OSError or ValueError for a file with
    no readable header."""
    with open(path, "rb") as f:
        header = json.loads(f.readline().decode())
        series, name = header["series"], header["series_name"]
        if not isinstance(series, int) or not isinstance(name, str):
            raise ValueError("no series in its header")
        account = SeriesAccount(series, name)
        good = f.tell()
        bad = 0
        now = None
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn by a kill mid-write
            good += len(line)
            try:
                text = line.decode()
                if text[0] == "@":
                    now = float(text[1:])
                    account.first = account.first or now
                    account.last = now
                elif text == "C\n":
                    account.confirmed = True  # the Splitter had named the series
                elif text[0] == "S":
                    _take_snapshot(account, json.loads(text[2:]))
                elif text[0] == "R":
                    scan = account.raster = account.raster or RasterScan()
                    scan.raster = account.raster_journaled = True
                    if text != "R *\n":
                        scan.keep(Hit.from_row(json.loads(text[2:])))
                else:
                    frame, code, hres, latency = text.split()
                    account.add(int(frame), CODES[code], code == "h", None if hres == "-" else float(hres),
                                None if latency == "-" else float(latency))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                bad += 1
    if account.raster is not None and account.results.starts:
        # Its frames: every frame with a result (the lines above hold them all).
        scan = account.raster
        scan.frames = len(account.results)
        scan.first_frame, scan.last_frame = account.results.starts[0], account.results.ends[-1]
    return account, good, bad


def final_raster_report(account: SeriesAccount, scan: RasterScan, row_length: int | None,
                        snake: bool) -> RasterReport:
    """A summed-up raster series' crystals, by the Collector or (no Collector left) the daemon: the
    grid starts at the series' first frame the Splitter received."""
    received = account.end.received_frames() if account.end is not None else None
    first = received.starts[0] if received else None
    return scan.report(account.series, account.name, row_length, snake, first)


class LateResult(Exception):
    """A result for a series already summed up (its frame was counted failed there)."""


# ---------------------------------------------------------------------------------------------
# Readers on this host: alive or not


def _clean_env() -> dict[str, str]:
    # A replacement reader is no MPI process: it must not try to join the job's PMIx server.
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}


@dataclass
class CollectorSettings:
    verbose: bool = False
    show_time: bool = False
    record: str | None = None
    result_format: str = "line"  # line | json
    max_series: int | None = None
    grace: float = 10.0  # seconds to wait for results of a series after its end
    reader_command: list[str] | None = None  # a replacement reader: this + [--reader RANK --parent PID]
    job_restarts: int = 0  # times the daemon restarted the MPI job before this Collector
    resume_file: str | None = None  # the daemon's accounts after a job restart (see daemon.py)
    state_dir: str | None = None  # the daemon's state directory: the open series' journals
    daemon: str | None = None  # HOST:PID of intxrd: a job it left behind (it was killed) ends itself


class Collector:
    def __init__(self, configuration: Configuration, settings: CollectorSettings, ranks: list[dict] | None = None):
        self.configuration = configuration
        self.settings = settings
        bl = configuration.beamline
        self.context = zmq.Context.instance()
        self.results = self.context.socket(zmq.PULL)
        self.results.setsockopt(zmq.RCVHWM, 100_000)
        self.results.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)  # a bigger one drops its sender's connection
        self.results.bind(bind_form(bl.collector_endpoint))
        self.splitter = self.context.socket(zmq.SUB)
        self.splitter.setsockopt(zmq.SUBSCRIBE, b"")
        self.splitter.connect(bl.splitter_publish_endpoint)
        self.publisher = self.context.socket(zmq.PUB)
        self.publisher.setsockopt(zmq.SNDHWM, 10_000)
        self.publisher.bind(bind_form(bl.results_publish_endpoint))
        self.ui = None
        if bl.send_to_ui:
            # Queue only to a listener that is there: with none, a send fails at once and is counted.
            self.ui = open_ui_socket(self.context, bl, linger_ms=0, immediate=True)
        self.record = open(settings.record, "a", encoding="utf-8") if settings.record else None
        self.series: dict[str, SeriesAccount] = {}
        self.done_names: deque[str] = deque(maxlen=KEEP_DONE_NAMES)
        self.done_set: set[str] = set()
        self.ranks: dict[int, dict] = {r["rank"]: dict(r) for r in (ranks or [])}
        self.host = os.uname().nodename
        self.children: dict[int, subprocess.Popen] = {}  # replacement readers by rank
        self.reader_restarts = 0
        self.no_readers_since: float | None = None
        self.bad_results = Reporter("collector", "malformed message", f"the results socket {bl.collector_endpoint}")
        self.other_version = Reporter("collector", "message of another version",
                                      f"the results socket {bl.collector_endpoint}")
        self.bad_splitter = Reporter("collector", "malformed message",
                                     f"the Splitter's socket {bl.splitter_publish_endpoint}")
        self.late_results = Reporter("collector", "late result", "the results socket (after its series was summed up)")
        self.unknown_series = Reporter("collector", "unknown series", "the results socket")
        self.bad_raster = Reporter("collector", "raster scan not summed up", note="; its crystals are not reported")
        self.reporters = (self.bad_results, self.other_version, self.bad_splitter, self.late_results,
                          self.unknown_series, self.bad_raster)
        self.splitter_counters: dict = {}
        self.splitter_heard = False
        self.resumed = settings.resume_file is None
        if settings.resume_file is not None:
            self.take_done_names()
        self.journals: dict[str, object] = {}  # open journal files by series name
        self.journal_lines: dict[str, int] = {}  # lines appended since the last snapshot
        self.journal_batch: set[str] = set()  # journals written in this batch (flushed before it is emitted)
        self.journal_off = settings.state_dir is None
        self.raster_row_length = bl.raster_row_length
        self.raster_snake = bl.raster_snake
        self.raster_min_score = bl.raster_min_score
        self.raster_sections = tuple(bl.raster_sections or ())
        self.raster_view: RasterReport | None = None  # the latest scan with an omega, awaiting its orthogonal one
        self.replay_journals()
        self.ui_sent = 0
        self.ui_dropped = 0
        self.results_total = 0
        self.series_done = 0
        self.started = time.monotonic()
        self.stopping = False

    # -- sinks ---------------------------------------------------------------------------------

    def _publish(self, topic: str, body: dict) -> None:
        self._publish_text(topic, json.dumps(body))

    def _publish_text(self, topic: str, text: str) -> None:
        try:
            self.publisher.send_multipart([topic.encode(), text.encode()], zmq.DONTWAIT)
        except zmq.Again:
            pass

    def result_line(self, result: FrameResult) -> str:
        bl = self.configuration.beamline
        header = result.header or {}
        master = result.master_file or header.get("master_file") or ""
        wire = result.to_wire()
        info = {
            **header,
            "series": result.series,
            "frame": result.frame,
            "filename": os.path.basename(str(header.get("master_file") or master)),
            "run_mode": result.processing_section,
            "beamline": bl.beamline,
            **{k: wire.get(k) for k in ("n_spots", "n_overloads", "score", "hres", "n_ice_rings")},
        }
        return format_result_line(
            info, wire, bl.output_format, bl.output_delimiter, bl.output_prefix_key, bl.default_output_prefix
        )

    def account(self, series: int, name: str | None, named: bool = True) -> SeriesAccount | None:
        """The account of a series (created on first sight); None for one already summed up.
        A result (named False) opens no account past MAX_UNCONFIRMED the Splitter has not named."""
        name = series_key(series, name)
        if name in self.done_set and name not in self.series:
            return None
        account = self.series.get(name)
        if account is None:
            if not named and sum(not a.confirmed and not a.done for a in self.series.values()) >= MAX_UNCONFIRMED:
                raise BadMessage(f"series {series_label(series, name)}: {MAX_UNCONFIRMED} series the Splitter has "
                                 f"not named are open already")
            account = self.series[name] = SeriesAccount(series, name)
        return account

    def take_result(self, result: FrameResult) -> None:
        series = self.account(result.series, result.series_name, named=False)
        if series is None or series.done:
            raise LateResult(f"series {result.series} frame {result.frame} (counted failed in its summary)")
        now = time.time()
        if result.received:
            result.latency = now - result.received
        if not series.add_result(result, now):
            raise BadMessage(f"series {result.series} frame {result.frame}: a second result")
        series.touched = time.monotonic()
        self.results_total += 1
        raster_lines = []
        try:
            if series.raster is None:
                series.raster = RasterScan(self.raster_sections, self.raster_min_score)
            hit = series.raster.add(result)
            raster_lines = raster_journal_lines(series, hit)
        except Exception as exc:  # a crystal map is never worth a result
            self.bad_raster(f"series {result.series} frame {result.frame}: {type(exc).__name__}: {exc}")
        if not self.journal_off:
            hit = result.hit and result.status == "processed"
            hres = result.hres if hit and result.hres and 0 < result.hres < 99 else None
            code = "h" if hit else result.status[0]  # h, or p b f: the status's initial
            latency = result.latency
            self.journal(series, now, f"{result.frame} {code} {f'{hres:.3f}' if hres else '-'} "
                                      f"{f'{latency:.5f}' if latency is not None else '-'}\n")
            for line in raster_lines:
                self.journal(series, now, line)

    def record_and_send(self, record_text: str, line: str) -> None:
        """The record first (a line seen anywhere is in the record), then BluIce's socket."""
        if self.record is not None:
            self.record.write(record_text + "\n")
            self.record.flush()
        if self.ui is not None:
            try:
                self.ui.send_string(line, zmq.DONTWAIT)
                self.ui_sent += 1
            except zmq.Again:
                self.ui_dropped += 1  # a slow or absent listener costs nothing; counted

    def emit(self, result: FrameResult) -> None:
        """Hand a taken (and journaled) result to the sinks."""
        line = self.result_line(result)
        result.line = line
        wire = result.to_wire()
        text = json.dumps(wire)
        self.record_and_send(text, line)
        if self.settings.verbose:
            print(text if self.settings.result_format == "json" else line, flush=True)
        rank = self.ranks.get(result.rank if result.rank is not None else -1)
        if rank is not None:
            rank["results"] = rank.get("results", 0) + 1
        self._publish_text("result", text)

    def take_status(self, status: ReaderStatus) -> None:
        """A reader's word (validated) updates only the reader's own fields of its rank: the
        Collector's state of the rank (dead, replaced_at, restarts, ...) is its own; pid and host
        are the rank's identity (MPI placement, or the replacement the Collector started)."""
        number = status.rank
        rank = self.ranks.get(number)
        child = self.children.get(number)
        pid = status.pid
        if rank is None:
            if self.ranks:  # the job's ranks are known from MPI: a stranger is not one of them
                raise BadMessage(f"status from rank {number}, which is not a reader of this job")
            rank = self.ranks[number] = {"rank": number}
        elif pid is not None and pid == rank.get("replaced_pid"):
            return  # a late word from the reader this one replaced
        elif rank.get("dead") and pid == rank.get("pid"):
            return
        known = child.pid if child is not None else rank.get("pid")
        if pid is not None and known is not None and pid != known and not (rank.get("dead") and child is None):
            raise BadMessage(f"status for rank {number} from pid {pid}, not its reader's pid {known}")
        if rank.get("lost"):
            print(f"collector: reader rank {number} is back", file=sys.stderr, flush=True)
        rank.update(status.reader_fields(), seen=time.monotonic(), lost=False, starting=False, dead=False)
        if pid is not None:
            rank["pid"] = pid
        if status.host is not None and rank.get("host") is None:
            rank["host"] = status.host

    def take_splitter(self, topic: str, event) -> None:
        self.splitter_heard = True
        if isinstance(event, SplitterCounters):
            self.splitter_counters = event.to_wire()
            self._publish("splitter", self.splitter_counters)
            return
        self.take_series_event(event)
        if topic != "series_start":  # the GUI gets a series from its first result
            self._publish(f"splitter_{topic}", event.to_wire())

    def take_series_event(self, event) -> None:
        """A SeriesStart, SeriesEnd or SeriesWritten of the Splitter (or the daemon's account of one)."""
        series = self.account(event.series, event.series_name)
        if series is None or series.done:
            return  # the Splitter repeats series events for late subscribers
        if not series.confirmed and series.name in self.journals and not self.journal_off:
            try:
                self.journals[series.name].write("C\n")
                self.journals[series.name].flush()  # series events are rare
            except OSError as exc:
                self.journal_failed(f"series {series.name}", exc)
        series.confirmed = True
        series.touched = time.monotonic()
        if isinstance(event, SeriesEnd) and series.end is None:
            series.take_end(event)
        elif isinstance(event, SeriesWritten) and series.written is None:
            series.written = event.frames_written
            series.master_file = event.master_file

    def read_resume(self) -> dict:
        try:
            with open(self.settings.resume_file, encoding="utf-8") as f:
                state = json.load(f)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return state
        except (OSError, ValueError) as exc:
            print(f"collector: cannot read the daemon's accounts {self.settings.resume_file}: {exc}",
                  file=sys.stderr, flush=True)
            return {}

    def take_done_names(self) -> None:
        """At start, before any series event: the series the previous Collector summed up are
        never summed up again (the Splitter repeats its latest events to new subscribers)."""
        self.take_done_names_from(self.read_resume())

    def take_resume(self) -> None:
        """After a job restart: the Splitter's accounts of series that ended while no Collector
        listened. Read once this Collector hears the Splitter, so that a series that ends later
        comes on the socket (the daemon rewrites the file until then; see daemon.py)."""
        self.resumed = True
        state = self.read_resume()
        self.take_done_names_from(state)
        for body in state.get("accounts") or []:
            if not isinstance(body, dict):
                continue
            # An account holds what the Splitter published of the series: its end (`timed_out` is
            # always there), and its files' `frames_written` once closed (that may come first).
            events = [t for t, key in (("series_end", "timed_out"), ("series_written", "frames_written"))
                      if key in body]
            try:
                parsed = [splitter_event(topic, body) for topic in events]
            except BadMessage as exc:
                self.bad_splitter(f"the daemon's account of series {body.get('series')}: {exc}")
                continue
            for event in parsed:
                self.take_series_event(event)

    def take_done_names_from(self, state: dict) -> None:
        for name in state.get("done") or []:
            if isinstance(name, str) and name not in self.done_set:
                self.mark_done(name)
                account = self.series.get(name)
                if account is not None and not account.done:
                    del self.series[name]  # summed up by the Collector before this one
                    self.forget_journal(name)

    def mark_done(self, name: str) -> None:
        if name in self.done_set:
            return
        if len(self.done_names) == self.done_names.maxlen:
            self.done_set.discard(self.done_names[0])
        self.done_names.append(name)
        self.done_set.add(name)

    # -- journals ------------------------------------------------------------------------------

    def journal_failed(self, what: str, exc: OSError) -> None:
        self.journal_off = True
        print(f"collector: cannot journal {what} in {self.settings.state_dir}: {exc.strerror or exc}; "
              f"going on without (a restarted Collector would count the results taken since as failed)",
              file=sys.stderr, flush=True)

    def journal(self, account: SeriesAccount, now: float, line: str) -> None:
        name = account.name
        try:
            f = self.journals.get(name)
            if f is None:
                f = self.journals[name] = open(journal_path(self.settings.state_dir, name), "a", encoding="utf-8")
                if f.tell() == 0:
                    f.write(json.dumps({"series": account.series, "series_name": name}) + "\n")
                    if account.confirmed:
                        f.write("C\n")
                self.journal_lines.setdefault(name, 0)
            if name not in self.journal_batch:
                self.journal_batch.add(name)
                f.write(f"@{now:.3f}\n")
            f.write(line)
            self.journal_lines[name] += 1
        except OSError as exc:
            self.journal_failed(f"series {series_label(account.series, name)}", exc)

    def flush_journals(self) -> None:
        for name in self.journal_batch:
            f = self.journals.get(name)
            if f is None or self.journal_off:
                continue
            try:
                f.flush()
                if self.journal_lines[name] >= JOURNAL_COMPACT_AFTER:
                    self.compact_journal(self.series[name])
            except OSError as exc:
                self.journal_failed(f"series {name}", exc)
        self.journal_batch.clear()

    def compact_journal(self, account: SeriesAccount) -> None:
        """Rewrite a long journal as one snapshot of the account (a 10^6-frame series stays small).
        The new file replaces the old at once: a kill leaves one or the other."""
        path = journal_path(self.settings.state_dir, account.name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"series": account.series, "series_name": account.name}) + "\n")
            f.write("S " + json.dumps(_snapshot(account)) + "\n" + ("C\n" if account.confirmed else ""))
            if account.raster_journaled:
                account.raster_journaled = False
                f.writelines(raster_journal_lines(account, None))
        self.journals.pop(account.name).close()
        os.replace(tmp, path)
        self.journals[account.name] = open(path, "a", encoding="utf-8")
        self.journal_lines[account.name] = 0

    def forget_journal(self, name: str) -> None:
        """The series is summed up (or dropped): its journal goes."""
        f = self.journals.pop(name, None)
        self.journal_lines.pop(name, None)
        self.journal_batch.discard(name)
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        if self.settings.state_dir is not None:
            try:
                os.unlink(journal_path(self.settings.state_dir, name))
            except OSError:
                pass

    def replay_journals(self) -> None:
        """At start, before any message: the accounts of the Collector before this one, of the
        series it had not summed up, from their journals."""
        if self.settings.state_dir is None:
            return
        for path in journal_paths(self.settings.state_dir):
            try:
                account, good, bad = read_journal(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"collector: journal {path} unreadable ({type(exc).__name__}: {exc}): removed; the "
                      f"results it held count as failed", file=sys.stderr, flush=True)
                os.unlink(path)
                continue
            label = series_label(account.series, account.name)
            if account.name in self.done_set or path != journal_path(self.settings.state_dir, account.name):
                os.unlink(path)  # summed up already (killed before its journal went)
                continue
            torn = os.path.getsize(path) - good
            if torn:
                os.truncate(path, good)  # the next line appended starts on a line of its own
            self.series[account.name] = account
            self.journal_lines[account.name] = 0
            if account.raster is not None:
                account.raster.sections, account.raster.min_score = self.raster_sections, self.raster_min_score
            print(f"collector: series {label}: {len(account.results)} result(s) taken by the Collector "
                  f"before this one, from its journal" + (f" (a torn last line of {torn} bytes cut off)" if torn
                                                          else "") + (f"; {bad} unreadable line(s) ignored"
                                                                      if bad else ""),
                  file=sys.stderr, flush=True)

    # -- receiving -----------------------------------------------------------------------------

    def receive_results(self, block_ms: int = 0) -> int:
        n = 0
        taken: list[FrameResult] = []
        for _ in range(1000):
            try:
                parts = self.results.recv_multipart(zmq.NOBLOCK if not block_ms else 0)
            except zmq.Again:
                break
            n += 1
            try:
                if len(parts) != 2:
                    raise BadMessage(f"{len(parts)} parts, not 2 (kind, JSON)")
                kind = parts[0]
                if kind not in (b"result", b"status"):
                    raise BadMessage(f"unknown kind {bytes(kind[:30])!r}")
                message = parse_json(parts[1])
                if kind == b"result":
                    result = FrameResult.from_wire(message)
                    self.take_result(result)
                    taken.append(result)
                else:
                    self.take_status(ReaderStatus.from_wire(message))
            except VersionMismatch as exc:
                self.other_version(f"{kind.decode(errors='replace')}: {exc}")
            except BadMessage as exc:
                self.bad_results(str(exc))
            except LateResult as exc:
                self.late_results(str(exc))
            except Exception as exc:  # a message that passed the checks and still broke something
                self.bad_results(f"{type(exc).__name__}: {exc}")
        # Journaled before emitted: whatever a sink has seen, a restarted Collector counts.
        self.flush_journals()
        for result in taken:
            try:
                self.emit(result)
            except Exception as exc:
                self.bad_results(f"{type(exc).__name__}: {exc}")
        return n

    def receive_splitter(self) -> int:
        n = 0
        for _ in range(1000):
            try:
                parts = self.splitter.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            try:
                if len(parts) != 2:
                    raise BadMessage(f"{len(parts)} parts, not 2 (topic, JSON)")
                try:
                    topic = parts[0].decode()
                except UnicodeDecodeError:
                    raise BadMessage(f"topic {bytes(parts[0][:30])!r} is not text") from None
                self.take_splitter(topic, splitter_event(topic, parse_json(parts[1])))
            except BadMessage as exc:
                self.bad_splitter(str(exc))
            except Exception as exc:
                self.bad_splitter(f"{type(exc).__name__}: {exc}")
        return n

    # -- bookkeeping ---------------------------------------------------------------------------

    def drop_unconfirmed(self, account: SeriesAccount, why: str) -> None:
        """Results for a series the Splitter never named (made up, or from a job long gone) are
        not summed up as a series: that is the Splitter's word."""
        del self.series[account.name]
        self.forget_journal(account.name)
        self.unknown_series(f"series {series_label(account.series, account.name)}: {len(account.results)} result(s) "
                            f"and no word of the series from the Splitter ({why}): not summed up")

    def check_series(self) -> None:
        now = time.monotonic()
        unconfirmed = [a for a in self.series.values() if not a.confirmed and not a.done]
        for account in unconfirmed:
            if now - account.touched > UNCONFIRMED_AFTER:
                self.drop_unconfirmed(account, f"nothing for {UNCONFIRMED_AFTER / 60:.0f} min")
        if len(unconfirmed) > MAX_UNCONFIRMED:
            for account in sorted(unconfirmed, key=lambda a: a.touched)[:len(unconfirmed) - MAX_UNCONFIRMED]:
                if account.name in self.series:
                    self.drop_unconfirmed(account, f"over {MAX_UNCONFIRMED} such series")
        for account in list(self.series.values()):
            if account.done or account.end is None:
                continue
            waited = time.monotonic() - (account.ended_at or 0)
            # Results of frames forwarded late can arrive after the end: give them the grace time.
            if account.complete() and (account.written is not None or waited > 2.0) or waited > self.settings.grace:
                self.finish_series(account)

    def finish_series(self, account: SeriesAccount) -> None:
        account.done = True
        self.mark_done(account.name)
        summary = account.summary()
        print(summary.line(), flush=True)
        if summary.lost:
            print(f"collector: series {series_label(account.series, account.name)}: no result for "
                  f"{summary.lost} frame(s) {_show_ranges(summary.lost_ranges)} (their reader or the job "
                  f"died, or they timed out): counted as failed", file=sys.stderr, flush=True)
        if self.record is not None:
            self.record.write(json.dumps({"summary": summary.to_wire()}) + "\n")
            self.record.flush()
        self._publish("series", summary.to_wire())
        self.report_raster(account)
        self.forget_journal(account.name)
        self.series_done += 1
        # A daemon runs for weeks: keep the accounts of the latest series only.
        done = [a for a in self.series.values() if a.done]
        for old in done[:-KEEP_SERIES]:
            del self.series[old.name]
        if self.settings.max_series is not None and self.series_done >= self.settings.max_series:
            self.stopping = True

    def report_raster(self, account: SeriesAccount) -> None:
        """A raster series' crystals (intxr.raster): one RASTER line to BluIce, stdout and the
        record, and `raster` for the GUI."""
        scan, account.raster = account.raster, None
        if scan is None or not scan.raster:
            return
        try:
            report = final_raster_report(account, scan, self.raster_row_length, self.raster_snake)
            line = report.line()
            wire = report.to_wire()
        except Exception as exc:
            self.bad_raster(f"series {series_label(account.series, account.name)}: {type(exc).__name__}: {exc}")
            return
        self._announce("raster", line, wire)
        # Two orthogonal scans one after the other (omega in their headers): their crystals in 3-D.
        view, self.raster_view = self.raster_view, report if report.omega is not None else None
        if view is None or not orthogonal(view.omega, report.omega):
            return
        self.raster_view = None  # a pair is used once
        try:
            combined = combine_3d(view, report)
            line, wire = combined.line(), combined.to_wire()
        except Exception as exc:
            self.bad_raster(f"series {view.series} and {account.series} in 3-D: {type(exc).__name__}: {exc}")
            return
        self._announce("raster3d", line, wire)

    def _announce(self, kind: str, line: str, wire: dict) -> None:
        """A scan's line to stdout, the record (`{kind: wire}`) and BluIce, and `kind` for the GUI."""
        print(line, flush=True)
        self.record_and_send(json.dumps({kind: wire}), line)
        self._publish(kind, wire)

    def publish_live_rasters(self) -> int:
        """The crystals so far of each running raster series with new hits, for the GUI only
        (`raster` with `final` false); BluIce and the record get the line once, at the series' end."""
        n = 0
        for account in list(self.series.values()):
            scan = account.raster
            if account.done or scan is None or not scan.raster or not scan.changed or \
                    len(scan.hits) > RASTER_LIVE_MAX_HITS:
                continue
            try:
                report = scan.report(account.series, account.name, self.raster_row_length, self.raster_snake)
            except Exception as exc:
                self.bad_raster(f"series {series_label(account.series, account.name)}: {type(exc).__name__}: {exc}")
                continue
            report.final = False
            self._publish("raster", report.to_wire())
            n += 1
        return n

    # -- readers -------------------------------------------------------------------------------

    def readers_alive(self) -> int:
        return sum(1 for r in self.ranks.values()
                   if r["rank"] > 0 and not (r.get("dead") or r.get("lost") or r.get("starting")))

    def daemon_gone(self) -> bool:
        host, _, pid = (self.settings.daemon or "").rpartition(":")
        if host != self.host or not pid.isdigit() or pid_alive(int(pid)):
            return False
        print(f"collector: the daemon (pid {pid}) is gone: summing up and stopping the job", file=sys.stderr,
              flush=True)
        return True

    def check_readers(self) -> None:
        now = time.monotonic()
        for number, rank in sorted(self.ranks.items()):
            if number <= 0 or rank.get("dead"):
                continue
            child = self.children.get(number)
            if child is not None:
                code = child.poll()
                died = code is not None
                how = f"exit status {code}" if code is not None and code >= 0 else \
                    f"killed by {signal.Signals(-code).name}" if code is not None else ""
            elif rank.get("host") == self.host and isinstance(rank.get("pid"), int):
                died, how = not pid_alive(rank["pid"]), "its process is gone"
            else:
                died = False  # on another host: silence says it (health())
            if not died:
                if rank.get("starting") and now - rank.get("started_at", now) > 60:
                    rank.update(starting=False, dead=True)
                    print(f"collector: replacement reader rank {number} (pid {rank.get('pid')}) said nothing "
                          f"in 60 s: given up", file=sys.stderr, flush=True)
                continue
            rank.update(dead=True, lost=False, starting=False)
            print(f"collector: reader rank {number} (pid {rank.get('pid')}, CPU {rank.get('cpu')}) died ({how}); "
                  f"the frame it held is counted failed", file=sys.stderr, flush=True)
            self.replace_reader(number, rank)
        self.check_no_readers()

    def replace_reader(self, number: int, rank: dict) -> None:
        if self.stopping or not self.settings.reader_command:
            return
        if rank.get("host") not in (None, self.host):
            print(f"collector: reader rank {number} ran on {rank['host']}: a reader on another host is not "
                  f"replaced; {self.readers_alive()} reader(s) left", file=sys.stderr, flush=True)
            return
        now = time.monotonic()
        history = [t for t in rank.get("replaced_at", []) if now - t < REPLACE_WINDOW]
        if len(history) >= REPLACE_LIMIT:
            if not rank.get("given_up"):
                rank["given_up"] = True
                print(f"collector: reader rank {number} died {len(history) + 1} times in "
                      f"{REPLACE_WINDOW / 60:.0f} min: not replaced again; {self.readers_alive()} reader(s) left",
                      file=sys.stderr, flush=True)
            return
        cpus = [c for c in rank.get("cpus") or [] if isinstance(c, int)] or sorted(os.sched_getaffinity(0))
        command = [*self.settings.reader_command, "--reader", str(number), "--parent", str(os.getpid())]
        try:
            child = subprocess.Popen(command, env=_clean_env(), stdin=subprocess.DEVNULL)
        except OSError as exc:
            print(f"collector: cannot start a replacement for reader rank {number}: {exc}",
                  file=sys.stderr, flush=True)
            return
        try:
            os.sched_setaffinity(child.pid, cpus)
        except OSError as exc:
            print(f"collector: replacement reader rank {number}: cannot bind it to CPUs {cpus}: {exc}",
                  file=sys.stderr, flush=True)
        self.children[number] = child  # the one it replaces has exited (poll() reaped it)
        if rank.get("pid") is not None:
            rank["replaced_pid"] = rank["pid"]
        history.append(now)
        self.reader_restarts += 1
        rank.update(pid=child.pid, dead=False, starting=True, started_at=now, replaced_at=history,
                    restarts=rank.get("restarts", 0) + 1, host=self.host)
        print(f"collector: reader rank {number} replaced: pid {child.pid} on CPU(s) {_show_cpus(cpus)} "
              f"(replacement {rank['restarts']} of this rank, {self.reader_restarts} in all)",
              file=sys.stderr, flush=True)

    def check_no_readers(self) -> None:
        readers = [r for r in self.ranks.values() if r["rank"] > 0]
        if not readers:
            return
        alive = self.readers_alive()
        if alive == 0 and self.no_readers_since is None:
            self.no_readers_since = time.monotonic()
            print(f"collector: NO READERS LEFT: frames are not processed (the Splitter writes them and counts "
                  f"them skipped) until a reader is back ({len(readers)} rank(s) dead or lost)",
                  file=sys.stderr, flush=True)
        elif alive and self.no_readers_since is not None:
            print(f"collector: readers back: {alive} reader(s) processing again after "
                  f"{time.monotonic() - self.no_readers_since:.1f} s without any", file=sys.stderr, flush=True)
            self.no_readers_since = None

    def stop_children(self) -> None:
        deadline = time.monotonic() + 3.0
        for child in self.children.values():
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(3)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

    # -- health --------------------------------------------------------------------------------

    def health(self) -> dict:
        now = time.monotonic()
        for rank in self.ranks.values():
            if rank.get("rank", 0) <= 0 or "seen" not in rank or rank.get("dead"):
                continue
            if not rank.get("lost") and now - rank["seen"] > RANK_SILENT_AFTER:
                rank["lost"] = True
                print(f"collector: reader rank {rank['rank']} (pid {rank.get('pid')}, host {rank.get('host')}) "
                      f"silent for {now - rank['seen']:.0f} s: lost; the other readers go on",
                      file=sys.stderr, flush=True)
        self.check_no_readers()
        hidden = ("seen", "started_at", "replaced_at")
        body = {
            "time": time.time(),
            "collector_pid": os.getpid(),
            "ranks": [{k: v for k, v in r.items() if k not in hidden}
                      for r in sorted(self.ranks.values(), key=lambda r: r["rank"])],
            "readers_alive": self.readers_alive(),
            "no_readers": self.no_readers_since is not None,
            "no_readers_for": round(now - self.no_readers_since, 1) if self.no_readers_since is not None else 0.0,
            "reader_restarts": self.reader_restarts,
            "job_restarts": self.settings.job_restarts,
            "resumed": self.resumed,
            "ending": self.stopping,  # summing up to end: the daemon does not take the exit for a failure
            "malformed_results": self.bad_results.count,
            "other_version_results": self.other_version.count,
            "malformed_splitter": self.bad_splitter.count,
            "late_results": self.late_results.count,
            "unknown_series": self.unknown_series.count,
            "results": self.results_total,
            "series_done": self.series_done,
            "ui_sent": self.ui_sent,
            "ui_dropped": self.ui_dropped,
            "splitter": self.splitter_counters,
        }
        self._publish("health", body)
        for reporter in self.reporters:
            reporter.tick()
        return body

    def print_rate(self) -> None:
        elapsed = time.monotonic() - self.started
        rates = ", ".join(
            f"rank {r['rank']} cpu {r.get('cpu')} numa {r.get('numa')} (buffers {r.get('buffer_numa', '?')}) "
            f"{r.get('rate', 0):.1f}/s"
            + (" LOST" if r.get("lost") else "") + (" DEAD" if r.get("dead") else "")
            for r in sorted(self.ranks.values(), key=lambda r: r["rank"])
            if r["rank"] > 0
        )
        print(f"collector: {self.results_total} results in {elapsed:.1f} s "
              f"({self.results_total / max(elapsed, 1e-9):.1f} frames/s); {rates}", file=sys.stderr, flush=True)

    # -- the loop ------------------------------------------------------------------------------

    def step(self, poller: zmq.Poller, timeout_ms: int = 100) -> int:
        events = dict(poller.poll(timeout_ms))
        n = 0
        if self.results in events:
            n += self.receive_results()
        if self.splitter in events:
            n += self.receive_splitter()
        if not self.resumed and (self.splitter_heard or time.monotonic() - self.started > 10):
            self.take_resume()
        return n

    def run(self, stop=None) -> int:
        poller = zmq.Poller()
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.splitter, zmq.POLLIN)
        last_health = last_rate = last_check = last_raster = time.monotonic()
        self.health()  # the daemon starts the detector on the first health: say it at once
        while not self.stopping and not (stop is not None and stop()):
            self.step(poller)
            self.check_series()
            now = time.monotonic()
            if now - last_check >= READER_CHECK_INTERVAL:
                self.check_readers()
                last_check = now
                if self.daemon_gone():
                    break
            if now - last_health >= HEALTH_INTERVAL:
                self.health()
                last_health = now
            if now - last_raster >= RASTER_LIVE_INTERVAL:
                self.publish_live_rasters()
                last_raster = now
            if self.settings.show_time and now - last_rate >= 5.0:
                self.print_rate()
                last_rate = now
        return self.shutdown(poller)

    def shutdown(self, poller: zmq.Poller | None = None) -> int:
        """Sum up every series before the readers stop. The daemon stops the Splitter (its last
        series_end is published) before it asks this Collector to stop, so the accounts are whole:
        wait a little for results still in flight, and for series whose end has come to complete."""
        self.stopping = True
        self.health()
        if poller is None:
            poller = zmq.Poller()
            poller.register(self.results, zmq.POLLIN)
            poller.register(self.splitter, zmq.POLLIN)
        deadline = time.monotonic() + min(self.settings.grace, 5.0)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.step(poller, 50):
                quiet_since = time.monotonic()
            self.check_series()
            waiting = [a for a in self.series.values() if not a.done and a.end is not None]
            if not waiting and time.monotonic() - quiet_since > 0.5:
                break
        if not self.resumed:
            self.take_resume()
        self.health()  # a reader that died near the end is reported too
        for account in list(self.series.values()):
            if account.done:
                continue
            if account.confirmed:
                self.finish_series(account)
            else:
                self.drop_unconfirmed(account, "at shutdown")
        if self.settings.show_time:
            self.print_rate()
        if self.ui is not None:
            print(f"collector: {self.ui_sent} result lines sent to {self.configuration.beamline.ui_endpoint}, "
                  f"{self.ui_dropped} dropped (no listener or a slow one)", file=sys.stderr, flush=True)
        for reporter in self.reporters:
            reporter.flush()
        # Readers stop when told; a few repeats so that late subscribers hear it too.
        for _ in range(5):
            self._publish("stop", {"time": time.time()})
            time.sleep(0.05)
        self.stop_children()
        if self.record is not None:
            self.record.close()
        for sock in (self.results, self.splitter, self.publisher, self.ui):
            if sock is not None:
                sock.close(linger=500)
        return 0


def _show_ranges(ranges: list[list[int]], limit: int = 8) -> str:
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return text + (f", ... ({len(ranges)} ranges)" if len(ranges) > limit else "")


def _show_cpus(cpus: list[int]) -> str:
    return _show_ranges(RangeSet.of(cpus).ranges(), 16)
