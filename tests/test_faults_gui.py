"""Faults of the live view: a taken port, browsers that drop their connections, bad queries, garbage
on the results socket. The real `intxr gui` process (its stderr read back), real ZeroMQ on
127.0.0.1, and the Bokeh page in a real headless Chromium."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

from intxr.gui.model import MAX_SERIES, RunModel
from intxr.messages import RESULT_HTYPE, SUMMARY_HTYPE
from intxr.testing import free_ports

EXE = Path(sys.executable).parent


def result(series: int, frame: int, n_spots: int = 20, **extra) -> dict:
    """A result as the Collector publishes it (a hit: its reader's word, min_Bragg_peaks 10)."""
    return {
        "htype": RESULT_HTYPE,
        "series": series,
        "frame": frame,
        "n_spots": n_spots,
        "hres": 2.0,
        "score": 5,
        "status": "processed",
        "hit": n_spots >= 10,
        "rank": 1,
        "latency": 0.1,
        "done": 1000.0 + frame,
        **extra,
    }


def get(url: str) -> tuple[int, dict | bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def wait_until(predicate, seconds: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Gui:
    """`intxr gui` as the daemon runs it, fed by a PUB socket the test holds."""

    def __init__(self, *flags: str):
        results_port, self.port = free_ports(2)
        self.publisher = zmq.Context.instance().socket(zmq.PUB)
        self.publisher.setsockopt(zmq.LINGER, 0)
        # As the Collector's publisher: a burst of thousands must not meet PUB's default 1000-message
        # queue while the GUI's I/O thread waits for a CPU on a loaded machine (PUB drops, silently).
        self.publisher.setsockopt(zmq.SNDHWM, 10_000)
        self.publisher.bind(f"tcp://127.0.0.1:{results_port}")
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = subprocess.Popen(
            [
                str(EXE / "intxr"),
                "gui",
                "--results",
                f"tcp://127.0.0.1:{results_port}",
                "--port",
                str(self.port),
                *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        # Up, and subscribed (a PUB drops what it sends before the subscription arrives).
        wait_until(lambda: self.state(), what="the GUI to serve")
        wait_until(
            lambda: self.send("health", {"ranks": [], "results": 0}) or self.state()["health"],
            what="the GUI's subscription",
        )

    def send(self, topic: str, body) -> None:
        self.publisher.send_multipart([topic.encode(), json.dumps(body).encode()])

    def state(self) -> dict | None:
        try:
            status, body = get(self.url + "api/state")
            return body if status == 200 else None
        except OSError:
            return None

    def stop(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        self.publisher.close()
        return err


@pytest.fixture
def gui():
    g = Gui()
    yield g
    if g.process.poll() is None:
        g.stop()


def test_a_taken_port_is_named_in_one_line_and_exits_2():
    [port, results] = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [str(EXE / "intxr"), "gui", "--results", f"tcp://127.0.0.1:{results}", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"GUI: port {port} in use on 127.0.0.1: set gui_port (or --port)"]


def test_a_bad_results_endpoint_is_named_and_exits_2():
    [port] = free_ports(1)
    done = subprocess.run(
        [str(EXE / "intxr"), "gui", "--results", "tcp://127.0.0.1:notaport", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("GUI: results endpoint 'tcp://127.0.0.1:notaport'") and "--results" in line


def _rst(sock: socket.socket) -> None:
    """Close with a reset, as a browser tab killed mid-transfer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _request(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_browsers_that_drop_their_connections_leave_no_traceback(gui):
    for k in range(3000):
        gui.send("result", result(1, k, spots_xy=[[1.0, 2.0]]))
    wait_until(
        lambda: gui.state()["series"] and gui.state()["series"][0]["counts"]["results"] == 3000, what="3000 results"
    )
    sessions = []
    for _ in range(5):  # pages (each a Bokeh session) and live-update websockets whose browser goes away
        sock = _request(gui.port, "/")
        sock.recv(4096)
        sessions.append(sock)
        ws = socket.create_connection(("127.0.0.1", gui.port), timeout=10)
        ws.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Origin: http://127.0.0.1:%d\r\n\r\n" % (gui.port, gui.port)
        )
        sessions.append(ws)
    for _ in range(10):  # answers the browser never reads
        _rst(_request(gui.port, "/api/state"))
    half = socket.create_connection(("127.0.0.1", gui.port))
    half.sendall(b"GET /api/sta")  # a request cut off in the middle
    _rst(half)
    for sock in sessions:
        _rst(sock)
    for k in range(3000, 3050):  # updates go on
        gui.send("result", result(1, k))
        time.sleep(0.01)
    wait_until(lambda: gui.state()["series"][0]["counts"]["results"] == 3050, what="3050 results")
    err = gui.stop()
    for word in ("Traceback", "BrokenPipeError", "ConnectionResetError", "Exception"):
        assert word not in err, err


def test_every_query_parameter_is_checked_and_no_other_frame_is_served(tmp_path, shared_data):
    """A real series the Splitter wrote (3 frames of the EIGER2 capture): frames in it are served,
    anything else is refused with a message naming what and where, never another frame."""
    from test_splitter import Pusher, capture_messages

    from intxr.splitter import Splitter
    from intxr.stream import FrameMessage, SeriesEnd, SeriesStart, parse_message

    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")
    header, frames = messages[0], messages[1:4]
    [start] = [e for e in parse_message(header) if isinstance(e, SeriesStart)]
    end = next(
        m for m in messages if any(isinstance(e, SeriesEnd) and e.series == start.series for e in parse_message(m))
    )
    numbers = [next(e for e in parse_message(m) if isinstance(e, FrameMessage)).frame for m in frames]
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, max_series=1) as splitter:
        pusher.send([header, *frames, end])
        wait_until(lambda: not splitter.running or splitter.counters()["frames_written"] == 3, what="3 frames")
    [master] = tmp_path.glob("*_master.h5")
    gui = Gui()
    base = gui.url.rstrip("/")
    try:
        for n in numbers:
            gui.send("result", result(1, n, master_file=str(master), spots_xy=[[10.0, 20.0]]))
        gui.send(
            "splitter_series_end",
            {
                "series": 1,
                "received": 3,
                "skipped": 0,
                "forwarded_ranges": [[numbers[0], numbers[-1]]],
                "skipped_ranges": [],
            },
        )
        wait_until(
            lambda: gui.state()["series"] and gui.state()["series"][0]["counts"]["received"] == 3,
            what="the series and its end",
        )
        for n in numbers:
            status, info = get(f"{base}/api/frame?series=1&frame={n}")
            scale = info["scale"]
            assert status == 200 and info["frame"] == n and info["spots"] == [[10.0 / scale, 20.0 / scale]]
        refused = {
            "/api/frame?series=1&frame=-5": (400, "frame: '-5' is not a frame number"),
            "/api/frame?series=1&frame=abc": (400, "frame: 'abc' is not a frame number"),
            "/api/frame?series=1&frame=1.5": (400, "frame: '1.5'"),
            "/api/frame?series=1&frame=": (400, "frame: ''"),
            "/api/frame?series=1": (400, "missing parameter 'frame'"),
            f"/api/frame?series=1&frame={numbers[-1] + 1}": (404, f"series 1 has no frame {numbers[-1] + 1}"),
            "/api/frame?series=1&frame=99999999999": (404, "has no frame"),
            "/api/frame?series=7&frame=0": (404, "series '7' is not known"),
            "/api/frame?series=../../etc&frame=0": (400, "series: '../../etc' is not a series number or name"),
            "/api/frame?series=1&frame=1&frame=2": (400, "parameter 'frame' given twice"),
            "/api/frame?series=1&frame=1&x=2": (400, "unknown parameter 'x' (expected: series, frame)"),
            "/api/state?since=1": (400, "unknown parameter 'since' (expected: none)"),
        }
        for path, (code, text) in refused.items():
            status, body = get(base + path)
            assert status == code and text in body["error"], (path, status, body)
        assert gui.state()["gui"]["bad_requests"] == len(refused)
        assert get(base + "/nothing")[0] == 404
        # Output retention deletes the series: a frame seen before (cached) and one never seen are gone.
        for path in tmp_path.glob("*.h5"):
            path.unlink()
        for n in numbers[:2]:
            status, body = get(f"{base}/api/frame?series=1&frame={n}")
            assert status == 410 and body["error"] == (
                f"series 1: its files are gone from disk ({master}; output retention deletes the oldest series)"
            ), body
    finally:
        err = gui.stop()
    assert "Traceback" not in err, err


def test_series_kept_are_bounded_and_repeats_are_their_own_series():
    model = RunModel()
    model.add_result(result(1, 0, series_name="series_000001"))
    model.add_result(result(1, 0, n_spots=0, series_name="series_000001_r2"))  # the detector restarted
    for n in range(2, MAX_SERIES + 5):
        model.add_result(result(n, 0, series_name=f"series_{n:06d}"))
    delta = model.delta(0)
    assert len(delta["series"]) == MAX_SERIES and delta["series_dropped"] == 5
    assert delta["series"][0]["label"] == str(MAX_SERIES + 4)
    model2 = RunModel()
    model2.add_result(result(1, 0, series_name="series_000001"))
    model2.add_result(result(1, 0, n_spots=0, series_name="series_000001_r2"))
    model2.add_event(
        "series",
        {
            "htype": SUMMARY_HTYPE,
            "series": 1,
            "series_name": "series_000001_r2",
            "received": 1,
            "processed": 1,
            "hits": 0,
            "failed": 0,
            "written": 1,
            "lost_ranges": [],
        },
    )
    first, again = model2.delta(0)["series"][::-1]
    assert (first["label"], first["counts"]["hits"], first["counts"]["ended"]) == ("1", 1, False)
    assert (again["label"], again["counts"]["hits"], again["counts"]["ended"]) == ("1 r2", 0, True)
    assert again["counts"]["written"] == 1
    # A message without the name (an older sender) belongs to the newest series of that number.
    model2.add_event("splitter_series_written", {"series": 1, "frames_written": 1, "master_file": "/x_r2_master.h5"})
    assert model2.find("series_000001_r2").master_file == "/x_r2_master.h5"
    assert model2.find("1") is model2.find("series_000001_r2")


def test_the_gui_reads_the_names_the_collector_sends(tmp_path):
    """The health view and the series counts read what a real Collector publishes, by its names."""

    from test_faults_pipeline import write_config

    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings, SeriesAccount
    from intxr.gui.app import COUNT_FIELDS, JOB_FIELDS
    from intxr.gui.server import handle_message
    from intxr.messages import SeriesEnd

    config, _ = write_config(tmp_path)
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(grace=1.0, job_restarts=2))
    try:
        collector.ranks = {
            0: {"rank": 0},
            1: {"rank": 1, "dead": True, "given_up": True, "restarts": 3},
            2: {"rank": 2, "lost": True},
        }
        collector.no_readers_since = time.monotonic() - 5
        health = collector.health()
        account = SeriesAccount(1, "series_000001_r2")
        account.take_end(
            SeriesEnd.from_wire(
                {
                    "series": 1,
                    "series_name": "series_000001_r2",
                    "received": 6,
                    "forwarded_ranges": [[0, 3]],
                    "skipped_ranges": [[4, 5]],
                }
            )
        )
        account.add(0, "processed", hit=False)
        summary = account.summary().to_wire()
    finally:
        collector.shutdown()
    model = RunModel()
    model.add_event("health", health)
    model.add_event("series", summary)
    handle_message(model, [b"splitter_series_start", b'{"series": 1}'])  # an older Collector's: ignored
    assert model.bad_messages == 0
    state = model.delta(0)
    read = {f for _, f in JOB_FIELDS} | {"readers_alive", "no_readers", "no_readers_for"}
    assert read <= set(state["health"]), read - set(state["health"])
    assert state["health"]["no_readers"] is True and state["health"]["job_restarts"] == 2
    ranks = {r["rank"]: r for r in state["health"]["ranks"]}
    assert ranks[1]["dead"] and ranks[1]["given_up"] and ranks[1]["restarts"] == 3 and ranks[2]["lost"]
    counts = state["series"][0]["counts"]
    assert (counts["label"], counts["lost"], counts["failed"]) == ("1 r2", 3, 3)
    assert (counts["lost_ranges"], counts["skipped_ranges"]) == ("1-3", "4-5")
    shown = {f for _, f in COUNT_FIELDS}
    assert shown <= set(counts), shown - set(counts)


GARBAGE = [
    [b"result", b"not json"],
    [b"result"],
    [b"result", b"{}", b"extra"],
    [b"result", b'{"series": "1", "frame": 2}'],
    [b"result", b'{"series": 1, "frame": -3}'],
    [b"result", b'{"series": 1, "frame": 2, "n_spots": "many"}'],
    [b"result", b'{"series": 1, "frame": 2, "spots_xy": [[1, "a"]]}'],
    [b"result", b'{"series": 1, "frame": 2, "hres": NaN}'],
    [b"result", b"[" * 100_000 + b"]" * 100_000],
    [b"result", b"\xff\xfe\x00"],
    [b"series", b"[]"],
    [b"health", b'{"ranks": "all"}'],
    [b"health", b'{"ranks": [{"cpu": 1}]}'],
    [b"splitter_series_end", b'{"series": 1, "forwarded_ranges": [[5, 2]]}'],
    [b"resultX", b"{}"],
]


def test_garbage_on_the_results_socket_is_counted_and_the_page_keeps_updating(tmp_path):
    from browser import Browser, chromium_or_skip

    chromium = chromium_or_skip()
    gui = Gui()
    browser = None
    doc = "Bokeh.documents[0].get_model_by_name"
    try:
        browser = Browser(chromium)
        browser.goto(gui.url)
        for k in range(5):
            gui.send("result", result(1, k, series_name="series_000001"))
        browser.wait_for(f"{doc}('strip').data.frame.length === 5")
        for parts in GARBAGE:
            gui.publisher.send_multipart(parts)
        # Markup in a field is shown as text, never run or drawn.
        gui.send("splitter", {"frames_received": "<img id=evil src=x>", "last_error": "<b id=bold>x</b>"})
        for k in range(5, 10):
            gui.send("result", result(1, k, series_name="series_000001"))
        browser.wait_for(f"{doc}('strip').data.frame.length === 10")
        browser.wait_for(f"{doc}('errors').text.includes('{len(GARBAGE)} bad messages')")
        assert "&lt;img id=evil" in browser.model("splitter", "text")
        assert browser.page.locator("#evil, #bold").count() == 0  # Playwright looks into every shadow DOM
        # A repeated series 1 (detector restart) is its own series; the list is newest first, and searchable.
        gui.send("result", result(1, 0, series_name="series_000001_r2"))
        for n in range(2, 14):
            gui.send("result", result(n, 0, series_name=f"series_{n:06d}"))
        browser.wait_for(f"{doc}('series_list').data.label.length === 14")
        labels = browser.model("series_list")["label"]
        assert labels[0] == "13" and labels[-2:] == ["1 r2", "1"], labels
        browser.page.locator("input[placeholder^='search series']").fill("r2")
        browser.wait_for(f"{doc}('series_list').data.label.length === 1")
        assert browser.model("series_list")["label"] == ["1 r2"]
        # The job's state from the Collector's health: no readers is loud.
        gui.send("health", {"ranks": [{"rank": 0}, {"rank": 1, "lost": True}], "readers_alive": 0, "job_restarts": 2})
        browser.wait_for(f"{doc}('job_state').visible")
        assert "NO READERS" in browser.model("job_state", "text")
        text = browser.model("splitter", "text")
        assert re.search(r"job restarts<span[^>]*>2<", text) and re.search(r"readers alive<span[^>]*>0<", text)
        assert browser.model("ranks")["state"] == ["LOST"]
    finally:
        err = gui.stop()
        if browser is not None:
            browser.close()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "bad" in line]
    assert lines and lines[0].startswith("gui: bad message on tcp://") and ": result: not JSON" in lines[0], err
    assert len(lines) <= 2  # the first one, then a count at most every 10 s


# ---------------------------------------------------------------------------------------------
# Memory over a long run: many series of results with spots, as the soak's (a run of weeks)


def _spot_lists(k: int = 4) -> list[bytes]:
    """JSON of `spots_xy` as readers send them: the 500 strongest spots of a hit, one decimal."""
    rng = np.random.default_rng(5)
    return [json.dumps(np.round(rng.uniform(0, 2400, (n, 2)), 1).tolist()).encode() for n in rng.integers(300, 501, k)]


def _series_messages(s: int, spots: list[bytes], frames: int = 115) -> list[list[bytes]]:
    """One series as the Collector publishes it: results (half of them hits with spots), the
    Splitter's series_end, the SERIES summary."""
    name = f"series_{s:06d}"
    out = []
    for f in range(frames):
        body = json.dumps(
            result(
                s,
                f,
                n_spots=0,
                status="blank",
                series_name=name,
                errors=[],
                master_file=f"/nowhere/{name}_master.h5",
                timing={"total": 0.1},
            )
        )
        if f % 2 == 0:  # a hit: spliced in as bytes (encoding 500 spots per message is slow)
            body = (
                body.replace('"n_spots": 0', '"n_spots": 400')
                .replace('"blank"', '"processed"')
                .replace('"hit": false', '"hit": true')
            )
            body = body[:-1].encode() + b', "spots_xy": ' + spots[f % len(spots)] + b"}"
        out.append([b"result", body if isinstance(body, bytes) else body.encode()])
    end = {
        "series": s,
        "series_name": name,
        "received": frames,
        "forwarded": frames,
        "skipped": 0,
        "forwarded_ranges": [[0, frames - 1]],
        "skipped_ranges": [],
    }
    out.append([b"splitter_series_end", json.dumps(end).encode()])
    summary = {
        "htype": SUMMARY_HTYPE,
        "series": s,
        "series_name": name,
        "received": frames,
        "processed": frames // 2 + 1,
        "failed": 0,
    }
    out.append([b"series", json.dumps(summary).encode()])
    return out


def test_the_model_levels_off_over_many_series_with_spots():
    """Spots are kept compact and within MAX_SPOT_BYTES in all: after the warm-up (MAX_SERIES
    series kept) the model's memory stays where it is, whatever the run's length."""
    import tracemalloc

    from intxr.gui.model import MAX_SPOT_BYTES
    from intxr.gui.server import handle_message

    spots = _spot_lists()
    model = RunModel()
    traced = {}
    tracemalloc.start()
    try:
        # 120 series: MAX_SERIES (20) kept, so from 50 on every series added drops one (tracemalloc makes
        # each message ~5x slower: more series would prove no more and cost a minute of CI).
        for s in range(1, 121):
            for parts in _series_messages(s, spots):
                handle_message(model, parts)
            if s % 25 == 0 or s == 120:
                model.delta(0)
                traced[s] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert model.bad_messages == 0 and model.series_dropped == 120 - MAX_SERIES
    assert model._spot_bytes <= MAX_SPOT_BYTES
    # Level after the warm-up: 120 series hold what 50 did (kept as JSON lists, the spots of 20
    # series took ~50 MB and grew with every spot-rich series).
    assert traced[120] - traced[50] < 1 << 20, traced
    assert traced[120] < 20 << 20, traced
    # The newest frame's spots come back as sent (to float32 precision, rounded).
    sent = json.loads(spots[114 % len(spots)])
    assert model.spots("series_000120", 114) == sent


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_intxr_gui_rss_levels_off_over_200_series(gui):
    """The real `intxr gui` fed 200 series of spot-rich results through its results SUB at speed:
    its RSS after 200 series is within a few MB of after 50."""
    spots = _spot_lists()
    rss = {0: _rss_mb(gui.process.pid)}
    for s in range(1, 201):
        for parts in _series_messages(s, spots):
            gui.publisher.send_multipart(parts)
        if s % 10 == 0 or s == 200:  # let it keep up (a PUB drops what it cannot queue)
            wait_until(
                lambda s=s: (
                    (st := gui.state())
                    and st["series"][0]["label"] == str(s)
                    and st["series"][0]["counts"]["results"] == 115
                    and st["series"][0]["counts"]["ended"]
                ),
                what=f"series {s} shown",
            )
        if s in (50, 100, 150, 200):
            rss[s] = _rss_mb(gui.process.pid)
    state = gui.state()
    assert state["gui"]["bad_messages"] == 0 and state["series_dropped"] == 200 - MAX_SERIES
    print("intxr gui RSS (MB) after series:", {k: round(v, 1) for k, v in rss.items()})
    assert rss[200] - rss[50] < 6, rss
    # And small: spots kept as JSON lists took ~80 MB here (RSS 143 MB after 50 series).
    assert rss[200] - rss[0] < 40, rss
    assert "Traceback" not in gui.stop()


def test_the_raster_map_places_a_snake_scan_as_the_startup_config_says(tmp_path):
    """raster_snake (startup key, `--snake`) reaches the GUI's map: with rows of 4, frame 5 (the second row's
    first) sits at the row's far end, as the Collector reads a serpentine scan."""
    config = tmp_path / "startup.cfg"
    config.write_text("[DEFAULT]\n[bl]\nraster_row_length = 4\nraster_snake = True\n")
    for flags in (("--row-length", "4", "--snake"), ("-c", str(config), "-b", "bl"), ("--row-length", "4")):
        g = Gui(*flags)
        try:
            for k in range(1, 9):
                g.send("result", result(1, k))
            state = wait_until(
                lambda g=g: (s := g.state())["series"] and len(s["series"][0].get("grid") or {}) == 8 and s,
                what="8 frames on the map",
            )
            grid = {int(f): tuple(pos) for f, pos in state["series"][0]["grid"].items()}
            snake = "--snake" in flags or "-c" in flags
            assert grid[1] == (0, 0) and grid[4] == (0, 3)
            assert grid[5] == ((1, 3) if snake else (1, 0)) and grid[8] == ((1, 0) if snake else (1, 3)), (flags, grid)
        finally:
            assert "Traceback" not in g.stop()
