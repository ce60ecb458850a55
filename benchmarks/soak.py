"""Soak: real frames through the real `intxrd` (real mpirun, Splitter, Collector, readers, GUI) while
everything a beamline throws at it happens: reader kills, a Collector kill, a detector restart at
series 1, a pause past the series timeout, a full disk (a real small tmpfs), malformed messages inside
series and garbage on every bound socket. Run by hand as root (it mounts a tmpfs), not by pytest:

    .venv/bin/python benchmarks/soak.py --frames 10000 --rate 25
    .venv/bin/python benchmarks/soak.py --frames 500 --faults reader,collector,malformed   # a short one

The script is the detector: a PUSH bound on 127.0.0.1 sending DECTRIS stream v1 (or v2) series of real
frames (the PILATUS thaumatin CBFs re-encoded bs32-lz4, the real EIGER2 4M stream blob), so it knows
every blob it sent. `output_dir` is a tmpfs it mounts; a mover takes every series the Splitter reports
written (`series_written`) to a directory on the real disk, and stops for the disk-full episode until
the Splitter says the disk is full. At the end it reads every chunk back (h5py + hdf5plugin
`read_direct_chunk`) through every master the Splitter reported, compares them with the sent blobs,
checks that the `--record` file and the SERIES lines account for every frame exactly once, and
prints the figures: frames sent / on disk / accounted, recovery after each kill, throughput before
and after the faults, and the RSS of every process (sampled every second from /proc). It cleans up
its processes, mount and files whatever happens (Ctrl-C included); logs stay in --logs.
"""

from __future__ import annotations

import argparse
import bz2  # noqa: F401  (read_cbf reads .bz2)
import collections
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intxr import _splitter  # noqa: E402
from intxr import stream_format as fmt  # noqa: E402
from intxr.geometry import Geometry  # noqa: E402
from intxr.images import read_cbf  # noqa: E402
from intxr.simulate import pixels_for  # noqa: E402
from intxr.testing import free_ports  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
EXE = Path(sys.executable).parent
ALL_FAULTS = ("reader", "collector", "restart", "pause", "diskfull", "malformed", "garbage")


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# Frames: real blobs, each sent one knows by index


@dataclass
class Source:
    name: str
    shape: tuple[int, int]  # rows, columns
    dtype: np.dtype
    encoding: str  # v1 encoding
    blobs: list[bytes]
    config: bytes  # the v1 config part
    geometry: Geometry
    md5: list[str] = field(default_factory=list)


def load_sources() -> list[Source]:
    """A: the 12 PILATUS3 6M thaumatin grid-scan frames (hits and blanks) as uint32 bs32-lz4;
    B: the real EIGER2 4M stream frame (bs16-lz4, as the detector sent it)."""
    cbfs = sorted(glob.glob(str(SHARED / "cbf" / "thaumatin_grid" / "thau_3_2_*.cbf.bz2")))
    if not cbfs:
        sys.exit(f"soak: no thaumatin CBFs in {SHARED}/cbf/thaumatin_grid")
    blobs, geometry = [], None
    for path in cbfs:
        image = read_cbf(path)
        geometry = geometry or image.geometry
        pixels = pixels_for(image.data, "bs32-lz4")
        blobs.append(bytes(_splitter.bslz4_compress(pixels.view(np.uint8), 4)))
    shape = image.data.shape
    config_a = fmt.dumps_v1(fmt.detector_config(geometry, shape, np.uint32, nimages=1))
    a = Source("thaumatin-6M-bs32", shape, np.dtype(np.uint32), "bs32-lz4<", blobs, config_a, geometry)
    dls = SHARED / "stream_v1" / "dls_eiger2_16m_roi4m"
    header = msgpack.unpackb((dls / "header").read_bytes(), raw=False)
    image = msgpack.unpackb((dls / "image000044").read_bytes(), raw=False)
    config = json.loads(header[1])
    width, height = json.loads(image[1])["shape"]
    g = Geometry.simple(wavelength=config["wavelength"], distance=config["detector_distance"] * 1000,
                        beam_center=(config["beam_center_x"], config["beam_center_y"]),
                        pixel_size=(config["x_pixel_size"] * 1000, config["y_pixel_size"] * 1000),
                        image_size=(width, height))
    b = Source("eiger2-4M-bs16", (height, width), np.dtype(np.uint16), "bs16-lz4<", [bytes(image[2])],
               header[1].rstrip(b"\n"), g)
    for s in (a, b):
        s.md5 = [hashlib.md5(x).hexdigest() for x in s.blobs]
    return [a, b]


# ---------------------------------------------------------------------------------------------
# Messages (v1 and v2) and their malformed mutations


class Protocol:
    def __init__(self, name: str):
        self.name = name
        self.uid = fmt._ulid()
        self.date = fmt.collection_date()

    def header(self, series: int, src: Source, n: int) -> list[bytes]:
        if self.name == "v1":
            return [fmt.dumps_v1({"header_detail": "basic", "htype": "dheader-1.0", "series": series}), src.config]
        return [fmt.v2_start(series, self.uid, src.geometry, src.shape, src.dtype, nimages=n,
                             channels=["threshold_1"], pixel_mask=None, arm_date=self.date)]

    def frame(self, series: int, k: int, blob: bytes, src: Source, shape=None, dtype=None) -> list[bytes]:
        shape, dtype = shape or src.shape, dtype or src.dtype
        if self.name == "v1":
            return fmt.v1_image(series, k, blob, src.encoding, shape, dtype, 0, 1000)
        array = fmt.v2_compressed_array(shape, dtype, blob, "bslz4")
        return [fmt.v2_image(series, self.uid, k, {"threshold_1": array}, series_date=self.date,
                             start_s=k * 0.01, exposure_s=0.01)]

    def end(self, series: int) -> list[bytes]:
        return fmt.v1_end(series) if self.name == "v1" else [fmt.v2_end(series, self.uid)]

    def malformed(self, n: int, series: int, k: int, src: Source, other: Source, rng: random.Random):
        """The n-th malformed message inside series `series` (after frame k): (kind, parts)."""
        blob = src.blobs[k % len(src.blobs)]
        if self.name == "v1":
            kinds = ["truncated blob", "size mismatch", "bad JSON", "foreign series id", "absurd shape",
                     "unknown encoding", "missing parts", "noise", "other shape", "end of another series"]
            kind = kinds[n % len(kinds)]
            msg = self.frame(series, k, blob, src)
            width, height = src.shape[1], src.shape[0]
            if kind == "truncated blob":
                msg[2] = blob[: len(blob) // 2]
            elif kind == "size mismatch":
                msg[1] = msg[1].replace(b'"size":', b'"size":1')
            elif kind == "bad JSON":
                msg[0] = msg[0][: len(msg[0]) // 2]
            elif kind == "foreign series id":
                msg = self.frame(series + 1000, k, blob, src)
            elif kind == "absurd shape":
                msg[1] = msg[1].replace(f'"shape":[{width},{height}]'.encode(), b'"shape":[1048576,1048576]')
            elif kind == "unknown encoding":
                msg[1] = msg[1].replace(src.encoding.encode(), b"zstd<")
            elif kind == "missing parts":
                msg = msg[:2]
            elif kind == "noise":
                msg = [rng.randbytes(rng.randint(1, 400)) for _ in range(rng.randint(1, 4))]
            elif kind == "other shape":
                msg = fmt.v1_image(series, k, other.blobs[0], other.encoding, other.shape, other.dtype, 0, 1000)
            else:
                msg = self.end(series + 2000)
            return kind, msg
        kinds = ["noise", "truncated CBOR", "foreign series id", "absurd shape", "other shape",
                 "end of another series", "bad CBOR map"]
        kind = kinds[n % len(kinds)]
        if kind == "noise":
            msg = [b"\xd9\xd9\xf7" + rng.randbytes(rng.randint(1, 300))]
        elif kind == "truncated CBOR":
            msg = [self.frame(series, k, blob, src)[0][:-100]]
        elif kind == "foreign series id":
            msg = self.frame(series + 1000, k, blob, src)
        elif kind == "absurd shape":
            msg = self.frame(series, k, blob, src, shape=(2**20, 2**20))
        elif kind == "other shape":
            msg = self.frame(series, k, other.blobs[0], src, shape=other.shape, dtype=other.dtype)
        elif kind == "end of another series":
            msg = self.end(series + 2000)
        else:
            msg = [fmt._cbor({"type": "image", "series_id": "x", "image_id": -1})]
        return kind, msg


# ---------------------------------------------------------------------------------------------
# The daemon, its output lines and its processes


class Daemon:
    def __init__(self, config: Path, section: str, n_ranks: int, record: Path, logs: Path):
        self.proc = subprocess.Popen(
            [str(EXE / "intxrd"), "-c", str(config), "-b", section, "-n", str(n_ranks), "--record", str(record)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.out: list[tuple[float, str]] = []  # (wall time, line)
        self.err: list[tuple[float, str]] = []
        self.threads = [self._follow(self.proc.stdout, self.out, logs / "daemon.out"),
                        self._follow(self.proc.stderr, self.err, logs / "daemon.err")]

    @staticmethod
    def _follow(pipe, sink, path: Path):
        def run():
            with open(path, "w") as f:
                for line in pipe:
                    t = time.time()
                    sink.append((t, line.rstrip("\n")))
                    f.write(f"{t:.3f} {line}")
                    f.flush()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def find(self, pattern: str, stream: str = "err", after: float = 0.0) -> list[tuple[float, re.Match]]:
        lines = self.err if stream == "err" else self.out
        return [(t, m) for t, line in list(lines) if t >= after and (m := re.search(pattern, line))]

    def wait_for(self, pattern: str, stream: str = "err", after: float = 0.0, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(pattern, stream, after)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                time.sleep(0.5)
                found = self.find(pattern, stream, after)
                return found[0] if found else None
            time.sleep(0.05)
        return None

    def rank_pid(self, rank: int) -> int | None:
        """The newest process of `rank` the daemon or the Collector announced."""
        found = [(t, int(m.group(1))) for t, m in self.find(rf"rank +{rank} (?:reader|collector) .* pid (\d+)")]
        found += [(t, int(m.group(1))) for t, m in self.find(rf"reader rank {rank} replaced: pid (\d+)")]
        return max(found)[1] if found else None


def proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def label_of(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    text = " ".join(c.decode(errors="replace") for c in cmd if c)
    exe = " ".join(c.decode(errors="replace") for c in cmd[:2])
    if "prterun" in exe or "mpirun" in exe:
        return "mpirun"
    if "intxr.pipeline" in text:
        if b"--reader" in cmd:
            i = cmd.index(b"--reader")
            return f"reader rank {cmd[i + 1].decode()} (replacement)"
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK="))
        except (OSError, StopIteration):
            rank = "?"
        return "collector (rank 0)" if rank == "0" else f"reader rank {rank}"
    if "intxrd" in exe:
        return "intxrd (daemon + Splitter)"
    if " gui" in text or "intxr.gui" in text:
        return "gui"
    if "prted" in text:
        return "prted"
    return Path(cmd[0].decode(errors="replace")).name if cmd and cmd[0] else None


class Sampler:
    """RSS of every process of the daemon's sessions, every second."""

    def __init__(self, daemon_pid: int):
        self.root = daemon_pid
        self.sessions = {daemon_pid}
        self.procs: dict[int, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def pids(self) -> list[int]:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := proc_stat(int(entry))) and st[0] != "Z":
                stats[int(entry)] = st
        mine = {self.root} if self.root in stats else set()
        changed = True
        while changed:  # descendants of the daemon, and everyone in their sessions
            changed = False
            for pid, st in stats.items():
                if pid not in mine and (int(st[1]) in mine or int(st[3]) in self.sessions):
                    mine.add(pid)
                    changed = True
        self.sessions |= {int(stats[p][3]) for p in mine if p in stats}
        return sorted(mine)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        t = time.time()
        for pid in self.pids():
            kb = rss_kb(pid)
            if kb is None:
                continue
            p = self.procs.get(pid)
            if p is None:
                p = self.procs[pid] = {"label": label_of(pid) or "?", "samples": []}
            p["samples"].append((t, kb))

    def all_pids(self) -> list[int]:
        return self.pids()


# ---------------------------------------------------------------------------------------------
# The Splitter's accounting, as published


class Events:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        for topic in (b"counters", b"series_end", b"series_written", b"series_start"):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.counters: dict = {}
        self.ends: dict[str, dict] = {}
        self.written: dict[str, dict] = {}
        self.written_order: list[str] = []
        self.disk_full_seen: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(200):
                continue
            topic, body = self.sock.recv_multipart()[:2]
            body = json.loads(body)
            if topic == b"counters":
                self.counters = body
            elif topic == b"series_end":
                self.ends.setdefault(body["series_name"], body)
            elif topic == b"series_written" and body["series_name"] not in self.written:
                self.written[body["series_name"]] = body
                self.written_order.append(body["series_name"])
        self.sock.close(linger=0)


class Mover(threading.Thread):
    """Takes every series the Splitter has closed off the tmpfs to the real disk; paused for the
    disk-full episode."""

    def __init__(self, events: Events, src: Path, dst: Path):
        super().__init__(daemon=True)
        self.events, self.src, self.dst = events, src, dst
        self.paused = threading.Event()
        self.stop = threading.Event()
        self.moved: list[str] = []
        self.bytes = 0

    def move_ready(self) -> None:
        for name in list(self.events.written_order):
            if name in self.moved:
                continue
            files = sorted(self.src.glob(f"{glob.escape(name)}_master.h5")) + sorted(
                self.src.glob(f"{glob.escape(name)}_data_[0-9][0-9][0-9][0-9][0-9][0-9].h5"))
            for f in files:
                self.bytes += f.stat().st_size
                shutil.move(str(f), self.dst / f.name)
            self.moved.append(name)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            if not self.paused.is_set():
                self.move_ready()


# ---------------------------------------------------------------------------------------------
# Garbage on every bound socket


def garbage_router(endpoint: str, n: int, rng: random.Random) -> dict:
    """Half as ZeroMQ messages from a DEALER, half as raw TCP bytes; frames handed back are counted."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    for i in range(n // 2):
        parts = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 4))]
        if i % 5 == 0:
            parts = [b"", b'{"htype": "not-a-request"}']
        dealer.send_multipart(parts)
    frames_back = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if dealer.poll(200):
            reply = dealer.recv_multipart()
            if any(b"intxr-frame-1.0" in p[:200] for p in reply):
                frames_back += 1
    dealer.close()
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    raw = raw_tcp(host, int(port), n - n // 2, rng)
    return {"zmq": n // 2, "raw_tcp": raw, "frames_handed_to_garbage": frames_back}


def raw_tcp(host: str, port: int, n: int, rng: random.Random, payloads: list[bytes] | None = None) -> int:
    sent = 0
    for i in range(n):
        data = payloads[i % len(payloads)] if payloads else rng.randbytes(rng.randint(1, 2000))
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.sendall(data)
                s.settimeout(0.3)
                try:
                    s.recv(4096)
                except OSError:
                    pass
            sent += 1
        except OSError:
            pass
    return sent


def garbage_collector(endpoint: str, n: int, rng: random.Random) -> int:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.setsockopt(zmq.SNDTIMEO, 1000)
    push.connect(endpoint)
    junk = [[b"result", b"not json"], [b"result", b"[1, 2, 3]"],
            [b"result", b'{"series": "one", "frame": 1, "status": "processed"}'],
            [b"result", b'{"series": 1, "frame": -4, "status": "processed"}'],
            [b"result", b'{"series": 1, "frame": 3, "status": "exploded"}'],
            [b"result", b'{"series": 1, "frame": 2, "status": "processed", "hres": NaN}'],
            [b"result"], [b"result", b"{}", b"{}"], [b"status", b'{"rank": "x"}'], [b"status", b'{"rank": 0}'],
            [b"hello", b"{}"], [b"\xff\xfe", b"\x00" * 100]]
    sent = 0
    for i in range(n):
        msg = junk[i % len(junk)] if i < 60 else [rng.randbytes(rng.randint(0, 50)) for _ in range(rng.randint(1, 3))]
        try:
            push.send_multipart(msg)
            sent += 1
        except zmq.Again:
            pass
    push.close()
    return sent


def garbage_gui(port: int, n: int, rng: random.Random) -> int:
    requests = [b"GET /api/frame?frame=-5 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /api/frame?frame=abc&series=%ff HTTP/1.1\r\n\r\n",
                b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
                b"POST /api/results HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nxx",
                b"GET /events HTTP/1.1\r\n\r\n",  # the SSE stream, dropped at once
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
                b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n" + b"X: y\r\n" * 500 + b"\r\n"]
    payloads = requests + [rng.randbytes(rng.randint(1, 500)) for _ in range(20)]
    return raw_tcp("127.0.0.1", port, n, rng, payloads)


# ---------------------------------------------------------------------------------------------
# Reading back


def chunks_of(master: Path) -> list[bytes]:
    import h5py
    import hdf5plugin  # noqa: F401

    out = []
    with h5py.File(master, "r") as f:
        for name in sorted(k for k in f["entry/data"] if k.startswith("data_")):
            ds = f["entry/data"][name]
            out += [ds.id.read_direct_chunk((i, 0, 0))[1] for i in range(ds.shape[0])]
    return out


def expand(ranges) -> list[int]:
    return [f for a, b in ranges or [] for f in range(a, b + 1)]


def repeat_number(name: str) -> int:
    m = re.search(r"_r(\d+)$", name)
    return int(m.group(1)) if m else 1


# ---------------------------------------------------------------------------------------------
# The run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=10_000, help="good frames to send")
    ap.add_argument("--rate", type=float, default=25.0, help="frames/s the detector sends (0: as fast as taken)")
    ap.add_argument("--protocol", choices=["v1", "v2"], default="v1")
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--faults", default=",".join(ALL_FAULTS), help=f"comma list of {', '.join(ALL_FAULTS)}")
    ap.add_argument("--malformed", type=int, default=1000, help="malformed messages inside series")
    ap.add_argument("--garbage", type=int, default=100, help="garbage messages to each bound socket")
    ap.add_argument("--tmpfs-mb", type=int, default=600)
    ap.add_argument("--work", default="/var/tmp/intxr-soak", help="work directory on the real disk (deleted)")
    ap.add_argument("--logs", default="/tmp/intxr-soak-logs", help="logs and the report (kept)")
    ap.add_argument("--no-gui", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the written files")
    args = ap.parse_args()
    faults = {f for f in args.faults.split(",") if f}
    if faults - set(ALL_FAULTS):
        ap.error(f"unknown faults {sorted(faults - set(ALL_FAULTS))}")
    if os.geteuid() != 0 and "diskfull" in faults:
        ap.error("the disk-full episode mounts a tmpfs: run as root, or leave out diskfull")

    work, logs = Path(args.work), Path(args.logs)
    if work.exists():
        subprocess.run(["umount", "-l", str(work / "out")], capture_output=True)
        shutil.rmtree(work)
    (work / "out").mkdir(parents=True)
    (work / "moved").mkdir()
    logs.mkdir(parents=True, exist_ok=True)
    mounted = False
    daemon: Daemon | None = None
    sampler: Sampler | None = None
    events: Events | None = None
    mover: Mover | None = None
    ctx = zmq.Context.instance()
    detector = None
    try:
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mb}m", "tmpfs", str(work / "out")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"soak: mount tmpfs: {r.stderr.strip()}")
            mounted = True
        out_dir, moved_dir = work / "out", work / "moved"
        log("preparing real frames ...")
        sources = load_sources()
        for s in sources:
            log(f"  {s.name}: {len(s.blobs)} blob(s), {s.shape[0]}x{s.shape[1]} {s.dtype}, "
                f"{np.mean([len(b) for b in s.blobs]) / 1e6:.2f} MB each")
        det_port, port, pub, coll, res, gui_port = free_ports(6)
        timeout = 3
        cfg_path = work / "startup.cfg"
        keys = {
            "beamline": "soak", "custom_keys": "None", "host": "127.0.0.1", "port": port,
            "splitter_pub_port": pub, "collector_port": coll, "results_pub_port": res, "timeout": timeout,
            "detector_endpoint": f"tcp://127.0.0.1:{det_port}", "protocol": args.protocol,
            "output_dir": str(out_dir), "frames_per_file": 1000, "skip_after": 2,
            "start_gui": "False" if args.no_gui else "True", "gui_host": "127.0.0.1", "gui_port": gui_port,
        }
        cfg_path.write_text("[soak]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
        record = work / "record.jsonl"

        detector = ctx.socket(zmq.PUSH)
        detector.setsockopt(zmq.SNDHWM, 200)
        detector.setsockopt(zmq.LINGER, 0)
        detector.bind(f"tcp://127.0.0.1:{det_port}")

        daemon = Daemon(cfg_path, "soak", args.readers + 1, record, logs)
        sampler = Sampler(daemon.proc.pid)
        events = Events(f"tcp://127.0.0.1:{pub}")
        mover = Mover(events, out_dir, moved_dir)
        mover.start()
        if daemon.wait_for(r"rank +0 collector .* pid (\d+)", timeout=90) is None:
            raise RuntimeError("the Collector did not come up in 90 s")
        for rank in range(1, args.readers + 1):
            if daemon.wait_for(rf"rank +{rank} reader .* pid (\d+)", timeout=30) is None:
                raise RuntimeError(f"reader rank {rank} did not come up")
        time.sleep(2)
        log(f"daemon up (pid {daemon.proc.pid}); sending {args.frames} frames at "
            f"{args.rate or 'max'} frames/s, faults: {', '.join(sorted(faults)) or 'none'}")

        # ---- the schedule, by frames sent
        n = args.frames
        at = {"reader1": 0.15, "garbage": 0.25, "reader2": 0.32, "pause": 0.40, "collector": 0.50,
              "restart": 0.60, "diskfull": 0.68, "reader3": 0.82}
        plan: dict[str, int] = {}
        if "reader" in faults:
            plan.update(reader1=int(at["reader1"] * n), reader2=int(at["reader2"] * n), reader3=int(at["reader3"] * n))
        for f in ("garbage", "pause", "collector", "restart", "diskfull"):
            if f in faults:
                plan[f] = int(at[f] * n)
        malformed_every = max(1, n // args.malformed) if "malformed" in faults and args.malformed else 0
        proto = Protocol(args.protocol)
        rng = random.Random(10)
        sent: list[tuple[int, int, int, int]] = []  # (series, frame, source, blob) in send order
        bad_sent: collections.Counter = collections.Counter()
        kills: list[dict] = []
        notes: dict = {}
        done_faults: set[str] = set()
        fault_threads: list[threading.Thread] = []
        sending_done = threading.Event()

        def kill_rank(tag: str, rank: int) -> None:
            pid = daemon.rank_pid(rank)
            if pid is None or pid not in sampler.all_pids():
                kills.append({"what": f"{tag}: rank {rank}", "error": f"no live process of rank {rank} ({pid})"})
                return
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            log(f"{tag}: SIGKILL rank {rank} pid {pid}")
            kills.append({"what": tag, "rank": rank, "pid": pid, "t": t})

        def disk_full_episode() -> None:
            """Stop moving, take what is left of the tmpfs but 64 MB with a filler (other data on that
            disk), wait until the Splitter says full, hold 5 s, then free space: the mover takes the
            completed series to the real disk again and the filler goes."""
            full0 = events.counters.get("disk_full", 0)
            mover.paused.set()
            t0 = time.time()
            st = os.statvfs(out_dir)
            filler_mb = max(0, st.f_bavail * st.f_frsize // (1 << 20) - 64)
            with open(work / "out" / "filler.bin", "wb") as f:
                for _ in range(filler_mb):
                    f.write(b"\0" * (1 << 20))
            log(f"disk-full episode: mover paused, {filler_mb} MB filler on the tmpfs, 64 MB left")
            while events.counters.get("disk_full", 0) <= full0 and not sending_done.is_set():
                time.sleep(0.2)
            t_full = time.time()
            notes["disk_full_after_s"] = round(t_full - t0, 1)
            notes["disk_full_reached"] = events.counters.get("disk_full", 0) > full0
            log(f"disk-full: reached {notes['disk_full_reached']} after {t_full - t0:.1f} s; holding 5 s")
            time.sleep(5)
            (work / "out" / "filler.bin").unlink()
            mover.paused.clear()
            notes["disk_freed_at"] = time.time()
            notes["disk_full_s"] = round(notes["disk_freed_at"] - t_full, 1)
            log("disk-full: space freed (filler gone, completed series moved to the real disk)")

        def do_garbage() -> None:
            g = {}
            g["splitter_router"] = garbage_router(f"tcp://127.0.0.1:{port}", args.garbage, rng)
            g["collector_pull"] = garbage_collector(f"tcp://127.0.0.1:{coll}", args.garbage, rng)
            if not args.no_gui:
                g["gui_http"] = garbage_gui(gui_port, args.garbage, rng)
            notes["garbage"] = g
            log(f"garbage sent: {g}")

        def trigger(count: int) -> None:
            for name, when in plan.items():
                if name in done_faults or count < when or name in ("pause", "restart"):
                    continue
                done_faults.add(name)
                if name.startswith("reader"):
                    rank = {"reader1": 1, "reader2": min(2, args.readers), "reader3": 1}[name]
                    kill_rank(name, rank)
                elif name == "collector":
                    kill_rank("collector", 0)
                else:
                    th = threading.Thread(target=disk_full_episode if name == "diskfull" else do_garbage, daemon=True)
                    th.start()
                    fault_threads.append(th)

        # ---- send
        period = 1.0 / args.rate if args.rate else 0.0
        t_start = time.time()
        next_t = time.monotonic()
        series_id, serial = 0, 0
        bad_n = 0
        while len(sent) < n:
            if "restart" in plan and "restart" not in done_faults and len(sent) >= plan["restart"]:
                done_faults.add("restart")
                notes["restart"] = {"at_frame": len(sent), "t": time.time(), "previous_series": series_id}
                log(f"detector restart: series numbers start from 1 again (after series {series_id})")
                series_id = 0
            series_id += 1
            serial += 1
            src_i = serial % 2  # alternate thaumatin 6M / EIGER 4M series
            src, other = sources[src_i], sources[1 - src_i]
            length = min(n - len(sent), rng.randint(60, 100) if src_i == 0 else rng.randint(120, 200))
            pause_at = None
            if "pause" in plan and "pause" not in done_faults and len(sent) + length > plan["pause"]:
                pause_at = length // 2
                done_faults.add("pause")
            detector.send_multipart(proto.header(series_id, src, length))
            offset = rng.randrange(len(src.blobs))
            for k in range(length):
                if k == pause_at:
                    notes["pause"] = {"series": series_id, "frame": k, "seconds": timeout + 3, "t": time.time()}
                    log(f"detector pause: {timeout + 3} s inside series {series_id} (timeout {timeout} s)")
                    time.sleep(timeout + 3)
                    next_t = time.monotonic()
                b = (offset + k) % len(src.blobs)
                if period:
                    delay = next_t - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_t += period
                detector.send_multipart(proto.frame(series_id, k, src.blobs[b], src), copy=False)
                sent.append((series_id, k, src_i, b))
                trigger(len(sent))
                if malformed_every and len(sent) % malformed_every == 0 and bad_n < args.malformed:
                    kind, msg = proto.malformed(bad_n, series_id, k, src, other, rng)
                    detector.send_multipart(msg)
                    bad_sent[kind] += 1
                    bad_n += 1
                if len(sent) % 1000 == 0:
                    c = events.counters
                    log(f"sent {len(sent)}; Splitter received {c.get('frames_received')}, written "
                        f"{c.get('frames_written')}, forwarded {c.get('frames_forwarded')}, skipped "
                        f"{c.get('frames_skipped')}, malformed {c.get('malformed')}")
            detector.send_multipart(proto.end(series_id))
        t_sent = time.time()
        sending_done.set()
        log(f"sent {len(sent)} frames in {t_sent - t_start:.1f} s ({len(sent) / (t_sent - t_start):.1f} frames/s), "
            f"{bad_n} malformed")
        for th in fault_threads:
            th.join(200)

        # ---- drain: every series written and summed up
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            c = events.counters
            if c.get("frames_received", 0) >= len(sent) and c.get("pending_frames", 1) == 0 and \
                    c.get("queued_bytes", 1) == 0 and len(daemon.find(r"^SERIES ", "out")) >= len(events.ends) > 0:
                break
            time.sleep(0.5)
        time.sleep(2)
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            code = daemon.proc.wait(120)
        except subprocess.TimeoutExpired:
            code = "did not exit in 120 s"
        for th in daemon.threads:
            th.join(10)
        sampler.stop.set()
        sampler.thread.join(5)
        events.stop.set()
        events.thread.join(5)
        mover.stop.set()
        mover.join(10)
        mover.move_ready()
        t_end = time.time()
        notes["exit_code"] = code

        return report(args, sources, sent, bad_sent, kills, notes, daemon, sampler, events, mover, record,
                      moved_dir, out_dir, t_start, t_sent, t_end, logs)
    finally:
        if detector is not None:
            detector.close(linger=0)
        for thing in (events, mover, sampler):
            if thing is not None:
                thing.stop.set()
        if daemon is not None:
            sessions = set(sampler.sessions) if sampler else {daemon.proc.pid}
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
                try:
                    daemon.proc.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            for sid in sessions:  # only the sessions the daemon and its job run in
                try:
                    os.killpg(sid, signal.SIGKILL)
                except OSError:
                    pass
        if mounted:
            for _ in range(10):
                if subprocess.run(["umount", str(work / "out")], capture_output=True).returncode == 0:
                    break
                time.sleep(1)
            else:
                subprocess.run(["umount", "-l", str(work / "out")], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(args, sources, sent, bad_sent, kills, notes, daemon, sampler, events, mover, record, moved_dir,
           out_dir, t_start, t_sent, t_end, logs) -> int:
    problems: list[str] = []
    # ---- on disk: every part of every series, in the order of its repeat suffix
    by_series: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for s, k, src_i, b in sent:
        by_series[s].append((k, src_i, b))
    parts: dict[int, list[str]] = collections.defaultdict(list)
    for name, w in events.written.items():
        parts[w["series"]].append(name)
    on_disk = not_written = 0
    mismatched = 0
    for s, frames in sorted(by_series.items()):
        names = sorted(parts.get(s, []), key=repeat_number)
        pos = 0
        for name in names:
            w = events.written[name]
            fw, nw = w["frames_written"], w.get("not_written", 0)
            master = moved_dir / Path(w["master_file"]).name if w.get("master_file") else None
            got = []
            if fw:
                if master is None or not master.exists():
                    problems.append(f"{name}: master {w.get('master_file')} not found")
                else:
                    try:
                        got = chunks_of(master)
                    except Exception as exc:  # noqa: BLE001  (report any unreadable file)
                        problems.append(f"{name}: cannot read {master.name}: {type(exc).__name__}: {exc}")
            if len(got) != fw:
                problems.append(f"{name}: series_written says {fw} frames written, {len(got)} chunks on disk")
            for i, chunk in enumerate(got):
                if pos + i >= len(frames):
                    problems.append(f"{name}: chunk {i} beyond the {len(frames)} frames sent in series {s}")
                    mismatched += 1
                    break
                k, src_i, b = frames[pos + i]
                if hashlib.md5(chunk).hexdigest() != sources[src_i].md5[b]:
                    mismatched += 1
                    if mismatched <= 5:
                        problems.append(f"{name}: chunk {i} (series {s} frame {k}) differs from the blob sent")
                else:
                    on_disk += 1
            pos += fw + nw
            not_written += nw
        if pos != len(frames):
            problems.append(f"series {s}: parts {names} hold {pos} frames (written + not written), {len(frames)} sent")

    # ---- accounted: the record (results + summaries) and the SERIES lines
    results: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    statuses: collections.Counter = collections.Counter()
    summaries: dict[str, list[dict]] = collections.defaultdict(list)
    result_rows, bad_lines = [], 0
    for line in record.read_text().splitlines() if record.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            bad_lines += 1
            continue
        if "summary" in row:
            summaries[row["summary"]["series_name"]].append(row["summary"])
        elif "frame" in row:
            results[row.get("series_name") or str(row["series"])][row["frame"]] += 1
            statuses[row.get("status")] += 1
            result_rows.append(row)
    accounted = 0
    series_lines = [line for _, line in daemon.out if line.startswith("SERIES ")]
    for name, end in sorted(events.ends.items()):
        received = set(expand(end.get("forwarded_ranges"))) | set(expand(end.get("skipped_ranges")))
        sums = summaries.get(name, [])
        if len(sums) != 1:
            problems.append(f"{name}: {len(sums)} summaries in the record")
            if not sums:
                continue
        s = sums[-1]
        counted = collections.Counter(results.get(name, {}))
        for f in expand(s["skipped_ranges"]) + expand(s["lost_ranges"]):
            counted[f] += 1
        twice = sorted(f for f, c in counted.items() if c > 1)
        missing = sorted(received - set(counted))
        extra = sorted(set(counted) - received)
        if twice or missing or extra:
            how = []
            for f in twice[:3]:
                rows = [(r.get("status"), r.get("rank"), round(r.get("done", 0) - t_start, 1)) for r in result_rows
                        if r.get("series_name") == name and r["frame"] == f]
                how.append(f"frame {f}: results (status, rank, s into the run) {rows}, in skipped_ranges "
                           f"{f in expand(s['skipped_ranges'])}, in lost_ranges {f in expand(s['lost_ranges'])}")
            problems.append(f"{name}: accounted twice {twice[:10]} ({len(twice)}), unaccounted {missing[:10]} "
                            f"({len(missing)}), not received {extra[:10]} ({len(extra)}); " + "; ".join(how))
        total = s["processed"] + s["blank"] + s["skipped"] + s["failed"]
        if total != end["received"] or len(received) != end["received"]:
            problems.append(f"{name}: summary accounts {total}, Splitter received {end['received']}")
        accounted += sum(1 for f in received if counted.get(f) == 1)
    if len(series_lines) != len(events.ends):
        problems.append(f"{len(series_lines)} SERIES lines for {len(events.ends)} series the Splitter ended")
    received_total = sum(e["received"] for e in events.ends.values())
    sum_lines = 0
    line_re = re.compile(r"received (\d+), written (\S+), processed (\d+) .*blank (\d+), skipped (\d+), failed (\d+);")
    for line in series_lines:
        m = line_re.search(line)
        if m:
            _, _, p, b, sk, fa = m.groups()
            sum_lines += int(p) + int(b) + int(sk) + int(fa)
    totals = {"sent": len(sent), "received": received_total, "on_disk": on_disk, "not_written": not_written,
              "accounted_record": accounted, "accounted_series_lines": sum_lines,
              "processed": sum(s[-1]["processed"] for s in summaries.values()),
              "blank": sum(s[-1]["blank"] for s in summaries.values()),
              "skipped": sum(s[-1]["skipped"] for s in summaries.values()),
              "failed": sum(s[-1]["failed"] for s in summaries.values()),
              "lost": sum(s[-1]["lost"] for s in summaries.values()),
              "record_unparsable_lines": bad_lines, "chunks_differing": mismatched}
    if not (totals["sent"] == totals["received"] == on_disk + not_written == accounted == sum_lines):
        problems.append(f"totals differ: {totals}")

    # ---- recovery after each kill
    recov = []
    for k in kills:
        if "t" not in k:
            recov.append(k)
            continue
        t = k["t"]
        after = sorted(r["done"] for r in result_rows if r.get("done", 0) > t
                       and (k["rank"] == 0 or r.get("rank") == k["rank"]))
        item = {"what": k["what"], "rank": k["rank"], "pid": k["pid"],
                "next_result_s": round(after[0] - t, 2) if after else None}
        if k["rank"] == 0:
            noticed = daemon.find(rf"JOB FAILED: the Collector \(rank 0, pid {k['pid']}\)", after=t - 1)
            restarted = daemon.find(r"restarting the MPI job", after=t - 1)
            item["noticed_s"] = round(noticed[0][0] - t, 2) if noticed else None
            item["restart_said_s"] = round(restarted[0][0] - t, 2) if restarted else None
        else:
            died = daemon.find(rf"reader rank {k['rank']} \(pid {k['pid']}.*died", after=t - 1)
            new = daemon.find(rf"reader rank {k['rank']} replaced: pid (\d+)", after=t - 1)
            item["noticed_s"] = round(died[0][0] - t, 2) if died else None
            item["replaced_s"] = round(new[0][0] - t, 2) if new else None
        if item["next_result_s"] is None:
            problems.append(f"{k['what']}: no result after the kill")
        recov.append(item)

    # ---- throughput: results per second in windows of the run
    dones = sorted(r["done"] for r in result_rows if "done" in r)
    first_fault = min([k["t"] for k in kills if "t" in k] + [notes.get("pause", {}).get("t", 1e18)] + [1e18])
    last_t = max([k["t"] for k in kills if "t" in k] + [notes.get("disk_freed_at", 0)] + [0])

    def rate(a: float, b: float) -> float | None:
        n = sum(1 for d in dones if a <= d < b)
        return round(n / (b - a), 1) if b - a > 5 else None

    warm = dones[min(len(dones) - 1, 50)] if dones else t_start
    before = rate(warm, min(first_fault, t_sent))
    after = rate(last_t + 10, t_sent) if last_t else None
    notes["windows"] = {"before": [round(warm - t_start), round(min(first_fault, t_sent) - t_start)],
                        "after": [round(last_t + 10 - t_start), round(t_sent - t_start)] if last_t else None}
    throughput = {"send_rate": round(len(sent) / (t_sent - t_start), 1), "results_before_faults": before,
                  "results_after_faults": after,
                  "splitter_skipped": totals["skipped"]}

    # ---- RSS
    rss = []
    for pid, p in sorted(sampler.procs.items(), key=lambda kv: kv[1]["samples"][0][0]):
        s = p["samples"]
        kb = [v for _, v in s]
        rss.append({"process": p["label"], "pid": pid, "seconds": round(s[-1][0] - s[0][0]),
                    "start_mb": round(kb[0] / 1024), "after_1min_mb": round(next(
                        (v for t, v in s if t >= s[0][0] + 60), kb[-1]) / 1024),
                    "max_mb": round(max(kb) / 1024), "end_mb": round(kb[-1] / 1024)})

    if notes.get("exit_code") != 0:
        problems.append(f"the daemon exited {notes.get('exit_code')} after SIGTERM: "
                        + " | ".join(line for _, line in daemon.err[-3:]))
    c = events.counters
    result = {"totals": totals, "kills": recov, "throughput": throughput, "rss": rss, "notes": notes,
              "malformed_sent": dict(bad_sent), "malformed_counted_by_splitter": c.get("malformed"),
              "splitter_counters": c, "moved_gb": round(mover.bytes / 1e9, 2),
              "wall_s": round(t_end - t_start), "problems": problems,
              "series": len(events.ends), "daemon_exit": notes.get("exit_code"),
              "tracebacks": sum("Traceback" in line for _, line in daemon.err + daemon.out)}
    if record.exists():
        shutil.copy(record, logs / "record.jsonl")
    (logs / "soak-report.json").write_text(json.dumps(result, indent=1, default=str))
    print_report(result)
    return 1 if problems else 0


def print_report(r: dict) -> None:
    t = r["totals"]
    print("\n## Soak report\n")
    print("| frames sent | received by the Splitter | on disk, byte-identical | not written (disk full, reported) "
          "| accounted (record) | accounted (SERIES lines) |")
    print("|---|---|---|---|---|---|")
    print(f"| {t['sent']} | {t['received']} | {t['on_disk']} | {t['not_written']} | {t['accounted_record']} "
          f"| {t['accounted_series_lines']} |")
    print(f"\nprocessed {t['processed']}, blank {t['blank']}, skipped {t['skipped']}, failed {t['failed']} "
          f"(lost with a dead process {t['lost']}); {r['series']} series; "
          f"malformed sent {sum(r['malformed_sent'].values())}, "
          f"counted by the Splitter {r['malformed_counted_by_splitter']}; daemon exit {r['daemon_exit']}; "
          f"tracebacks {r['tracebacks']}; {r['wall_s']} s")
    print("\n| kill | pid | noticed | replaced / restart said | next result from the new process |")
    print("|---|---|---|---|---|")
    for k in r["kills"]:
        if "t" not in k and "error" in k:
            print(f"| {k['what']} | - | {k['error']} | | |")
            continue
        print(f"| {k['what']} (rank {k['rank']}) | {k['pid']} | {k.get('noticed_s')} s | "
              f"{k.get('replaced_s', k.get('restart_said_s'))} s | {k['next_result_s']} s |")
    th = r["throughput"]
    print(f"\nthroughput: sent {th['send_rate']} frames/s; results {th['results_before_faults']} frames/s before the "
          f"faults, {th['results_after_faults']} frames/s after the last")
    print("\n| process | pid | seconds | RSS start MB | after 1 min | max | end |")
    print("|---|---|---|---|---|---|---|")
    for p in r["rss"]:
        if p["seconds"] >= 1:
            print(f"| {p['process']} | {p['pid']} | {p['seconds']} | {p['start_mb']} | {p['after_1min_mb']} | "
                  f"{p['max_mb']} | {p['end_mb']} |")
    print("\nnotes:", json.dumps(r["notes"], default=str))
    print("\nPROBLEMS:" if r["problems"] else "\nno problems found")
    for p in r["problems"]:
        print("  -", p)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("soak: interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
