"""The live view's cost: CPU seconds per second of the `intxr gui` process while results arrive at 100, 500 and
2,000 a second with 0, 1 and 5 browser pages open (0: the subscriber and model alone), after 200 finished series.

The real `intxr gui` subscribed to a PUB socket on 127.0.0.1, real pages in Debian's headless chromium (one
browser, one tab per page, each its own Bokeh session). CPU is the process's user + system time from /proc over
the window from the first result sent until every page shows the last one; how far the pages lag is printed too.
The default test run (`--benchmark-disable`) does a short smoke round of each: that it runs and every page keeps
up, not how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from intxr.gui.model import MAX_SERIES
from intxr.messages import RESULT_HTYPE, SUMMARY_HTYPE
from intxr.testing import free_ports

EXE = Path(sys.executable).parent
SECONDS = 10.0  # of results per case
SECONDS_SMOKE = 1.0
SMOKE_CASE = (500, 1)  # (results/s, browsers): the default test run's one case
FINISHED_SERIES = 200
TICK = os.sysconf("SC_CLK_TCK")
STRIP = "Bokeh.documents[0].get_model_by_name('strip').data.frame.length"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _result(series: int, frame: int) -> bytes:
    n_spots = (frame * 7) % 40
    return json.dumps(
        {
            "htype": RESULT_HTYPE,
            "series": series,
            "series_name": f"series_{series:06d}",
            "frame": frame,
            "n_spots": n_spots,
            "hres": 2.0 + frame % 5 * 0.3,
            "score": n_spots / 4,
            "status": "processed",
            "hit": n_spots >= 10,
            "rank": 1,
            "latency": 0.1,
            "done": 1000.0 + frame,
            "spots_xy": [[100.0 + k, 200.0 + k] for k in range(n_spots)],
        }
    ).encode()


class LiveView:
    """`intxr gui` fed by a PUB socket, and a headless chromium to open pages of it."""

    def __init__(self):
        from browser import Browser, chromium_or_skip

        results_port, self.port = free_ports(2)
        self.publisher = zmq.Context.instance().socket(zmq.PUB)
        self.publisher.setsockopt(zmq.SNDHWM, 1_000_000)
        self.publisher.setsockopt(zmq.LINGER, 0)
        self.publisher.bind(f"tcp://127.0.0.1:{results_port}")
        self.process = subprocess.Popen(
            [
                str(EXE / "intxr"),
                "gui",
                "--results",
                f"tcp://127.0.0.1:{results_port}",
                "--port",
                str(self.port),
                "--row-length",
                "100",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        self.browser = Browser(chromium_or_skip())
        self.series = 0
        deadline = time.monotonic() + 30
        while True:  # served, and subscribed (a PUB drops what it sends before the subscription arrives)
            self.publisher.send_multipart([b"health", b'{"ranks": []}'])
            try:
                if self.state()["health"] == {"ranks": []}:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the GUI did not come up"
            time.sleep(0.2)
        for _ in range(FINISHED_SERIES):  # the run so far: series that ended
            self.series += 1
            for frame in range(10):
                self.publisher.send_multipart([b"result", _result(self.series, frame)])
            summary = {
                "htype": SUMMARY_HTYPE,
                "series": self.series,
                "series_name": f"series_{self.series:06d}",
                "received": 10,
            }
            self.publisher.send_multipart([b"series", json.dumps(summary).encode()])

        while self.state()["series"][0]["counts"].get("ended") is not True or self.state()["series_dropped"] < (
            FINISHED_SERIES - MAX_SERIES
        ):  # all taken in before anything is measured
            assert time.monotonic() < deadline + 60, "the GUI did not take the finished series in"
            time.sleep(0.1)

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "api/state", timeout=5) as r:
            return json.load(r)

    def open_pages(self, n: int) -> list:
        pages = [self.browser.browser.new_page(viewport={"width": 1400, "height": 1400}) for _ in range(n)]
        for page in pages:
            page.goto(self.url)
            page.wait_for_function(f"window.Bokeh && Bokeh.documents.length > 0 && {STRIP} >= 0")
        return pages

    def run(self, rate: int, seconds: float, pages: list) -> dict:
        """A new series at `rate` results/s for `seconds`: the GUI's CPU per second until every page shows it."""
        self.series += 1
        n = int(rate * seconds)
        bodies = [_result(self.series, frame) for frame in range(n)]
        self.publisher.send_multipart([b"result", bodies[0]])
        for page in pages:  # each page follows the newest series: wait until it shows the new one
            page.wait_for_function(f"{STRIP} === 1", timeout=30_000)
        cpu0, start = _cpu_seconds(self.process.pid), time.monotonic()
        batch = max(1, rate // 100)  # sent every 10 ms
        for k in range(1, n, batch):
            for body in bodies[k : k + batch]:
                self.publisher.send_multipart([b"result", body])
            time.sleep(max(0.0, start + (k + batch) / rate - time.monotonic()))
        sent = time.monotonic()
        lags: dict[int, float] = {}
        deadline = sent + 120
        while len(lags) < len(pages):  # every page polled in turn: each one's own time to show them all
            for k, page in enumerate(pages):
                if k not in lags and page.evaluate(STRIP) == n:
                    lags[k] = time.monotonic() - sent
            assert time.monotonic() < deadline, f"pages behind: {[page.evaluate(STRIP) for page in pages]} of {n}"
            time.sleep(0.02)
        if not pages:  # no page: until the model has them all
            while self.state()["series"][0]["counts"]["results"] != n:
                assert time.monotonic() < deadline, "the GUI's model is behind"
                time.sleep(0.02)
        done = time.monotonic()
        cpu = _cpu_seconds(self.process.pid) - cpu0
        # All the work the results caused (caught up or not), per second of their arrival.
        return {
            "results": n,
            "cpu_s_per_s": round(cpu / (sent - start), 3),
            "cpu_s": round(cpu, 3),
            "lag_s": round(max(lags.values(), default=done - sent), 2),
        }

    def close(self) -> str:
        try:
            self.browser.close()
        finally:
            self.process.terminate()
            try:
                _, err = self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                _, err = self.process.communicate()
            self.publisher.close()
        return err


@pytest.fixture(scope="module")
def live_view():
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    view = LiveView()
    yield view
    err = view.close()
    assert "Traceback" not in err, err


@pytest.mark.parametrize("browsers", [0, 1, 5])
@pytest.mark.parametrize("rate", [100, 500, 2000])
def test_gui_cpu_per_second(benchmark, live_view, rate, browsers):
    if benchmark.disabled and (rate, browsers) != SMOKE_CASE:
        pytest.skip(f"smoke run: the {SMOKE_CASE} case only (--benchmark-enable runs every case)")
    seconds = SECONDS_SMOKE if benchmark.disabled else SECONDS
    pages = live_view.open_pages(browsers)
    try:
        benchmark.group = f"gui {rate} results/s, {browsers} browsers"
        benchmark.extra_info["role"] = "intxr"
        figures = benchmark.pedantic(live_view.run, args=(rate, seconds, pages), rounds=1, iterations=1)
    finally:
        for page in pages:
            page.close()
    benchmark.extra_info.update(figures)
    print(
        f"\nintxr gui at {rate} results/s with {browsers} browsers ({FINISHED_SERIES} finished series before): "
        f"{figures['cpu_s_per_s']:.3f} CPU s/s, every page shows all {figures['results']} results "
        f"{figures['lag_s']:.2f} s after the last was sent"
    )
    assert figures["results"] == int(rate * seconds)
