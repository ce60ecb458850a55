"""`intxr gui`: the live view of runs, served by Python's own HTTP server to any browser.

It subscribes to the Collector's published results (and the Splitter's counters the Collector
passes on) and never asks the pipeline for anything per frame. Browsers get the page, then a
Server-Sent Events stream of coalesced updates (`/events`: at most one every 100 ms, holding
everything new since the last), and frames on demand, read back from the HDF5 files on disk
(`/api/frame`, `/api/frame.png`). No build step: the page is plain HTML, CSS and JavaScript drawing
on canvases.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

import zmq

from intxr.gui.frames import png_bytes, read_frame, render
from intxr.gui.model import RunModel

TOPICS = ("result", "series", "health", "splitter", "splitter_series_end", "splitter_series_written")
UPDATE_INTERVAL = 0.1  # seconds between two updates to one browser: the coalescing window


def subscribe(model: RunModel, endpoint: str, stop: threading.Event) -> threading.Thread:
    """Feed the model from the Collector's PUB socket until `stop`."""

    def run():
        sock = zmq.Context.instance().socket(zmq.SUB)
        for topic in TOPICS:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(endpoint)
        while not stop.is_set():
            if not sock.poll(200):
                continue
            for _ in range(10_000):
                try:
                    topic, body = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = json.loads(body)
                    if topic == b"result":
                        model.add_result(message)
                    else:
                        model.add_event(topic.decode(), message)
                except (ValueError, KeyError, TypeError) as exc:
                    print(f"gui: bad {topic!r} message ignored: {exc}", file=sys.stderr)
        sock.close(linger=0)

    thread = threading.Thread(target=run, name="gui-subscriber", daemon=True)
    thread.start()
    return thread


def _static(name: str) -> bytes:
    return resources.files("intxr.gui").joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    model: RunModel
    frame_cache: dict
    server_version = "intxr-gui"

    def log_message(self, fmt, *args):  # quiet: a browser polls
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, body, status: int = 200) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, _static("index.html"), "text/html; charset=utf-8")
            elif url.path == "/app.js":
                self._send(200, _static("app.js"), "text/javascript; charset=utf-8")
            elif url.path == "/api/state":
                self._json(self.model.delta(int(query.get("since", 0))))
            elif url.path == "/events":
                self.events(int(query.get("since", 0)))
            elif url.path == "/api/frame":
                self._json(self.frame_info(int(query["series"]), int(query["frame"])))
            elif url.path == "/api/frame.png":
                view = self.frame_view(int(query["series"]), int(query["frame"]))
                self._send(200, png_bytes(view.image), "image/png")
            else:
                self._json({"error": f"no such path {url.path}"}, 404)
        except (KeyError, ValueError, IndexError, OSError) as exc:
            self._json({"error": f"{type(exc).__name__}: {exc}"}, 404)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def events(self, since: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        version = since
        try:
            while True:
                current = self.model.wait(version, 15.0)
                if current == version:
                    self.wfile.write(b": keep-alive\n\n")  # lets the browser notice a dead server
                else:
                    delta = self.model.delta(version)
                    version = delta["version"]
                    self.wfile.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(UPDATE_INTERVAL)  # results arriving meanwhile go out together
        except (BrokenPipeError, ConnectionResetError, OSError):
            return

    def frame_view(self, series: int, frame: int):
        key = (series, frame)
        cache = self.frame_cache
        if key not in cache:
            master = self.model.master_file(series)
            if not master:
                raise KeyError(f"series {series} has no master file yet")
            first = self.model.series[series].first_frame or 0
            end = self.model.series[series].end or {}
            known = [*end.get("forwarded_frames", []), *end.get("skipped_frames", [])]
            if known:
                first = min(first, min(known))
            data, geometry, mask = read_frame(master, frame - first)
            cache[key] = render(data, geometry, mask)
            while len(cache) > 16:
                del cache[next(iter(cache))]
        return cache[key]

    def frame_info(self, series: int, frame: int) -> dict:
        view = self.frame_view(series, frame)
        spots = [[x / view.scale, y / view.scale] for x, y in self.model.spots(series, frame)]
        return {
            "series": series,
            "frame": frame,
            "width": int(view.image.shape[1]),
            "height": int(view.image.shape[0]),
            "scale": view.scale,
            "detector_shape": list(view.shape),
            "beam": list(view.beam),
            "rings": view.rings,
            "spots": spots,
            "result": self.model.point(series, frame),
            "png": f"/api/frame.png?series={series}&frame={frame}",
        }


def serve(model: RunModel, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"model": model, "frame_cache": {}})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def run_gui(results_endpoint: str, host: str, port: int, *, min_bragg_peaks: int = 10,
            row_length: int | None = None) -> int:
    model = RunModel(min_bragg_peaks=min_bragg_peaks, row_length=row_length)
    stop = threading.Event()
    subscribe(model, results_endpoint, stop)
    server = serve(model, host, port)
    print(f"gui: http://{host}:{server.server_address[1]}/ (results from {results_endpoint})", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stop.set()
        server.server_close()
    return 0
