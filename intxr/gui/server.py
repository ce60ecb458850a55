"""`intxr gui`: the live view of runs, served by Python's own HTTP server to any browser.

It subscribes to the Collector's published results (and the Splitter's counters the Collector
passes on) and never asks the pipeline for anything per frame. Browsers get the page, then a
Server-Sent Events stream of coalesced updates (`/events`: at most one every 100 ms, holding
everything new since the last), and frames on demand, read back from the HDF5 files on disk
(`/api/frame`, `/api/frame.png`). No build step: the page is plain HTML, CSS and JavaScript drawing
on canvases.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qsl, urlencode, urlparse

import zmq

from intxr.gui.frames import png_bytes, read_frame, render
from intxr.gui.model import MAX_SPOT_FRAMES, RunModel, SeriesView
from intxr.messages import BadMessage, parse_json
from intxr.reader.predict import predict_spots
from intxr.report import Reporter

# What the Collector publishes for the GUI (its `stop` is for readers). ZeroMQ subscriptions match
# prefixes, so `splitter` also brings whatever else starts with it.
TOPICS = ("result", "series", "health", "splitter", "splitter_series_end", "splitter_series_written", "raster")
IGNORED = ("splitter_series_start",)  # an older Collector's: nothing to show, not a bad message
UPDATE_INTERVAL = 0.1  # seconds between two updates to one browser: the coalescing window
MAX_MESSAGE = 64 << 20  # bytes: a result with every spot is far smaller; anything larger is not ours
FRAME_CACHE = 16  # rendered frames kept for repeated requests
# Query parameters each path takes: anything else is refused, naming what was expected.
PARAMETERS = {
    "/": (), "/index.html": (), "/app.js": (),
    "/api/state": ("since",), "/events": ("since",),
    "/api/frame": ("series", "frame"), "/api/frame.png": ("series", "frame"),
}
_NUMBER = re.compile(r"\d{1,15}")
_SERIES = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def handle_message(model: RunModel, parts: list[bytes]) -> None:
    """Feed one message from the Collector's PUB socket to the model; BadMessage when it is not one."""
    if len(parts) != 2:
        raise BadMessage(f"a message of {len(parts)} parts (expected topic and JSON body)")
    topic = parts[0].decode("ascii", "replace")
    if topic in IGNORED:
        return
    if topic not in TOPICS:
        raise BadMessage(f"unknown topic {topic[:40]!r}")
    try:
        body = parse_json(parts[1])
        if topic == "result":
            model.add_result(body)
        else:
            model.add_event(topic, body)
    except BadMessage as exc:
        raise type(exc)(f"{topic}: {exc}") from None


def open_subscriber(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    for topic in TOPICS:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    try:
        sock.connect(endpoint)
    except zmq.ZMQError:
        sock.close()
        raise
    return sock


def subscribe(model: RunModel, endpoint: str, stop: threading.Event, sock: zmq.Socket | None = None,
              log=sys.stderr) -> threading.Thread:
    """Feed the model from the Collector's PUB socket until `stop`. Every message is checked: a bad
    one is counted (shown in the health view) and reported, and the thread goes on."""
    sock = sock if sock is not None else open_subscriber(endpoint)
    reporter = Reporter("gui", "bad message", endpoint, note="; counted (see the health view) and ignored", log=log)

    def run():
        while not stop.is_set():
            reporter.tick()
            try:
                if not sock.poll(200):
                    continue
            except zmq.ZMQError as exc:  # the context went away under us: nothing more will come
                print(f"gui: results subscription ended: {exc}", file=log, flush=True)
                return
            for _ in range(10_000):
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    handle_message(model, parts)
                except BadMessage as exc:
                    model.bad_message(str(exc))
                    reporter(str(exc))
                except Exception as exc:  # a bug here must not stop the live view: said, counted
                    text = f"{type(exc).__name__} handling a {parts[0][:40]!r} message: {exc}"
                    model.bad_message(text)
                    reporter(text)
        sock.close(linger=0)

    thread = threading.Thread(target=run, name="gui-subscriber", daemon=True)
    thread.start()
    return thread


def _static(name: str) -> bytes:
    return resources.files("intxr.gui").joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    model: RunModel
    frame_cache: dict
    cache_lock: threading.Lock
    server_version = "intxr-gui"
    timeout = 60  # a client that stops reading or writing for this long is dropped

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
        try:
            self._get()
        except (ConnectionError, TimeoutError):
            self.model.note("dropped_connections")  # the browser went away: nothing to answer
            self.close_connection = True

    def _get(self) -> None:
        url = urlparse(self.path)
        try:
            query = self._query(url.path, url.query)
            if url.path in ("/", "/index.html"):
                self._send(200, _static("index.html"), "text/html; charset=utf-8")
            elif url.path == "/app.js":
                self._send(200, _static("app.js"), "text/javascript; charset=utf-8")
            elif url.path == "/api/state":
                self._json(self.model.delta(self._since(query)))
            elif url.path == "/events":
                self.events(self._since(query))
            elif url.path == "/api/frame":
                self._json(self.frame_info(*self._frame_query(query)))
            else:  # /api/frame.png
                view, frame = self._frame_query(query)
                self._send(200, png_bytes(self.frame_view(view, frame).image), "image/png")
        except BadRequest as exc:
            self.model.note("bad_requests")
            self._json({"error": str(exc)}, exc.status)

    def _query(self, path: str, text: str) -> dict[str, str]:
        if path not in PARAMETERS:
            raise BadRequest(404, f"no such path {path[:100]!r}")
        allowed = PARAMETERS[path]
        query: dict[str, str] = {}
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=10)
        except ValueError as exc:
            raise BadRequest(400, f"{path}: bad query string ({exc})") from None
        for key, value in pairs:
            if key not in allowed:
                expected = ", ".join(allowed) or "none"
                raise BadRequest(400, f"{path}: unknown parameter {key[:40]!r} (expected: {expected})")
            if key in query:
                raise BadRequest(400, f"{path}: parameter {key!r} given twice")
            query[key] = value
        return query

    def _since(self, query: dict) -> int:
        text = query.get("since", "0")
        if not _NUMBER.fullmatch(text):
            raise BadRequest(400, f"since: {text[:40]!r} is not a version number (an integer, 0 or more)")
        since = int(text)
        return 0 if since > self.model.version else since  # a page from an earlier GUI: everything

    def _frame_query(self, query: dict) -> tuple[SeriesView, int]:
        for key in ("series", "frame"):
            if key not in query:
                raise BadRequest(400, f"missing parameter {key!r} (expected: series, frame)")
        series, text = query["series"], query["frame"]
        if not _SERIES.fullmatch(series):
            raise BadRequest(400, f"series: {series[:40]!r} is not a series number or name")
        if not _NUMBER.fullmatch(text):
            raise BadRequest(400, f"frame: {text[:40]!r} is not a frame number (an integer, 0 or more)")
        view = self.model.find(series)
        if view is None:
            raise BadRequest(404, f"series {series!r} is not known here (not seen, or older than the series kept)")
        return view, int(text)

    def events(self, since: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        version = since
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

    def frame_view(self, view: SeriesView, frame: int):
        master = view.master_file
        if not master:
            raise BadRequest(404, f"series {view.label} has no master file yet")
        # Checked before the cache too: files deleted (output retention) are gone for good.
        if not os.path.exists(master):
            raise BadRequest(410, f"series {view.label}: its files are gone from disk ({master}; output retention "
                                  f"deletes the oldest series)")
        key = (view.key, view.order, frame)
        with self.cache_lock:
            cached = self.frame_cache.get(key)
        if cached is not None:
            return cached
        index = view.disk_index(frame)
        if index is None:
            raise BadRequest(404, f"series {view.label} has no frame {frame}")
        try:
            data, geometry, mask = read_frame(master, index)
        except IndexError:
            raise BadRequest(404, f"series {view.label}: frame {frame} is not on disk (yet)") from None
        except Exception as exc:  # unreadable, still being written, not NXmx: said, not a traceback
            first_data = re.sub(r"_master\.h5$", "_data_000001.h5", master)
            if not os.path.exists(master) or not os.path.exists(first_data):  # deleted (while) being read
                raise BadRequest(410, f"series {view.label}: its files are gone from disk ({master})") from None
            text = " ".join(str(exc).split())[:300]
            raise BadRequest(404, f"series {view.label}: cannot read frame {frame} from {master}: {text}") from None
        rendered = render(data, geometry, mask)
        with self.cache_lock:
            self.frame_cache[key] = rendered
            while len(self.frame_cache) > FRAME_CACHE:
                del self.frame_cache[next(iter(self.frame_cache))]
        return rendered

    def frame_info(self, view: SeriesView, frame: int) -> dict:
        rendered = self.frame_view(view, frame)
        spots = [[x / rendered.scale, y / rendered.scale] for x, y in self.model.spots(view.key, frame)]
        point = self.model.point(view.key, frame)
        crystal = self.model.crystal(view.key, frame)
        predicted, note = self.predicted(rendered, point, crystal)
        return {
            "series": view.series,
            "key": view.key,
            "label": view.label,
            "frame": frame,
            "width": int(rendered.image.shape[1]),
            "height": int(rendered.image.shape[0]),
            "scale": rendered.scale,
            "detector_shape": list(rendered.shape),
            "beam": list(rendered.beam),
            "rings": rendered.rings,
            "spots": spots,
            "result": point,
            "indexing": crystal,
            "predicted": predicted,
            "predicted_note": note,
            "png": f"/api/frame.png?{urlencode({'series': view.key, 'frame': frame})}",
        }

    @staticmethod
    def predicted(rendered, point: dict | None, crystal: dict | None) -> tuple[list, str | None]:
        """The indexed lattice's predicted spots in view pixels (intxr.reader.predict, with the geometry of the
        series' master file, the one the readers had), or none and why."""
        if crystal is None:
            if point is not None and point.get("indexed"):
                return [], f"indexed, but no longer kept (the latest {MAX_SPOT_FRAMES} indexed frames are)"
            return [], "not indexed"
        if rendered.geometry is None:
            return [], "the master file has no complete geometry to predict with"
        found = predict_spots(rendered.geometry, crystal["orientation_matrix"])
        scale = rendered.scale
        return [[round(x / scale, 2), round(y / scale, 2)] for x, y in found.xy.tolist()], found.reason


class Server(ThreadingHTTPServer):
    daemon_threads = True
    model: RunModel

    def handle_error(self, request, client_address):
        # socketserver prints a traceback here by default: a dropped browser is counted instead,
        # anything else is one line.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            self.model.note("dropped_connections")
        else:
            self.model.note("failed_requests")
            print(f"gui: a request from {client_address[0]} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)


def serve(model: RunModel, host: str, port: int) -> Server:
    handler = type("BoundHandler", (Handler,), {"model": model, "frame_cache": {}, "cache_lock": threading.Lock()})
    server = Server((host, port), handler)
    server.model = model
    return server


def run_gui(results_endpoint: str, host: str, port: int, *, row_length: int | None = None,
            snake: bool = False) -> int:
    model = RunModel(row_length=row_length, snake=snake)
    try:
        server = serve(model, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"GUI: port {port} in use on {host}: set gui_port (or --port)", file=sys.stderr, flush=True)
        else:
            print(f"GUI: cannot listen on {host}:{port}: {exc.strerror or exc}: set gui_host / gui_port",
                  file=sys.stderr, flush=True)
        return 2
    try:
        sock = open_subscriber(results_endpoint)
    except zmq.ZMQError as exc:
        server.server_close()
        print(f"GUI: results endpoint {results_endpoint!r}: {exc}: set results_pub_port (or --results)",
              file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    subscribe(model, results_endpoint, stop, sock)
    print(f"gui: http://{host}:{server.server_address[1]}/ (results from {results_endpoint})", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stop.set()
        server.server_close()
    return 0
