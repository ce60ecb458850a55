"""The Collector (MPI rank 0): gathers the readers' results and the Splitter's accounting, and
hands each frame's result to the sinks: the BluIce result line (UI endpoint, never blocking),
stdout (`--verbose`), a JSON-lines record (`--record`) and the GUI (PUB).

Every frame number of a series ends up exactly once in one of: processed, blank (pre-screened),
skipped (no reader free; from the Splitter), failed (an error, or its reader died with it).
A series is summed up once the Splitter has ended it and every forwarded frame has a result,
or, when a reader died holding frames, after the reader timeout.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import zmq

from intxr.config import Configuration, _bind_host
from intxr.sinks.result_line import format_result_line

HEALTH_INTERVAL = 1.0
KEEP_SERIES = 100  # finished series whose accounts are kept
RANK_SILENT_AFTER = 3.0  # seconds without a status message before a reader is reported lost


def bind_form(endpoint: str) -> str:
    """tcp://HOST:PORT as a bind address (a host name binds every interface)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return f"tcp://{_bind_host(host)}:{port}"


@dataclass
class SeriesAccount:
    series: int
    statuses: dict[int, str] = field(default_factory=dict)  # frame -> processed | blank | failed
    hits: int = 0
    hres: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    end: dict | None = None  # the Splitter's series_end
    ended_at: float | None = None  # monotonic time the series_end arrived
    written: int | None = None
    master_file: str | None = None
    done: bool = False

    def complete(self) -> bool:
        if self.end is None:
            return False
        forwarded = set(self.end.get("forwarded_frames", []))
        return forwarded <= set(self.statuses)

    def summary(self) -> dict:
        end = self.end or {}
        skipped = set(end.get("skipped_frames", []))
        lost = sorted(set(end.get("forwarded_frames", [])) - set(self.statuses))
        counts = {s: 0 for s in ("processed", "blank", "failed")}
        for status in self.statuses.values():
            counts[status] = counts.get(status, 0) + 1
        elapsed = (self.last - self.first) if self.first and self.last and self.last > self.first else None
        n_results = len(self.statuses)
        lat = sorted(self.latencies)
        return {
            "series": self.series,
            "received": end.get("received", n_results),
            "written": self.written,
            "processed": counts["processed"],
            "hits": self.hits,
            "blank": counts["blank"],
            "skipped": len(skipped),
            "failed": counts["failed"] + len(lost),
            "lost_frames": lost,
            "skipped_frames": sorted(skipped),
            "hit_rate": self.hits / n_results if n_results else 0.0,
            "median_hres": statistics.median(self.hres) if self.hres else None,
            "rate": (n_results - 1) / elapsed if elapsed and n_results > 1 else None,
            "latency_p50": lat[len(lat) // 2] if lat else None,
            "latency_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "master_file": self.master_file,
            "timed_out": bool(end.get("timed_out")),
        }


def summary_line(s: dict) -> str:
    rate = f"{s['rate']:.1f} frames/s" if s["rate"] else "rate n/a"
    lat = (
        f"latency p50 {s['latency_p50']:.3f} s p99 {s['latency_p99']:.3f} s"
        if s["latency_p50"] is not None
        else "latency n/a"
    )
    hres = f"{s['median_hres']:.2f} A" if s["median_hres"] is not None else "n/a"
    return (
        f"SERIES {s['series']}: received {s['received']}, written {s['written'] if s['written'] is not None else '?'}, "
        f"processed {s['processed']} (hits {s['hits']}, median hres {hres}), blank {s['blank']}, "
        f"skipped {s['skipped']}, failed {s['failed']}; {rate}, {lat}"
    )


@dataclass
class CollectorSettings:
    verbose: bool = False
    show_time: bool = False
    record: str | None = None
    result_format: str = "line"  # line | json
    max_series: int | None = None
    grace: float = 10.0  # seconds to wait for results of a series after its end


class Collector:
    def __init__(self, configuration: Configuration, settings: CollectorSettings, ranks: list[dict] | None = None):
        self.configuration = configuration
        self.settings = settings
        bl = configuration.beamline
        self.context = zmq.Context.instance()
        self.results = self.context.socket(zmq.PULL)
        self.results.bind(bind_form(bl.collector_endpoint))
        self.splitter = self.context.socket(zmq.SUB)
        self.splitter.setsockopt(zmq.SUBSCRIBE, b"")
        self.splitter.connect(bl.splitter_publish_endpoint)
        self.publisher = self.context.socket(zmq.PUB)
        self.publisher.setsockopt(zmq.SNDHWM, 10_000)
        self.publisher.bind(bind_form(bl.results_publish_endpoint))
        self.ui = None
        if bl.send_to_ui:
            kind = zmq.PUB if bl.uistype == "pub" else zmq.PUSH
            self.ui = self.context.socket(kind)
            self.ui.setsockopt(zmq.SNDHWM, 1000)
            self.ui.setsockopt(zmq.LINGER, 0)
            # Queue only to a listener that is there: with none, a send fails at once and is counted.
            self.ui.setsockopt(zmq.IMMEDIATE, 1)
            if kind == zmq.PUB:
                self.ui.bind(bind_form(bl.ui_endpoint))
            else:
                self.ui.connect(bl.ui_endpoint)
        self.record = open(settings.record, "a", encoding="utf-8") if settings.record else None
        self.series: dict[int, SeriesAccount] = {}
        self.ranks: dict[int, dict] = {r["rank"]: dict(r) for r in (ranks or [])}
        self.splitter_counters: dict = {}
        self.ui_sent = 0
        self.ui_dropped = 0
        self.results_total = 0
        self.series_done = 0
        self.started = time.monotonic()
        self.stopping = False

    # -- sinks ---------------------------------------------------------------------------------

    def _publish(self, topic: str, body: dict) -> None:
        try:
            self.publisher.send_multipart([topic.encode(), json.dumps(body).encode()], zmq.DONTWAIT)
        except zmq.Again:
            pass

    def result_line(self, result: dict) -> str:
        bl = self.configuration.beamline
        header = result.get("header", {})
        master = result.get("master_file") or header.get("master_file") or ""
        info = {
            **header,
            "series": result["series"],
            "frame": result["frame"],
            "filename": os.path.basename(header.get("master_file") or master),
            "run_mode": result.get("processing_section"),
            "beamline": bl.beamline,
            **{k: result.get(k) for k in ("n_spots", "n_overloads", "score", "hres", "n_ice_rings")},
        }
        return format_result_line(
            info, result, bl.output_format, bl.output_delimiter, bl.output_prefix_key, bl.default_output_prefix
        )

    def take_result(self, result: dict) -> None:
        series = self.series.setdefault(result["series"], SeriesAccount(result["series"]))
        status = result.get("status", "failed")
        if result["frame"] in series.statuses:
            print(f"collector: series {result['series']} frame {result['frame']}: second result ignored",
                  file=sys.stderr)
            return
        series.statuses[result["frame"]] = status
        min_peaks = self.configuration.processing.default.min_bragg_peaks
        if status == "processed" and result.get("n_spots", 0) >= min_peaks:
            series.hits += 1
            if result.get("hres") and 0 < result["hres"] < 99:
                series.hres.append(result["hres"])
        now = time.time()
        if result.get("received"):
            result["latency"] = now - result["received"]
            series.latencies.append(result["latency"])
        series.first = series.first or now
        series.last = now
        self.results_total += 1
        line = self.result_line(result)
        result["line"] = line
        if self.ui is not None:
            try:
                self.ui.send_string(line, zmq.DONTWAIT)
                self.ui_sent += 1
            except zmq.Again:
                self.ui_dropped += 1  # a slow or absent listener costs nothing; counted
        if self.settings.verbose:
            print(json.dumps(result) if self.settings.result_format == "json" else line, flush=True)
        if self.record is not None:
            self.record.write(json.dumps(result) + "\n")
            self.record.flush()
        rank = self.ranks.setdefault(result.get("rank", -1), {"rank": result.get("rank", -1)})
        rank["results"] = rank.get("results", 0) + 1
        self._publish("result", result)

    def take_status(self, status: dict) -> None:
        rank = self.ranks.setdefault(status["rank"], {"rank": status["rank"]})
        if rank.get("lost"):
            print(f"collector: reader rank {status['rank']} is back", file=sys.stderr)
        rank.update(status, seen=time.monotonic(), lost=False)

    def take_splitter(self, topic: str, body: dict) -> None:
        if topic == "counters":
            self.splitter_counters = body
            self._publish("splitter", body)
            return
        series = self.series.setdefault(body["series"], SeriesAccount(body["series"]))
        if topic == "series_end":
            if series.end is not None:
                return  # the Splitter repeats series events for late subscribers
            series.end = body
            series.ended_at = time.monotonic()
        elif topic == "series_written":
            if series.written is not None:
                return
            series.written = body.get("frames_written")
            series.master_file = body.get("master_file")
        self._publish(f"splitter_{topic}", body)

    # -- bookkeeping ---------------------------------------------------------------------------

    def check_series(self) -> None:
        for account in list(self.series.values()):
            if account.done or account.end is None:
                continue
            waited = time.monotonic() - (account.ended_at or 0)
            # Results of frames forwarded late can arrive after the end: give them the grace time.
            if account.complete() and (account.written is not None or waited > 2.0) or waited > self.settings.grace:
                self.finish_series(account)

    def finish_series(self, account: SeriesAccount) -> None:
        account.done = True
        summary = account.summary()
        print(summary_line(summary), flush=True)
        if summary["lost_frames"]:
            print(f"collector: series {account.series}: no result for frames {summary['lost_frames']} "
                  f"(their reader died or timed out): counted as failed", file=sys.stderr)
        if self.record is not None:
            self.record.write(json.dumps({"summary": summary}) + "\n")
            self.record.flush()
        self._publish("series", summary)
        self.series_done += 1
        # A daemon runs for weeks: keep the accounts of the latest series only.
        done = [n for n, a in self.series.items() if a.done]
        for number in sorted(done)[:-KEEP_SERIES]:
            del self.series[number]
        if self.settings.max_series is not None and self.series_done >= self.settings.max_series:
            self.stopping = True

    def health(self) -> dict:
        now = time.monotonic()
        for rank in self.ranks.values():
            if rank.get("rank", 0) <= 0 or "seen" not in rank:
                continue
            if not rank.get("lost") and now - rank["seen"] > RANK_SILENT_AFTER:
                rank["lost"] = True
                print(f"collector: reader rank {rank['rank']} (pid {rank.get('pid')}, host {rank.get('host')}) "
                      f"silent for {now - rank['seen']:.0f} s: lost; the other readers go on", file=sys.stderr)
        body = {
            "time": time.time(),
            "ranks": [{k: v for k, v in r.items() if k != "seen"} for r in sorted(self.ranks.values(),
                                                                                 key=lambda r: r["rank"])],
            "results": self.results_total,
            "ui_sent": self.ui_sent,
            "ui_dropped": self.ui_dropped,
            "splitter": self.splitter_counters,
        }
        self._publish("health", body)
        return body

    def print_rate(self) -> None:
        elapsed = time.monotonic() - self.started
        rates = ", ".join(
            f"rank {r['rank']} cpu {r.get('cpu')} numa {r.get('numa')} (buffers {r.get('buffer_numa', '?')}) "
            f"{r.get('rate', 0):.1f}/s"
            + (" LOST" if r.get("lost") else "")
            for r in sorted(self.ranks.values(), key=lambda r: r["rank"])
            if r["rank"] > 0
        )
        print(f"collector: {self.results_total} results in {elapsed:.1f} s "
              f"({self.results_total / max(elapsed, 1e-9):.1f} frames/s); {rates}", file=sys.stderr, flush=True)

    def run(self, stop=None) -> int:
        poller = zmq.Poller()
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.splitter, zmq.POLLIN)
        last_health = last_rate = time.monotonic()
        while not self.stopping and not (stop is not None and stop()):
            events = dict(poller.poll(100))
            if self.results in events:
                for _ in range(1000):
                    try:
                        kind, body = self.results.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    message = json.loads(body)
                    if kind == b"result":
                        self.take_result(message)
                    elif kind == b"status":
                        self.take_status(message)
            if self.splitter in events:
                for _ in range(1000):
                    try:
                        topic, body = self.splitter.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.take_splitter(topic.decode(), json.loads(body))
            self.check_series()
            now = time.monotonic()
            if now - last_health >= HEALTH_INTERVAL:
                self.health()
                last_health = now
            if self.settings.show_time and now - last_rate >= 5.0:
                self.print_rate()
                last_rate = now
        return self.shutdown()

    def shutdown(self) -> int:
        # Results still in flight for series not summed up yet: sum them up now.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and self.results.poll(100):
            kind, body = self.results.recv_multipart()
            if kind == b"result":
                self.take_result(json.loads(body))
            elif kind == b"status":
                self.take_status(json.loads(body))
        self.health()  # a reader that died near the end is reported too
        for account in self.series.values():
            if not account.done and (account.statuses or account.end):
                self.finish_series(account)
        if self.settings.show_time:
            self.print_rate()
        if self.ui is not None:
            print(f"collector: {self.ui_sent} result lines sent to {self.configuration.beamline.ui_endpoint}, "
                  f"{self.ui_dropped} dropped (no listener or a slow one)", file=sys.stderr, flush=True)
        # Readers stop when told; a few repeats so that late subscribers hear it too.
        for _ in range(5):
            self._publish("stop", {"time": time.time()})
            time.sleep(0.05)
        if self.record is not None:
            self.record.close()
        for sock in (self.results, self.splitter, self.publisher, self.ui):
            if sock is not None:
                sock.close(linger=500)
        return 0
