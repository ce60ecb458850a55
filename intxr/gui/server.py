"""`intxr gui`: the live view of runs, a Bokeh server application (intxr.gui.app) on tornado.

One subscriber thread reads the Collector's published results (and the Splitter's counters the
Collector passes on) into one shared `RunModel`; it never asks the pipeline for anything per frame.
Each browser gets a Bokeh document whose own periodic callback pulls what is new at a bounded
rate. Two small JSON endpoints stay for scripts: `/api/state` (every kept series' counts, grid and
crystals; health) and `/api/frame?series=S&frame=N` (what the frame view draws).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import zmq

from intxr.gui.frames import FrameError, Frames, predicted
from intxr.gui.model import RunModel
from intxr.messages import BadMessage, parse_json
from intxr.report import Reporter

# What the Collector publishes for the GUI (its `stop` is for readers). ZeroMQ subscriptions match
# prefixes, so `splitter` also brings whatever else starts with it.
TOPICS = ("result", "series", "health", "splitter", "splitter_series_end", "splitter_series_written", "raster")
IGNORED = ("splitter_series_start",)  # an older Collector's: nothing to show, not a bad message
MAX_MESSAGE = 64 << 20  # bytes: a result with every spot is far smaller; anything larger is not ours
# Query parameters each JSON path takes: anything else is refused, naming what was expected.
PARAMETERS = {"/api/state": (), "/api/frame": ("series", "frame")}
_NUMBER = re.compile(r"\d{1,15}")
_SERIES = re.compile(r"[A-Za-z0-9_.-]{1,200}")

__all__ = ["TOPICS", "handle_message", "open_subscriber", "predicted", "run_gui", "subscribe"]


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


def subscribe(
    model: RunModel, endpoint: str, stop: threading.Event, sock: zmq.Socket | None = None, log=sys.stderr
) -> threading.Thread:
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


def parse_query(path: str, arguments: dict[str, list[bytes]]) -> dict[str, str]:
    """The query of a JSON path, every parameter known and given once."""
    allowed = PARAMETERS[path]
    query: dict[str, str] = {}
    for key, values in arguments.items():
        if key not in allowed:
            expected = ", ".join(allowed) or "none"
            raise BadRequest(400, f"{path}: unknown parameter {key[:40]!r} (expected: {expected})")
        if len(values) > 1:
            raise BadRequest(400, f"{path}: parameter {key!r} given twice")
        query[key] = values[0].decode("utf-8", "replace")
    return query


def frame_query(model: RunModel, query: dict):
    for key in ("series", "frame"):
        if key not in query:
            raise BadRequest(400, f"missing parameter {key!r} (expected: series, frame)")
    series, text = query["series"], query["frame"]
    if not _SERIES.fullmatch(series):
        raise BadRequest(400, f"series: {series[:40]!r} is not a series number or name")
    if not _NUMBER.fullmatch(text):
        raise BadRequest(400, f"frame: {text[:40]!r} is not a frame number (an integer, 0 or more)")
    view = model.find(series)
    if view is None:
        raise BadRequest(404, f"series {series!r} is not known here (not seen, or older than the series kept)")
    return view, int(text)


def state(model: RunModel) -> dict:
    """Every kept series (counts, raster grid, crystals, indexing; no points) and the health."""
    out = model.delta(0, points=False)
    for entry in out["series"]:
        del entry["points"]
    return out


def _handlers(model: RunModel, frames: Frames, executor: ThreadPoolExecutor) -> list:
    from tornado.web import RequestHandler

    class JsonHandler(RequestHandler):
        path = ""

        def set_default_headers(self):
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")

        def _answer(self, body, status: int = 200) -> None:
            self.set_status(status)
            self.finish(json.dumps(body))

        async def get(self):
            try:
                query = parse_query(self.path, self.request.arguments)
                self._answer(await self.answer(query))
            except BadRequest as exc:
                model.note("bad_requests")
                self._answer({"error": str(exc)}, exc.status)
            except FrameError as exc:
                model.note("bad_requests")
                self._answer({"error": str(exc)}, exc.status)

        def on_connection_close(self):
            model.note("dropped_connections")

    class StateHandler(JsonHandler):
        path = "/api/state"

        async def answer(self, query):
            return state(model)

    class FrameHandler(JsonHandler):
        path = "/api/frame"

        async def answer(self, query):
            view, frame = frame_query(model, query)
            # Read from disk on a worker: the server's thread serves every browser meanwhile.
            _, info = await asyncio.get_running_loop().run_in_executor(executor, frames.info, view, frame)
            return info

    return [(r"/api/state", StateHandler), (r"/api/frame", FrameHandler)]


class OneLine(logging.Handler):
    """Bokeh's and tornado's log records as one line each, never a traceback; errors counted."""

    def __init__(self, model: RunModel):
        super().__init__(logging.WARNING)
        self.model = model

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())[:300]
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                if isinstance(exc, ConnectionError | TimeoutError):
                    self.model.note("dropped_connections")
                    return
                text += f": {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if record.levelno >= logging.ERROR:
                self.model.note("failed_requests")
            print(f"gui: {record.name}: {text}", file=sys.stderr, flush=True)
        except Exception:  # logging must never raise into the server
            pass


def _quiet_logs(model: RunModel) -> None:
    handler = OneLine(model)
    for name in ("bokeh", "tornado", "asyncio", "concurrent.futures"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    # Browsers that close their tab mid-update are routine: not worth a line.
    logging.getLogger("tornado.access").setLevel(logging.CRITICAL)
    logging.getLogger("bokeh.server.views.ws").setLevel(logging.ERROR)
    logging.getLogger("bokeh.server.protocol_handler").setLevel(logging.ERROR)
    # Its note on a wildcard websocket origin: that is the choice for a GUI bound for other machines (README).
    logging.getLogger("bokeh.server.util").setLevel(logging.ERROR)


def _origins(host: str, port: int) -> list[str]:
    """Pages whose websocket Bokeh accepts: this host by name and address on a loopback address;
    any, as the page itself, when bound for other machines to open."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return [f"{h}:{port}" for h in ("localhost", "127.0.0.1", host)] if loopback else ["*"]


def make_server(model: RunModel, host: str, port: int):
    """The Bokeh server on tornado, not started; OSError when it cannot listen."""
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    from intxr.gui.app import make_document

    _quiet_logs(model)
    frames = Frames(model)
    executor = ThreadPoolExecutor(2, thread_name_prefix="gui-frames")
    app = Application(FunctionHandler(make_document(model, frames, executor)))
    return Server(
        {"/": app},
        address=host,
        port=port,
        allow_websocket_origin=_origins(host, port),
        extra_patterns=_handlers(model, frames, executor),
        check_unused_sessions_milliseconds=5000,
        unused_session_lifetime_milliseconds=15000,
        keep_alive_milliseconds=10000,
    )


def run_gui(results_endpoint: str, host: str, port: int, *, row_length: int | None = None, snake: bool = False) -> int:
    model = RunModel(row_length=row_length, snake=snake)
    try:
        server = make_server(model, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"GUI: port {port} in use on {host}: set gui_port (or --port)", file=sys.stderr, flush=True)
        else:
            print(
                f"GUI: cannot listen on {host}:{port}: {exc.strerror or exc}: set gui_host / gui_port",
                file=sys.stderr,
                flush=True,
            )
        return 2
    try:
        sock = open_subscriber(results_endpoint)
    except zmq.ZMQError as exc:
        server.stop()
        print(
            f"GUI: results endpoint {results_endpoint!r}: {exc}: set results_pub_port (or --results)",
            file=sys.stderr,
            flush=True,
        )
        return 2
    stop = threading.Event()
    subscribe(model, results_endpoint, stop, sock)
    server.start()
    print(f"gui: http://{host}:{server.port}/ (results from {results_endpoint})", file=sys.stderr, flush=True)
    # SIGTERM (the daemon stopping it) ends the loop as Ctrl-C does: a clean exit, no traceback.
    signal.signal(signal.SIGTERM, lambda *_: server.io_loop.add_callback_from_signal(server.io_loop.stop))
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return 0
