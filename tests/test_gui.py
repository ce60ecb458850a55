"""The GUI: its data model, its frame rendering, and the Bokeh page in a real headless Chromium while the
pipeline runs the real thaumatin frames."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from intxr.gui.frames import render
from intxr.gui.model import MAX_SERIES, RunModel, SeriesCursor, grid_position
from intxr.messages import RESULT_HTYPE, SUMMARY_HTYPE, is_hit

EXE = Path(sys.executable).parent


def result(series: int, frame: int, n_spots: int = 20, status: str = "processed", **extra) -> dict:
    """A result as the Collector publishes it; the reader's hit rule with min_Bragg_peaks 10."""
    return {
        "htype": RESULT_HTYPE,
        "series": series,
        "frame": frame,
        "n_spots": n_spots,
        "hres": 2.0,
        "score": 5,
        "status": status,
        "hit": is_hit(status, n_spots, 10),
        "rank": 1,
        "latency": 0.1,
        "done": 1000.0 + frame,
        **extra,
    }


def test_bursts_are_coalesced_into_one_delta_with_only_new_points():
    model = RunModel()
    for k in range(500):
        model.add_result(result(1, k, n_spots=k % 20))
    first = model.delta(0)
    assert len(first["series"][0]["points"]) == 500 and first["version"] == 500
    for k in range(500, 520):
        model.add_result(result(1, k))
    second = model.delta(first["version"])
    assert [p["frame"] for p in second["series"][0]["points"]] == list(range(500, 520))
    counts = second["series"][0]["counts"]
    assert counts["results"] == 520 and counts["hits"] == 250 + 20  # n_spots >= 10 of 0..19, then 20 hits
    assert model.delta(second["version"])["series"][0]["points"] == []


def test_series_newest_first_and_old_ones_dropped():
    model = RunModel()
    for series in range(1, MAX_SERIES + 6):
        model.add_result(result(series, 0))
    numbers = [s["series"] for s in model.delta(0)["series"]]
    assert numbers == list(range(MAX_SERIES + 5, 5, -1))
    model.add_event("splitter_series_end", {"series": 7, "received": 3, "skipped": 1})
    model.add_event("series", {"htype": SUMMARY_HTYPE, "series": 7, "master_file": "/data/x_master.h5", "received": 3})
    seven = next(s for s in model.delta(0)["series"] if s["series"] == 7)
    assert seven["counts"]["received"] == 3 and seven["counts"]["ended"] and model.master_file(7) == "/data/x_master.h5"


def test_raster_layout_from_row_length_and_from_mapping():
    assert grid_position(None, 7, 4, 1) == (1, 2)
    assert grid_position("row 2 col 5", 7, 4, 1) == (2, 5)
    assert grid_position("3,9", 7, None, 1) == (3, 9)
    assert grid_position("rastering", 7, None, 1) is None
    model = RunModel(row_length=3)
    for frame in (5, 3, 4, 1, 2):  # out of order: the grid follows the first frame seen so far
        model.add_result(result(1, frame))
    grid = model.delta(0)["series"][0]["grid"]
    assert grid == {"1": (0, 0), "2": (0, 1), "3": (0, 2), "4": (1, 0), "5": (1, 1)}


def test_frame_rendering():
    rng = np.random.default_rng(1)
    data = rng.poisson(3, (300, 200)).astype(np.uint32)
    data[100, 50] = 5000  # a spot
    data[:, 120] = 2**32 - 1  # a gap column
    from intxr.geometry import Geometry

    geometry = Geometry.simple(
        wavelength=1.0, distance=200.0, beam_center=(100.0, 150.0), pixel_size=(0.172, 0.172), image_size=(200, 300)
    )
    view = render(data, geometry, None, max_size=150)
    assert view.scale == 2 and view.image.shape == (150, 100) and view.image.dtype == np.uint8
    assert view.image[50, 25] == 0  # the spot is black at any scale (block maximum)
    assert view.image[0, 60] == 200  # the gap is grey
    ring = next(r for r in view.rings if r["d"] == 3.0)
    # Bragg: 2 theta = 2 asin(1 / 6); radius = 0.2 m tan(2 theta) / 172 um, halved by the scale
    expected = 0.2 * np.tan(2 * np.arcsin(1.0 / 6.0)) / 0.000172 / 2
    assert ring["radius"] == pytest.approx(expected)


def test_a_session_gets_only_what_is_new_however_many_series_have_finished():
    """What a browser session asks for at each update: the new points of its series, the list rows that
    changed, the health when it changed. 200 finished series add nothing to it."""
    model = RunModel(row_length=10)
    for series in range(1, 201):
        for k in range(20):
            model.add_result(result(series, k, series_name=f"series_{series:06d}"))
        model.add_event(
            "series", {"htype": SUMMARY_HTYPE, "series": series, "series_name": f"series_{series:06d}", "received": 20}
        )
    rows, seen = model.listed()
    assert len(rows) == 200 and rows[0]["label"] == "200" and rows[-1]["label"] == "1"  # newest first
    assert rows[-1]["results"] == 20 and rows[-1]["ended"]  # dropped from memory, still listed with its counts
    live = model.find("series_000200").order
    cursor = SeriesCursor()
    first = model.series_since(live, cursor)
    assert len(first["points"]) == 20 and first["cells"][11] == (1, 1) and first["counts"]["results"] == 20
    assert model.series_since(live, cursor)["points"] == []
    status = model.status_since(-1)  # a new session: the state as it is
    assert model.status_since(status["version"]) is None
    model.add_result(result(200, 20, series_name="series_000200"))
    model.add_result(result(200, 3, n_spots=0, series_name="series_000200"))  # a reader's repeat
    update = model.series_since(live, cursor)
    assert [p["frame"] for p in update["points"]] == [20] and update["cells"] == [(2, 0)]
    assert [(i, p["n_spots"]) for i, p in update["replaced"]] == [(3, 0)] and update["counts"]["results"] == 21
    changed, seen = model.rows_since(seen)
    assert [r["label"] for r in changed] == ["200"] and changed[0]["results"] == 21
    assert model.rows_since(seen)[0] == []
    assert model.series_since(model.listed()[0][-1]["order"], SeriesCursor()) is None  # no longer kept


def test_a_page_still_drawing_its_last_update_gets_the_next_only_once_it_says_it_drew_it():
    """Flow control: a page slower than the results gets fewer, larger updates, not a growing queue."""
    from concurrent.futures import ThreadPoolExecutor

    from bokeh.document import Document

    from intxr.gui.app import DRAWN_WAIT, Session
    from intxr.gui.frames import Frames

    def update(session: Session) -> None:
        time.sleep(0.01)  # (points stream at most every len(points) / 20,000 s)
        session.update()

    model = RunModel()
    for k in range(10):
        model.add_result(result(1, k))
    with ThreadPoolExecutor(1) as executor:
        session = Session(Document(), model, Frames(model), executor)
        update(session)
        assert len(session.strip.data["frame"]) == 10 and session.sent.text == "1"
        for k in range(10, 20):
            model.add_result(result(1, k))
        update(session)  # the page has not drawn update 1 yet: nothing goes
        assert len(session.strip.data["frame"]) == 10 and session.sent.text == "1"
        session.drawn.text = "1"  # what the page sends after painting the frame after update 1
        update(session)
        assert len(session.strip.data["frame"]) == 20 and session.sent.text == "2"
        model.add_result(result(1, 20))
        session.sent_at -= DRAWN_WAIT  # a page that never says (a hidden tab) still gets one now and then
        update(session)
        assert len(session.strip.data["frame"]) == 21 and session.sent.text == "3"
        session.drawn.text = "not a number"  # ends the wait, breaks nothing
        model.add_result(result(1, 21))
        update(session)
        assert len(session.strip.data["frame"]) == 22


def _wait_until_served(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)


@pytest.fixture
def chromium():
    from browser import chromium_or_skip

    return chromium_or_skip()


def _not_blank(png: bytes, min_height: int = 500) -> np.ndarray:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    assert pixels.shape[0] >= min_height and pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels)) > 50
    return pixels


def test_live_page_in_headless_chromium(tmp_path, thaumatin_cbfs, chromium):
    """The daemon runs the real thaumatin frames as a 3 x 4 raster while the page is open: the strip chart
    gets every frame, the map every cell and the Collector's crystal; a click on the crystal opens its best
    frame with its spots circled."""
    from browser import Browser
    from test_pipeline import _free_ports, daemon_command, write_config

    [gui_port] = _free_ports(1)
    config, keys = write_config(
        tmp_path, send_to_ui="False", raster_row_length="4", gui_port=gui_port, simulate_rate="6"
    )
    gui = subprocess.Popen([str(EXE / "intxr"), "gui", "-c", str(config), "-b", "t"], stderr=subprocess.PIPE, text=True)
    browser = None
    try:
        url = f"http://127.0.0.1:{gui_port}/"
        _wait_until_served(url)
        browser = Browser(chromium)
        browser.goto(url)
        run = subprocess.run(
            daemon_command(config, "-n", "2", "--max_series", "1", "--simulate", *thaumatin_cbfs),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr
        # The strip chart shows every frame, the hits as the readers said.
        browser.wait_for("Bokeh.documents[0].get_model_by_name('strip').data.frame.length === 12")
        # The page says which update it has drawn (flow control): it draws, so it says so.
        browser.wait_for("Number(Bokeh.documents[0].get_model_by_name('update_drawn').text) > 1")
        strip = browser.model("strip")
        assert sorted(strip["frame"]) == list(range(1, 13)) and sum(strip["hit"]) == 10
        raster = browser.model("raster")
        cells = set(zip(raster["row"], raster["col"], strict=True))
        assert len(raster["frame"]) == 12 and cells == {(r, c) for r in range(3) for c in range(4)}
        # The resolution histogram holds every hit, each in the bin of its hres.
        histogram = browser.wait_for(
            "(d => d.hits.length > 0 && d)(Bokeh.documents[0].get_model_by_name('resolution').data)"
        )
        assert sum(histogram["hits"]) == 10
        browser.wait_for("/written<span[^>]*>12</.test(Bokeh.documents[0].get_model_by_name('counts').text)")
        crystals = browser.wait_for(
            "(d => d.best_frame.length > 0 && d)(Bokeh.documents[0].get_model_by_name('crystals').data)"
        )
        best = int(crystals["best_frame"][0])
        # A real click inside the strongest crystal's box (on another cell than its best, where it has one):
        # its best frame opens.
        inside = [
            (c, r)
            for r, c, f in zip(raster["row"], raster["col"], raster["frame"], strict=True)
            if f != best
            and crystals["left"][0] < c < crystals["right"][0]
            and crystals["top"][0] < r < crystals["bottom"][0]
        ]
        x, y = inside[0] if inside else (crystals["x"][0], crystals["y"][0])
        browser.click_at("raster_plot", x, y)
        frame = browser.wait_for(
            f"(d => d.frame[0] === {best} && d.loaded[0] && d.pinned[0] && d)"
            "(Bokeh.documents[0].get_model_by_name('frame').data)",
            explain="Bokeh.documents[0].get_model_by_name('frame_note').text",
        )
        spots = browser.model("frame_spots")
        assert frame["spots"][0] == len(spots["x"]) > 100
        rings = browser.model("frame_rings")
        assert len(rings["r"]) >= 10 and "#e6550d" in rings["color"]  # resolution and ice rings
        image = browser.model("frame_image", "data")
        assert image["dw"][0] > 300 and image["dh"][0] > 300
        assert "ok" in browser.model("ranks")["state"]
        shot = browser.screenshot()
        (tmp_path / "gui.png").write_bytes(shot)
        _not_blank(shot)
        _not_blank(browser.screenshot("frame_plot"), 300)
        # The JSON API agrees with the page.
        with urllib.request.urlopen(f"{url}api/frame?series=1&frame={best}") as r:
            info = json.load(r)
        assert len(info["spots"]) == len(spots["x"]) and any(ring["ice"] for ring in info["rings"])
    finally:
        gui.terminate()
        _, err = gui.communicate(timeout=10)
        if browser is not None:
            browser.close()
    assert "Traceback" not in err, err


def test_intxrd_starts_the_gui_when_the_config_says_so(tmp_path, thaumatin_cbfs):
    from test_pipeline import _free_ports, daemon_command, write_config

    [gui_port] = _free_ports(1)
    config, _ = write_config(tmp_path, send_to_ui="False", start_gui="True", gui_port=gui_port, simulate_rate="4")
    daemon = subprocess.Popen(
        daemon_command(config, "-n", "2", "--max_series", "1", "--simulate", *thaumatin_cbfs[:8]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = 0
    deadline = time.monotonic() + 120
    while daemon.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gui_port}/api/state", timeout=2) as r:
                state = json.load(r)
            if state["series"]:
                seen = max(seen, state["series"][0]["counts"]["results"])
        except OSError:
            pass
        time.sleep(0.2)
    out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert f"GUI on http://127.0.0.1:{gui_port}/" in err
    assert seen >= 4  # the GUI the daemon started showed the run while it ran


def test_frame_view_reads_a_series_while_the_splitter_writes_it(tmp_path, shared_data):
    """The latest hit is shown during the run: the Splitter flushes its open data file, and the GUI
    reads it without taking HDF5's file lock."""
    from test_splitter import Pusher, capture_messages

    from intxr.codec import decode
    from intxr.gui.frames import read_frame
    from intxr.splitter import Splitter

    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")
    header, frames = messages[0], messages[1:4]  # no series end: the series stays open
    pusher = Pusher()
    with Splitter(pusher.endpoint, tmp_path, series_timeout=60) as splitter:
        pusher.send([header, *frames])
        deadline = time.monotonic() + 20
        while splitter.counters()["frames_written"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.2)  # the writer flushes within FLUSH_INTERVAL (0.5 s) when idle
        assert splitter.running and splitter.counters()["series_ended"] == 0
        [master] = tmp_path.glob("*_master.h5")
        data, geometry, _ = read_frame(str(master), 2)
        np.testing.assert_array_equal(data, decode(frames[2][2], "lz4<", np.uint32, (1062, 1028)))
        assert geometry is not None and geometry.wavelength > 0


def test_page_keeps_up_with_500_results_per_second_after_200_finished_series(tmp_path, chromium):
    """200 finished series, then 2,000 results published at 500/s: every point reaches the page (coalesced
    into its 5 updates a second), which drew along the way. How far behind it was is printed, not asserted
    (timing is for benchmarks/test_bench_gui.py)."""
    import zmq
    from browser import Browser
    from test_pipeline import _free_ports

    results_port, gui_port = _free_ports(2)
    endpoint = f"tcp://127.0.0.1:{results_port}"
    publisher = zmq.Context.instance().socket(zmq.PUB)
    publisher.setsockopt(zmq.SNDHWM, 100_000)  # as the Collector's: a loaded machine must not drop
    publisher.bind(endpoint)
    gui = subprocess.Popen(
        [str(EXE / "intxr"), "gui", "--results", endpoint, "--port", str(gui_port), "--row-length", "50"],
        stderr=subprocess.PIPE,
        text=True,
    )
    browser = None
    try:
        url = f"http://127.0.0.1:{gui_port}/"
        _wait_until_served(url)
        time.sleep(0.5)  # the GUI's subscription reaches the publisher
        for s in range(1, 201):  # finished series: 10 results, the Splitter's end and the SERIES summary each
            name = f"series_{s:06d}"
            for k in range(10):
                publisher.send_multipart([b"result", json.dumps(result(s, k, series_name=name)).encode()])
            publisher.send_multipart(
                [
                    b"series",
                    json.dumps({"htype": SUMMARY_HTYPE, "series": s, "series_name": name, "received": 10}).encode(),
                ]
            )
        browser = Browser(chromium)
        browser.goto(url)
        browser.wait_for("Bokeh.documents[0].get_model_by_name('series_list').data.order.length === 200")
        n, start = 2000, time.monotonic()
        seen_while_running, behind = [], []
        for k in range(n):
            body = result(201, k, n_spots=(k * 7) % 40, spots_xy=[[1.0, 2.0]], series_name="series_000201")
            publisher.send_multipart([b"result", json.dumps(body).encode()])
            if k % 250 == 249:
                shown = browser.column_length("strip", "frame")
                seen_while_running.append(shown)
                behind.append(k + 1 - shown)
            time.sleep(max(0.0, start + (k + 1) / 500 - time.monotonic()))
        sent = time.monotonic()
        browser.wait_for(f"Bokeh.documents[0].get_model_by_name('strip').data.frame.length === {n}", timeout=60)
        caught_up = time.monotonic() - sent
        print(
            f"500 results/s after 200 finished series: points behind while sending {behind}; "
            f"all {n} shown {caught_up:.2f} s after the last was sent"
        )
        assert seen_while_running[-1] > 0  # it drew while they came, not only at the end
        strip = browser.model("strip")
        assert sorted(strip["frame"]) == list(range(n))
        assert sum(strip["hit"]) == sum(1 for k in range(n) if (k * 7) % 40 >= 10)
        assert browser.column_length("raster", "frame") == n
        assert browser.column_length("series_list", "order") == 201
        assert browser.model("series_list")["label"][0] == "201"  # newest first, and shown (followed)
        # An old series, found by its name and picked in the list: its counts, and why no frames.
        browser.page.locator("input[placeholder^='search series']").fill("series_000007")
        browser.wait_for("Bokeh.documents[0].get_model_by_name('series_list').data.label.length === 1")
        browser.page.locator(".slick-row").first.click()
        browser.wait_for("Bokeh.documents[0].get_model_by_name('series_note').text.includes('no longer kept')")
        assert "Series 7" in browser.model("title", "text") and not browser.model("follow", "active")
        assert browser.column_length("strip", "frame") == 0
    finally:
        gui.terminate()
        _, err = gui.communicate(timeout=10)
        if browser is not None:
            browser.close()
        publisher.close(linger=0)
    assert "Traceback" not in err, err
