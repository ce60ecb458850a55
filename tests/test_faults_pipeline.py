"""Faults in the pipeline, the way they happen at a beamline: the real daemon, Splitter, mpirun,
Collector and readers on loopback, killed in the middle of a series, fed garbage, stopped mid-series.
Every frame must be accounted exactly once and every series summed up exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from test_pipeline import daemon_command
from test_pipeline import write_config as pipeline_config

from intxr.collector import SeriesAccount
from intxr.daemon import HDF5_MAGIC, Retention, pid_alive
from intxr.messages import RESULT_HTYPE, STATUS_HTYPE, Quantiles, RangeSet, SeriesEnd, splitter_event
from intxr.testing import free_ports

EXE = Path(sys.executable).parent
SERIES_LINE = re.compile(r"^SERIES (\d+)(?: r\d+)?: received (\d+), written (\S+), processed (\d+) \(hits \d+, "
                         r"median hres [^)]*\), blank (\d+), skipped (\d+), failed (\d+);")


def write_config(tmp_path: Path, **overrides) -> tuple[Path, dict]:
    """test_pipeline's config, faster to give up: nothing to BluIce, frames skipped after 2 s."""
    return pipeline_config(tmp_path, **{"send_to_ui": "False", "simulate_rate": "6", "skip_after": "2", **overrides})


class Daemon:
    """`intxrd` as a subprocess; its stdout and stderr lines as they come, with when they came."""

    def __init__(self, config: Path, *args: str):
        self.proc = subprocess.Popen(
            daemon_command(config, *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self.threads = [self._follow(self.proc.stdout, self.out), self._follow(self.proc.stderr, self.err)]

    @staticmethod
    def _follow(pipe, sink):
        def run():
            for line in pipe:
                sink.append((time.monotonic(), line.rstrip("\n")))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def text(self) -> str:
        return "\n".join(line for _, line in self.err) + "\n--- stdout ---\n" + "\n".join(
            line for _, line in self.out if not line.startswith("RESULTS:"))

    def wait_for(self, pattern: str, stream: str = "err", timeout: float = 60.0, after: float = 0.0,
                 count: int = 1) -> list[tuple[float, re.Match]]:
        """The first `count` lines matching `pattern` that came after `after` (monotonic)."""
        lines = self.err if stream == "err" else self.out
        deadline = time.monotonic() + timeout
        ended = None
        while True:
            found = [(t, m) for t, line in list(lines) if t >= after and (m := re.search(pattern, line))]
            if len(found) >= count:
                return found[:count]
            if self.proc.poll() is not None:
                ended = ended or time.monotonic()  # its last lines may still be on their way
            if time.monotonic() > deadline or ended and time.monotonic() - ended > 2:
                raise AssertionError(f"no {count} x {pattern!r} in {timeout} s:\n{self.text()}")
            time.sleep(0.05)

    def rank_pid(self, rank: int) -> int:
        (_, m), = self.wait_for(rf"rank +{rank} (?:reader|collector) .* pid (\d+)")
        return int(m.group(1))

    def results(self, after: float = 0.0) -> int:
        return sum(1 for t, line in list(self.out) if t >= after and line.startswith("RESULTS:"))

    def wait_results(self, n: int, after: float = 0.0, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.results(after) < n:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.text()
            time.sleep(0.05)

    def finish(self, timeout: float = 90.0) -> int:
        code = self.proc.wait(timeout)
        for t in self.threads:
            t.join(10)
        if os.environ.get("INTXR_TEST_LOG"):
            Path(os.environ["INTXR_TEST_LOG"]).write_text(self.text())
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.environ.get("INTXR_TEST_LOG"):
            for t in self.threads:
                t.join(5)
            Path(os.environ["INTXR_TEST_LOG"]).write_text(self.text())


RUNNING: list[Daemon] = []


@pytest.fixture
def start(tmp_path):
    """Start daemons; a failed test leaves none (and no MPI job) behind."""

    def run(config: Path, *args: str) -> Daemon:
        daemon = Daemon(config, *args)
        RUNNING.append(daemon)
        return daemon

    yield run
    while RUNNING:
        RUNNING.pop().stop()


def summaries(daemon: Daemon) -> dict[int, list[tuple]]:
    by_series: dict[int, list[tuple]] = {}
    for _, line in daemon.out:
        m = SERIES_LINE.match(line)
        if m:
            series, received, written, processed, blank, skipped, failed = m.groups()
            by_series.setdefault(int(series), []).append(
                (int(received), written, int(processed), int(blank), int(skipped), int(failed)))
    return by_series


def splitter_series(daemon: Daemon) -> int:
    """Series the Splitter wrote: one master file each, as its last line names them."""
    (_, m), = daemon.wait_for(r"splitter: \d+ frames received, .* files: (.*?)(?: \(and (\d+) more\))?$", timeout=5)
    return len(m.group(1).split(", ")) + int(m.group(2) or 0)


def records(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "frame" in r], [r["summary"] for r in rows if "summary" in r]


def frames_of(ranges: list[list[int]]) -> list[int]:
    return [f for first, last in ranges for f in range(first, last + 1)]


def assert_accounted_once(results: list[dict], summary: dict, n_frames: int) -> None:
    """Every frame number of the series is in exactly one of: a result, skipped, lost (failed)."""
    numbers = [r["frame"] for r in results] + frames_of(summary["skipped_ranges"]) + frames_of(summary["lost_ranges"])
    assert sorted(numbers) == list(range(1, n_frames + 1)), (summary, sorted(numbers))
    assert summary["processed"] + summary["blank"] + summary["skipped"] + summary["failed"] == n_frames, summary


# ---------------------------------------------------------------------------------------------
# Readers


def test_killed_readers_are_replaced_and_no_readers_left_is_loud(tmp_path, thaumatin_cbfs, start):
    config, _ = write_config(tmp_path, simulate_rate="5")
    record = tmp_path / "results.jsonl"
    n_frames = 72  # about 15 s at 5 Hz
    daemon = start(config, "-n", "3", "--max_series", "1", "--verbose", "--record", str(record),
                   "--simulate", *(thaumatin_cbfs * 6))
    first, second = daemon.rank_pid(1), daemon.rank_pid(2)
    daemon.wait_results(3)
    killed = time.monotonic()
    os.kill(first, signal.SIGKILL)
    (t_died, _), = daemon.wait_for(rf"reader rank 1 \(pid {first}.*\) died \(its process is gone\)", timeout=10)
    (t_new, m), = daemon.wait_for(r"reader rank 1 replaced: pid (\d+) on CPU\(s\) ", timeout=10)
    assert t_died - killed < 2.0 and t_new - killed < 2.5, (t_died - killed, t_new - killed)
    replacement = int(m.group(1))
    # The replacement takes frames (its status makes it a reader again), then every reader dies.
    daemon.wait_for(rf"rank +1 reader .* pid {replacement} .*\(replacement, no MPI\)", timeout=20)
    daemon.wait_results(2, after=t_new + 2.0)
    all_dead = time.monotonic()
    os.kill(second, signal.SIGKILL)
    os.kill(replacement, signal.SIGKILL)
    (t_none, _), = daemon.wait_for(r"collector: NO READERS LEFT", timeout=10, after=all_dead)
    (t_back, _), = daemon.wait_for(r"collector: readers back: \d reader\(s\) processing again after", timeout=30,
                                   after=all_dead)
    assert t_none - all_dead < 2.0 and t_back - all_dead < 20
    assert daemon.finish(120) == 0, daemon.text()
    results, [summary] = records(record)
    assert summary["received"] == summary["written"] == n_frames
    assert_accounted_once(results, summary, n_frames)
    # Processing went on after each kill, by the replacements too.
    done_after = [r for r in results if r["done"] > time.time() - (time.monotonic() - t_back)]
    assert done_after, "no result after the readers came back"
    assert len(summaries(daemon)) == 1
    # No traceback anywhere.
    assert "Traceback" not in daemon.text()


# ---------------------------------------------------------------------------------------------
# The Collector, and stopping mid-series


def test_a_killed_collector_is_noticed_the_job_restarts_and_every_series_is_summed_up_once(
        tmp_path, thaumatin_cbfs, start):
    # 16.5 MB a series, and a retention limit of two series.
    config, keys = write_config(tmp_path, simulate_rate="4", output_retention_gb="0.035")
    daemon = start(config, "-n", "3", "--verbose", "--simulate", *thaumatin_cbfs[:6])  # 1.5 s series, forever
    collector = daemon.rank_pid(0)
    daemon.wait_for(r"^SERIES 2: ", stream="out", timeout=60)
    time.sleep(0.6)  # in the middle of series 3
    killed = time.monotonic()
    os.kill(collector, signal.SIGKILL)
    (t_noticed, _), = daemon.wait_for(rf"JOB FAILED: the Collector \(rank 0, pid {collector}\) died", timeout=10)
    (t_restart, _), = daemon.wait_for(r"restarting the MPI job \(restart 1 of at most 5", timeout=30)
    daemon.wait_results(1, after=t_restart)
    back = time.monotonic() - killed
    (_, m), = daemon.wait_for(r"^RESULTS: series (\d+) frame", stream="out", after=t_restart)
    resumed_in = int(m.group(1))  # the first series the new job processes: it may have begun before
    daemon.wait_for(rf"^SERIES {resumed_in + 3}: ", stream="out", timeout=60)
    time.sleep(0.5)  # SIGTERM in the middle of the next series
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish(120) == 0, daemon.text()
    assert t_noticed - killed < 3.0, t_noticed - killed
    print(f"collector killed: noticed after {t_noticed - killed:.2f} s, results again after {back:.1f} s")
    # Every frame the simulated detector sent before the stop was received (and so written).
    (_, sent), = daemon.wait_for(r"simulate: sent (\d+) frames", timeout=5)
    (_, received), = daemon.wait_for(r"splitter: (\d+) frames received, (\d+) written", timeout=5)
    assert sent.group(1) == received.group(1) == received.group(2), daemon.text()
    by_series = summaries(daemon)
    n_series = splitter_series(daemon)
    # Exactly one SERIES line per series the Splitter saw, the one cut by SIGTERM included.
    assert sorted(by_series) == list(range(1, n_series + 1)), (n_series, sorted(by_series), daemon.text())
    assert all(len(lines) == 1 for lines in by_series.values()), by_series
    for series, [(received, written, processed, blank, skipped, failed)] in by_series.items():
        assert processed + blank + skipped + failed == received, (series, by_series[series])
        assert written == str(received)
    # Series that ran wholly under the new job are wholly processed.
    for series in range(resumed_in + 1, resumed_in + 3):
        received, _, processed, blank, skipped, failed = by_series[series][0]
        assert (processed + blank, skipped, failed) == (received, 0, 0), by_series[series]
    # Retention kept the directory small, deleting whole old series and never the last one.
    daemon.wait_for(r"intxrd: keeping at most 0.035 GB of series files in .*\(output_retention_gb\)", timeout=1)
    daemon.wait_for(r"intxrd: retention: deleted \d+ oldest complete series \(\d+ MB: intxr_sim_000001", timeout=1)
    left = sorted(p.name for p in Path(keys["output_dir"]).iterdir())
    assert f"intxr_sim_{n_series:06d}_master.h5" in left and "intxr_sim_000001_master.h5" not in left, left
    masters = {name.removesuffix("_master.h5") for name in left if name.endswith("_master.h5")}
    assert {name.rsplit("_data_", 1)[0] for name in left if "_data_" in name} == masters  # whole series only
    assert "Traceback" not in daemon.text()


def counted_as_recorded(results: list[dict], summary: dict, n_frames: int) -> None:
    """What results two Collectors recorded for one series (the killed one and the new one) and its
    SERIES summary agree: each frame once, and counted with the status its recorded result had."""
    frames = [r["frame"] for r in results]
    assert len(frames) == len(set(frames)), "a frame was emitted twice"
    lost = set(frames_of(summary["lost_ranges"]))
    assert not lost & set(frames), f"recorded and counted failed (lost): {sorted(lost & set(frames))}"
    assert_accounted_once(results, summary, n_frames)
    recorded = {status: sum(1 for r in results if r["status"] == status) for status in ("processed", "blank")}
    failed = sum(1 for r in results if r["status"] == "failed")
    assert (summary["processed"], summary["blank"], summary["failed"]) == (
        recorded["processed"], recorded["blank"], failed + len(lost)), (summary, recorded, failed)


def test_a_collector_killed_mid_series_hands_its_account_on_every_frame_counted_as_recorded(
        tmp_path, thaumatin_cbfs, start):
    config, _ = write_config(tmp_path, simulate_rate="5")
    record = tmp_path / "results.jsonl"
    n_frames = 72  # about 15 s at 5 Hz: one series, results flowing when the Collector dies
    daemon = start(config, "-n", "3", "--max_series", "1", "--verbose", "--record", str(record),
                   "--simulate", *(thaumatin_cbfs * 6))
    collector = daemon.rank_pid(0)
    daemon.wait_results(10)
    time.sleep(0.1)  # between two results (one every 0.2 s)
    os.kill(collector, signal.SIGKILL)
    daemon.wait_for(rf"JOB FAILED: the Collector \(rank 0, pid {collector}\) died", timeout=10)
    assert daemon.finish(120) == 0, daemon.text()
    results, [summary] = records(record)
    assert summary["received"] == summary["written"] == n_frames
    assert {r["series_name"] for r in results} == {summary["series_name"]}
    assert len(results) >= 10 and summary["processed"] + summary["blank"] >= 10
    counted_as_recorded(results, summary, n_frames)
    assert len(summaries(daemon)) == 1
    assert "Traceback" not in daemon.text()


def test_the_daemon_gives_up_after_too_many_restarts_and_exits_non_zero(tmp_path, thaumatin_cbfs, start):
    config, _ = write_config(tmp_path, simulate_rate="4", max_restarts="0")
    record = tmp_path / "results.jsonl"
    daemon = start(config, "-n", "2", "--verbose", "--record", str(record), "--simulate", *thaumatin_cbfs[:6])
    collector = daemon.rank_pid(0)
    # In the middle of series 2, which no Collector is left to sum up, with results taken for it.
    daemon.wait_for(r"^RESULTS: series 2 frame", stream="out", timeout=60)
    time.sleep(0.1)
    os.kill(collector, signal.SIGKILL)
    daemon.wait_for(r"JOB FAILED: the Collector", timeout=10)
    daemon.wait_for(r"the MPI job failed 1 times in 10 min \(max_restarts = 0\): giving up", timeout=30)
    assert daemon.finish(90) == 1, daemon.text()
    by_series = summaries(daemon)
    n_series = splitter_series(daemon)
    assert sorted(by_series) == list(range(1, n_series + 1)) and all(len(v) == 1 for v in by_series.values())
    # What no Collector summed up, the daemon did, from the Splitter's accounts and the journal of
    # the results the killed Collector had taken (counted as they were recorded, not failed).
    assert any(line.startswith("SERIES 2: ") and "summed up by the daemon" in line for _, line in daemon.out), \
        daemon.text()
    results = [r for r in records(record)[0] if r["series"] == 2]
    [(received, _, processed, blank, skipped, failed)] = by_series[2]
    assert results and processed + blank + skipped + failed == received  # cut short by the give-up
    assert (processed, blank) == (sum(r["status"] == "processed" for r in results),
                                  sum(r["status"] == "blank" for r in results)), (by_series[2], results)
    assert failed == received - skipped - len(results) + sum(r["status"] == "failed" for r in results)
    assert "Traceback" not in daemon.text()


# ---------------------------------------------------------------------------------------------
# Untrusted sockets, binding, the GUI's port


GARBAGE = [
    [b"result", b"not json"],
    [b"result", b"[1, 2, 3]"],
    [b"result", b'{"series": "one", "frame": 1, "status": "processed"}'],
    [b"result", b'{"series": 1, "frame": -4, "status": "processed"}'],
    [b"result", b'{"series": 1, "frame": 3, "status": "exploded"}'],
    [b"result", b'{"series": 1, "frame": 2, "status": "processed", "n_spots": "many"}'],
    [b"result", b'{"series": 1, "frame": 2, "status": "processed", "hres": NaN}'],
    [b"result", b'{"series": 1, "frame": 2, "status": "processed", "header": [1]}'],
    [b"result"],
    [b"result", b"{}", b"{}"],
    [b"status", b'{"rank": "x"}'],
    [b"status", b'{"rank": 0}'],
    [b"status", b'{"rank": 3, "cpus": "all"}'],
    [b"status", b'{"rank": 7, "pid": 1}'],  # well-formed, but no rank of this job
    [b"hello", b"{}"],
    [b"\xff\xfe", b"\x00" * 100],
    [os.urandom(64), os.urandom(300)],
]


def test_garbage_on_the_collectors_socket_is_counted_localhost_binds_loopback_and_a_taken_gui_port_is_named(
        tmp_path, thaumatin_cbfs, start):
    gui_port, = free_ports(1)
    config, keys = write_config(tmp_path, host="localhost", simulate_rate="3", start_gui="True",
                                gui_port=str(gui_port))
    dry = subprocess.run(daemon_command(config, "--dry_run", "-n", "2"),
                         capture_output=True, text=True, timeout=60)
    assert f"readers ask on tcp://127.0.0.1:{keys['port']}" in dry.stdout, dry.stdout
    assert "OMPI_MCA_btl=self,sm" in dry.stdout
    taken = socket.socket()
    taken.bind(("127.0.0.1", gui_port))
    taken.listen()
    record = tmp_path / "results.jsonl"
    try:
        daemon = start(config, "-n", "2", "--max_series", "1", "--record", str(record), "--simulate",
                       *thaumatin_cbfs)
        daemon.wait_for(rf"GUI: port {gui_port} in use on 127.0.0.1: set gui_port in \[t\] of {config}", timeout=30)
        collector = daemon.rank_pid(0)
        reader = daemon.rank_pid(1)
        health = zmq.Context.instance().socket(zmq.SUB)
        health.setsockopt(zmq.SUBSCRIBE, b"health")
        health.connect(f"tcp://127.0.0.1:{keys['results_pub_port']}")
        junk = zmq.Context.instance().socket(zmq.PUSH)
        junk.setsockopt(zmq.LINGER, 1000)
        junk.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
        for _ in range(5):
            for message in GARBAGE:
                junk.send_multipart(message)
        # Well-formed, but of a series the Splitter never had: no SERIES line may come of it.
        junk.send_multipart([b"result", json.dumps({"htype": RESULT_HTYPE, "series": 999, "frame": 1, "hit": True,
                                                     "status": "processed", "n_spots": 50}).encode()])
        junk.close()
        # Raw bytes that are no ZeroMQ at all.
        with socket.create_connection(("127.0.0.1", keys["collector_port"])) as raw:
            raw.sendall(os.urandom(2000))
        # Where things listen: our ports on 127.0.0.1 only, and no rank listens on any other address.
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
        for port_key in ("port", "splitter_pub_port", "collector_port", "results_pub_port"):
            found = [line for line in listening if re.search(rf"\s\S+:{keys[port_key]}\s", line)]
            assert found and all(f" 127.0.0.1:{keys[port_key]} " in line for line in found), (port_key, found)
        for pid in (collector, reader):
            mine = [line for line in listening if f"pid={pid}," in line]
            assert all(" 127.0.0.1:" in line for line in mine), mine
        daemon.wait_for(r"collector: malformed message on the results socket tcp://localhost:\d+: .*; counted and "
                        r"ignored", timeout=30)
        deadline = time.monotonic() + 15
        counted = 0
        while time.monotonic() < deadline and counted < 5 * len(GARBAGE):
            if health.poll(500):
                counted = json.loads(health.recv_multipart()[1])["malformed_results"]
        health.close(linger=0)
        # Every message counted (random bytes that pass for old ZMTP 1.0 framing add a few more).
        assert counted >= 5 * len(GARBAGE), counted
        assert daemon.finish(120) == 0, daemon.text()
    finally:
        taken.close()
    results, [summary] = records(record)
    assert list(summaries(daemon)) == [1]
    assert any("collector: unknown series on the results socket: series 999: 1 result(s) and no word of the series "
               "from the Splitter" in line for _, line in daemon.err), daemon.text()
    results = [r for r in results if r["series"] == 1]
    assert (summary["received"], summary["processed"] + summary["blank"], summary["failed"]) == (12, 12, 0), summary
    assert_accounted_once(results, summary, 12)
    assert "Traceback" not in daemon.text()
    # Reported in a line, then counted: not one line per message.
    assert sum("malformed message" in line for _, line in daemon.err) <= 3, daemon.text()


# ---------------------------------------------------------------------------------------------
# Compact accounts and retention, without processes


def test_accounts_stay_compact_for_a_million_frame_series():
    account = SeriesAccount(1, "series_000001")
    for frame in range(1, 1_000_001):  # in order, as readers mostly deliver
        account.add(frame, "processed", hit=False, latency=0.05 + (frame % 100) / 1000)
    assert len(account.results.starts) == 1
    account.take_end(SeriesEnd.from_wire({"series": 1, "series_name": "series_000001", "received": 1_000_010,
                                          "forwarded_ranges": [[1, 1_000_000]],
                                          "skipped_ranges": [[1_000_001, 1_000_010]]}))
    summary = account.summary()
    assert (summary.skipped, summary.lost, summary.failed) == (10, 0, 0)
    assert len(json.dumps(summary.to_wire())) < 2000
    assert abs(summary.latency_p50 - 0.1) < 0.002
    assert len(account.latencies.bins) < 200


def test_range_sets_merge_out_of_order_and_subtract():
    s = RangeSet()
    for f in [5, 3, 4, 10, 1, 2, 12, 11]:
        assert s.add(f)
    assert not s.add(4)
    assert s.ranges() == [[1, 5], [10, 12]] and len(s) == 8
    assert RangeSet([[1, 20]]).minus(s).ranges() == [[6, 9], [13, 20]]
    assert RangeSet([[1, 3], [8, 9]]).minus(RangeSet([[2, 8]])).ranges() == [[1, 1], [9, 9]]
    q = Quantiles(0.01)
    for v in [1.5, 2.0, 2.5]:
        q.add(v)
    assert q.median() == pytest.approx(2.0)


def test_an_old_style_series_end_and_a_repeat_name_are_read():
    account = SeriesAccount(1, "series_000001_r2")
    account.take_end(SeriesEnd.from_wire({"series": 1, "received": 4, "forwarded_frames": [1, 2, 4],
                                          "skipped_frames": [3]}))
    account.add(1, "processed", hit=False)
    summary = account.summary()
    assert summary.lost_ranges == [[2, 2], [4, 4]] and summary.skipped_ranges == [[3, 3]]
    assert summary.line().startswith("SERIES 1 r2: received 4, written ?, processed 1")


def _series_files(directory: Path, name: str, n_data: int, size: int, mtime: float) -> None:
    for path in [directory / f"{name}_master.h5"] + [directory / f"{name}_data_{k:06d}.h5" for k in
                                                     range(1, n_data + 1)]:
        path.write_bytes(HDF5_MAGIC + b"\0" * (size - len(HDF5_MAGIC)))
        os.utime(path, (mtime, mtime))


def test_retention_deletes_the_oldest_complete_series_only(tmp_path):
    now = time.time()
    _series_files(tmp_path, "old_run", 2, 300_000, now - 1000)  # from an earlier run
    (tmp_path / "notes_master.h5").write_text("not HDF5")  # named like ours, but not ours
    (tmp_path / "keep.txt").write_bytes(b"x" * 2_000_000)
    retention = Retention(str(tmp_path), 0.001)  # 1 MB
    _series_files(tmp_path, "series_000001", 2, 300_000, now - 100)
    _series_files(tmp_path, "series_000002", 2, 300_000, now - 50)
    _series_files(tmp_path, "series_000003", 2, 300_000, now)  # open: not closed by the Splitter
    lines = retention.run([str(tmp_path / "series_000001_master.h5"), str(tmp_path / "series_000002_master.h5")])
    left = sorted(p.name for p in tmp_path.iterdir())
    # 3.6 MB of series files over a 1 MB limit: the old run, series 1 and series 2 go, oldest first,
    # each whole; the open series 3 is never touched, nor files that are not the Splitter's.
    assert left == ["keep.txt", "notes_master.h5", "series_000003_data_000001.h5", "series_000003_data_000002.h5",
                    "series_000003_master.h5"], left
    assert lines == [f"retention: deleted 3 oldest complete series (3 MB: old_run, series_000001, series_000002) "
                     f"from {tmp_path} to stay under 0.001 GB"], lines
    assert retention.run([]) == []  # under the limit now


def test_retention_remembers_series_closed_before_the_splitter_forgot_them(tmp_path):
    """The Splitter's `files` keeps only its latest series: one closed earlier is still complete."""
    now = time.time()
    retention = Retention(str(tmp_path), 0.001)  # 1 MB
    _series_files(tmp_path, "series_000001", 1, 200_000, now - 100)
    assert retention.run([str(tmp_path / "series_000001_master.h5")]) == []  # under the limit
    _series_files(tmp_path, "series_000002", 1, 200_000, now - 50)
    _series_files(tmp_path, "series_000003", 1, 200_000, now)  # open
    lines = retention.run([str(tmp_path / "series_000002_master.h5")])  # series 1 is no longer listed
    assert lines and "deleted 1 oldest complete series" in lines[0] and "series_000001" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "series_000002_data_000001.h5"
    assert retention.closed == {"series_000002"}


# ---------------------------------------------------------------------------------------------
# The Collector's Splitter socket and a reader's frame socket, each fed junk by a real peer


def test_junk_from_the_splitter_socket_is_counted_and_a_good_series_is_still_summed_up(tmp_path, capfd):
    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings

    config, keys = write_config(tmp_path)
    splitter = zmq.Context.instance().socket(zmq.PUB)
    splitter.bind(f"tcp://127.0.0.1:{keys['splitter_pub_port']}")
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(grace=1.0))
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not collector.splitter_heard and time.monotonic() < deadline:
            splitter.send_multipart([b"counters", b'{"frames_received": 0}'])  # until it has subscribed
            time.sleep(0.1)
        junk = [
            [b"series_end", b"not json"],
            [b"series_end", b'{"series": "1"}'],
            [b"series_end", b'{"series": 1, "forwarded_ranges": [[5, 2]]}'],
            [b"series_end", b'{"series": 1, "forwarded_ranges": "all"}'],
            [b"series_end", b'{"series": 1, "skipped_frames": [1, "2"]}'],
            [b"series_written", b'{"series": 1, "frames_written": -1}'],
            [b"no_such_topic", b"{}"],
            [b"\xff", b"{}"],
            [b"series_end"],
            [b"series_end", b"{}", b"{}"],
        ]
        for message in junk:
            splitter.send_multipart(message)
        end = {"series": 7, "series_name": "series_000007", "timed_out": False, "received": 3, "forwarded": 0,
               "skipped": 3, "forwarded_ranges": [], "skipped_ranges": [[1, 3]]}
        splitter.send_multipart([b"series_end", json.dumps(end).encode()])
        splitter.send_multipart([b"series_written", json.dumps(
            {"series": 7, "series_name": "series_000007", "frames_written": 3, "master_file": "x_master.h5"}).encode()])
        deadline = time.monotonic() + 10
        while collector.series_done < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(20)
        splitter.close(linger=0)
    assert not thread.is_alive()
    assert collector.bad_splitter.count == len(junk)
    out, err = capfd.readouterr()
    assert "SERIES 7: received 3, written 3, processed 0 (hits 0, median hres n/a), blank 0, skipped 3, failed 0" in out
    assert "collector: malformed message on the Splitter's socket" in err and "Traceback" not in err


def test_a_collectors_journal_survives_it_torn_last_line_and_compaction_included(tmp_path, monkeypatch):
    from intxr import collector as collector_module
    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings, journal_paths

    monkeypatch.setattr(collector_module, "JOURNAL_COMPACT_AFTER", 10)  # rewritten as a snapshot twice
    config, keys = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    configuration = cfg.load(str(config), "t")
    settings = CollectorSettings(grace=1.0, state_dir=str(state), record=str(tmp_path / "record.jsonl"))
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")

    def result(frame: int) -> list[bytes]:
        status = "blank" if frame % 10 == 0 else "failed" if frame == 7 else "processed"
        n_spots = 50 if frame % 3 else 0
        body = {"htype": RESULT_HTYPE, "series": 5, "series_name": "s_000005", "frame": frame, "status": status,
                "hit": status == "processed" and n_spots >= 10, "rank": 1, "n_spots": n_spots,
                "hres": 1.5 + frame / 100, "received": time.time() - 0.05}
        return [b"result", json.dumps(body).encode()]

    def take(collector: Collector, n: int) -> None:
        deadline = time.monotonic() + 10
        while collector.results_total + collector.bad_results.count < n and time.monotonic() < deadline:
            collector.receive_results()
            time.sleep(0.01)

    def killed(collector: Collector) -> None:  # no shutdown: nothing summed up, files left as they are
        for sock in (collector.results, collector.splitter, collector.publisher):
            sock.close(linger=0)
        collector.record.close()

    first = Collector(configuration, settings)
    for frame in range(1, 31):
        push.send_multipart(result(frame))
        if frame == 20:
            take(first, 20)
            first.take_series_event(splitter_event("series_written", {"series": 5, "series_name": "s_000005"}))
    take(first, 30)
    before = first.series["s_000005"]
    [journal] = journal_paths(state)
    lines = Path(journal).read_text().splitlines()
    assert lines[1].startswith("S ") and len(lines) < 2 + 2 * 10, lines  # a snapshot and a few lines
    with open(journal, "a") as f:
        f.write("31 h 1.9")  # killed mid-write
    killed(first)

    # Other ports (the first's are released by ZeroMQ's I/O thread in its own time); the same journal.
    (tmp_path / "2").mkdir()
    config, keys = write_config(tmp_path / "2")
    push.close(linger=0)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
    second = Collector(cfg.load(str(config), "t"), settings)
    try:
        after = second.series["s_000005"]
        assert after.results.ranges() == [[1, 30]] and after.counts == before.counts == {
            "processed": 26, "blank": 3, "failed": 1}
        assert (after.hits, after.hres.bins, after.latencies.n) == (before.hits, before.hres.bins, 30)
        assert after.confirmed  # the Splitter had named it: not dropped as a made-up series
        assert not Path(journal).read_text().endswith("1.9")  # the torn line is cut off
        push.send_multipart(result(3))  # a second result of a frame taken before: not counted, not emitted
        push.send_multipart(result(31))
        take(second, 2)
        assert (second.results_total, second.bad_results.count) == (1, 1)
        second.take_series_event(splitter_event("series_end", {
            "series": 5, "series_name": "s_000005", "timed_out": False, "received": 32,
            "forwarded_ranges": [[1, 32]], "skipped_ranges": []}))
        second.finish_series(after)
        summary = after.summary()
        assert (summary.processed, summary.blank, summary.failed, summary.lost_ranges) == (27, 3, 2, [[32, 32]])
        assert journal_paths(state) == []  # summed up: its journal is gone
        frames = [json.loads(line).get("frame") for line in (tmp_path / "record.jsonl").read_text().splitlines()]
        assert sorted(f for f in frames if f) == list(range(1, 32))  # each emitted once
    finally:
        killed(second)
        push.close(linger=0)


def test_a_reader_checks_the_frame_meta_it_is_served(tmp_path):
    from intxr.reader.source import FrameSource

    port, = free_ports(1)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    good = {"htype": "intxr-frame-1.0", "series": 1, "series_name": "s_r2", "frame": 4, "shape": [4, 4],
            "type": "uint16", "encoding": "bs16-lz4"}
    replies = [
        [b"not json"],
        [json.dumps({**good, "series": "x"}).encode(), b"{}", b""],  # no frame to answer for: dropped
        [json.dumps({**good, "shape": [1 << 20, 1 << 20]}).encode(), b"{}", b""],
        [json.dumps({**good, "type": "object"}).encode(), b"{}", b""],
        [json.dumps({**good, "header": [1]}).encode(), b"{}", b""],
        [json.dumps(good).encode(), b"[]", b""],
        [json.dumps(good).encode(), b'{"header": {}}', b""],
    ]
    source = FrameSource(f"tcp://127.0.0.1:{port}", timeout=5)
    got = []
    try:
        for reply in replies:
            # Ask, answer: the REQ asks once per call and reads its answer within the call.
            result: list = []
            asking = threading.Thread(target=lambda out=result: out.append(source.next_frame(wait=5)))
            asking.start()
            assert router.poll(5000)
            identity, empty, _ = router.recv_multipart()
            router.send_multipart([identity, empty, *reply])
            asking.join(10)
            got.append(result[0])
    finally:
        source.close()
        router.close(linger=0)
    assert got[0] is None and got[1] is None
    assert [frame.error is not None for frame in got[2:]] == [True, True, True, True, False]
    assert "larger than any detector" in got[2].error and "'type'" in got[3].error and "'header'" in got[4].error
    assert "series JSON" in got[5].error
    assert got[6].series_name == "s_r2" and got[6].frame == 4
    assert source.counters.bad_replies == 6


def test_a_job_left_behind_by_a_killed_daemon_ends_itself(tmp_path, thaumatin_cbfs, start):
    config, _ = write_config(tmp_path, simulate_rate="4")
    daemon = start(config, "-n", "3", "--simulate", *thaumatin_cbfs[:6])
    pids = [daemon.rank_pid(rank) for rank in (0, 1, 2)]
    daemon.wait_for(r"^SERIES 1: ", stream="out", timeout=60)
    daemon.proc.kill()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "ranks outlived their daemon"


def test_a_hung_collector_is_noticed_by_its_silence_and_the_job_restarts(tmp_path, thaumatin_cbfs, start):
    config, _ = write_config(tmp_path, simulate_rate="4")
    daemon = start(config, "-n", "2", "--verbose", "--simulate", *thaumatin_cbfs[:6])
    collector = daemon.rank_pid(0)
    daemon.wait_for(r"^SERIES 1: ", stream="out", timeout=60)
    hung = time.monotonic()
    os.kill(collector, signal.SIGSTOP)  # alive, but says nothing
    (t_noticed, _), = daemon.wait_for(rf"JOB FAILED: the Collector \(rank 0, pid {collector}\) has been silent for "
                                      r"\d+ s", timeout=15)
    assert 3.5 < t_noticed - hung < 8, t_noticed - hung  # 5 s after its last health
    (t_restart, _), = daemon.wait_for(r"restarting the MPI job \(restart 1 of at most 5", timeout=30)
    assert not pid_alive(collector)  # the stopped one was killed, not left behind
    daemon.wait_results(1, after=t_restart)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish(120) == 0, daemon.text()
    by_series = summaries(daemon)
    assert sorted(by_series) == list(range(1, splitter_series(daemon) + 1))
    assert all(len(lines) == 1 for lines in by_series.values()), by_series


def test_a_killed_mpirun_is_noticed_its_orphaned_ranks_go_and_the_job_restarts(tmp_path, thaumatin_cbfs, start):
    config, _ = write_config(tmp_path, simulate_rate="4")
    daemon = start(config, "-n", "2", "--verbose", "--simulate", *thaumatin_cbfs[:6])
    ranks = [daemon.rank_pid(0), daemon.rank_pid(1)]
    (_, m), = daemon.wait_for(r"intxrd: started (\S+/mpirun) ")
    daemon.wait_for(r"^SERIES 1: ", stream="out", timeout=60)
    launcher = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and Path(f"/proc/{pid}/stat").exists()
                    and int(Path(f"/proc/{ranks[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]) == int(pid))
    killed = time.monotonic()
    os.kill(launcher, signal.SIGKILL)
    (t_noticed, _), = daemon.wait_for(r"JOB FAILED: (the MPI job ended \(mpirun exit status -9\)|the Collector)",
                                      timeout=10)
    (t_restart, _), = daemon.wait_for(r"restarting the MPI job \(restart 1 of at most 5", timeout=30)
    assert t_noticed - killed < 3.0
    assert not any(pid_alive(pid) for pid in ranks)  # the orphans went with it
    daemon.wait_results(1, after=t_restart)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish(120) == 0, daemon.text()
    by_series = summaries(daemon)
    assert sorted(by_series) == list(range(1, splitter_series(daemon) + 1))
    assert all(len(lines) == 1 for lines in by_series.values()), by_series
    assert "Traceback" not in daemon.text()


def test_a_forged_status_is_counted_and_changes_nothing_the_collector_owns(tmp_path):
    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings

    config, keys = write_config(tmp_path)
    host = os.uname().nodename
    me = {"rank": 1, "pid": os.getpid(), "host": host, "cpu": 0, "cpus": [0]}
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(reader_command=["false"]), ranks=[me])
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
    try:
        forged = [{"rank": 1, "pid": 2 ** 22 + 12345, "frames": 1},  # another process: "the reader died"
                  {"rank": 1, "pid": os.getpid(), "time": "x"},  # a bad field
                  {"rank": 1, "pid": os.getpid(), "replaced_at": 5, "restarts": "x", "dead": True, "frames": 3,
                   "host": "elsewhere"}]
        for body in forged:
            push.send_multipart([b"status", json.dumps({"htype": STATUS_HTYPE, **body}).encode()])
        deadline = time.monotonic() + 10
        while collector.ranks[1].get("frames") != 3 and time.monotonic() < deadline:
            collector.receive_results()
            time.sleep(0.01)
        rank = collector.ranks[1]
        assert collector.bad_results.count == 2
        assert rank["pid"] == os.getpid() and rank["frames"] == 3 and "replaced_at" not in rank
        assert rank["host"] == host
        assert "restarts" not in rank and not rank["dead"]
        collector.check_readers()  # its reader (this process) runs: nothing to replace
        assert collector.children == {} and collector.reader_restarts == 0
    finally:
        push.close(linger=0)
        for sock in (collector.results, collector.splitter, collector.publisher):
            sock.close(linger=0)


def test_a_resume_file_that_cannot_be_written_is_said_once_and_the_previous_one_kept(tmp_path, capfd):
    from types import SimpleNamespace

    from intxr.daemon import Daemon

    state = tmp_path / "state"
    state.mkdir()
    (state / "resume.json").write_text("previous")
    (state / "resume.tmp").mkdir()  # writing it fails as a full disk would: an OSError
    daemon = SimpleNamespace(resume_ended=None, resume_path=state / "resume.json", resume_failed_at=None,
                             done_names=["a"], done_set={"a"}, name_of=Daemon.name_of,
                             say=lambda text: print(f"intxrd: {text}", file=sys.stderr))
    splitter = SimpleNamespace(counters=lambda: {"series_ended": 1, "series_started": 2, "series": []})
    Daemon.write_resume(daemon, splitter)
    Daemon.write_resume(daemon, splitter)  # tried again, not said again
    assert (state / "resume.json").read_text() == "previous" and daemon.resume_ended is None
    assert capfd.readouterr().err.count("cannot write") == 1
    (state / "resume.tmp").rmdir()
    Daemon.write_resume(daemon, splitter)
    assert json.loads((state / "resume.json").read_text()) == {"done": ["a"], "accounts": []}


def test_results_of_made_up_series_open_no_more_than_max_unconfirmed_accounts(tmp_path, monkeypatch):
    from intxr import collector as collector_module
    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings, journal_paths

    monkeypatch.setattr(collector_module, "MAX_UNCONFIRMED", 3)
    config, keys = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(state_dir=str(state)))
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
    try:
        for series in range(100, 105):
            body = {"htype": RESULT_HTYPE, "series": series, "frame": 1, "status": "blank", "hit": False, "rank": 1}
            push.send_multipart([b"result", json.dumps(body).encode()])
        deadline = time.monotonic() + 10
        while collector.results_total + collector.bad_results.count < 5 and time.monotonic() < deadline:
            collector.receive_results()
            time.sleep(0.01)
        assert (collector.results_total, collector.bad_results.count) == (3, 2)
        assert sorted(collector.series) == ["100", "101", "102"] and len(journal_paths(state)) == 3
        collector.take_series_event(splitter_event("series_start", {"series": 200, "series_name": "s_200"}))
        assert "s_200" in collector.series
    finally:
        push.close(linger=0)
        for sock in (collector.results, collector.splitter, collector.publisher):
            sock.close(linger=0)
