"""Fuzz the running Splitter: thousands of mutated real stream messages over loopback ZeroMQ.

Every mutated message comes from a real capture (the EIGER2 1M stream v1 capture, plus the stream v2
and cbfToEiger captures as foreign messages): bit flips, truncated, dropped, duplicated, swapped or
added parts, random bytes, JSON values of the wrong shape, type or size, unknown encodings, frames of
other series, empty messages. They all go to one Splitter (serving frames to a reader and publishing
its accounting meanwhile); then one clean, complete real series follows. The Splitter must still be
running, must have counted the bad messages, and must have written the clean series exactly.
"""

from __future__ import annotations

import glob
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import numpy as np
from test_serve import Listener
from test_splitter import Pusher, capture_messages, data_frames

from intxr.codec import DecodeError, decode
from intxr.reader.source import FrameSource
from intxr.splitter import Splitter

SEED = int(os.environ.get("INTXR_FUZZ_SEED", "20240611"))
N_MUTATED = int(os.environ.get("INTXR_FUZZ_MESSAGES", "3000"))
CLEAN_SERIES = 90210  # no mutation below can produce this series number
SHAPE = (1062, 1028)  # rows, cols of the EIGER2 1M frames (v1 sends [width, height])

# Keys whose size the writer trusts for the master file (nimages x ntrigger frames): kept small here,
# see test_huge_nimages_does_not_stall_the_writer for what a huge value does.
FRAME_COUNT_KEYS = {"nimages", "ntrigger", "number_of_images", "ntriggers", "number_of_triggers"}

HUGE = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 1e300, -(2**63), -(10**30)]
BAD_VALUES = [
    None, True, False, "", "x", "71", "\u2603\x00", -1, 0, 1.5, float(2**70), [], [1], [1028, 1062, 1], {}, {"a": [1]},
    "y" * 100_000, [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]], *HUGE,
]  # fmt: skip
BAD_SHAPES = [
    [], [1028], [0, 1062], [1028, 0], [-1028, 1062], [1062, 1028], [1028, 1062, 1], [1, 1], [1028.0, 1062.0],
    [1028.5, 1062], ["1028", "1062"], "1028x1062", None, {"w": 1028}, [10**6, 10**6], [2**31, 2], [2**33, 1],
    [2**32, 2**32], [2**62, 4], [-(2**63), 1], [2**64, 1], [514, 2124],
]  # fmt: skip
BAD_ENCODINGS = [
    "zstd", "", "bs64-lz4<", "bs32-lz4<", "bs16-lz4<", "bs8-lz4<", "bs-lz4<", "bs32x-lz4<", "<", "none", "lz4", "bslz4",
    "LZ4<", "lz4<\x00", 4, None, ["lz4<"],
]  # fmt: skip
BAD_TYPES = ["float32", "float64", "uint64", "int8", "uint8", "uint16", "int16", "int32", "", "undefined", None, 32]
HTYPES = [
    "dheader-1.0", "dimage-1.0", "dimage_d-1.0", "dseries_end-1.0", "dconfig-1.0", "dpixelmask-1.0", "dflatfield-1.0",
    "flatfield-1.0", "dcountrate_table-1.0", "dfoo-1.0", "cbfToEiger-0.1", "", None, 7,
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Real messages


def v1_messages(shared_data: Path) -> list[list[bytes]]:
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")
    assert [len(m) for m in messages] == [8, *[4] * 10, 1, 8, *[4] * 10, 1]
    return messages


def foreign_messages(shared_data: Path) -> list[list[bytes]]:
    """Real messages of the other protocols: v2 (one CBOR part each) and cbfToEiger (six parts; the
    capture lacks the blob part, so the v1 capture's dimage_d and blob stand in for it)."""
    v2 = [[Path(p).read_bytes()] for p in sorted(glob.glob(str(shared_data / "stream_v2/eiger2_1m_alpha/stream2.*")))]
    final = shared_data / "stream_v2/eiger2_16m_final"
    v2 += [[(final / name).read_bytes()] for name in ("start.cbor", "end.cbor")]
    v1 = v1_messages(shared_data)
    cbf = []
    for n in range(1, 6):
        read = (shared_data / "cbftoeiger").joinpath
        header, config, image, d, dconfig = (read(f"zmq_{n:06d}_{p:02d}.zmq").read_bytes() for p in (1, 2, 3, 4, 6))
        cbf.append([header, config, image, d, b"\x00" * 64, dconfig])
        cbf.append([header, config, image, v1[n][1], v1[n][2], dconfig])
    return v2 + cbf


def with_series(message: list[bytes], series: int) -> list[bytes]:
    """A v1 message with its JSON `series` changed. The dimage `hash` is the MD5 of the dimage_d
    part, which is left as it is, so the hash still verifies."""
    first = json.loads(message[0])
    assert "series" in first
    first["series"] = series
    return [json.dumps(first, separators=(",", ":")).encode(), *message[1:]]


# ---------------------------------------------------------------------------------------------
# Mutations: each takes the random source and a message (a list of parts) and returns a new one.


def _pick(rng: random.Random, parts: list[bytes], nonempty: bool = True) -> int | None:
    choices = [i for i, p in enumerate(parts) if p or not nonempty]
    return rng.choice(choices) if choices else None


def bit_flips(rng, parts):
    i = _pick(rng, parts)
    if i is None:
        return parts
    part = bytearray(parts[i])
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8, 64])):
        part[rng.randrange(len(part))] ^= 1 << rng.randrange(8)
    return [*parts[:i], bytes(part), *parts[i + 1 :]]


def truncate_part(rng, parts):
    i = _pick(rng, parts)
    if i is None:
        return parts
    cut = rng.choice([0, 1, len(parts[i]) // 2, len(parts[i]) - 1, rng.randrange(len(parts[i]))])
    return [*parts[:i], parts[i][:cut], *parts[i + 1 :]]


def drop_part(rng, parts):
    i = rng.randrange(len(parts))
    return parts[:i] + parts[i + 1 :] or [b""]


def duplicate_part(rng, parts):
    i = rng.randrange(len(parts))
    return [*parts[: i + 1], parts[i], *parts[i + 1 :]]


def swap_parts(rng, parts):
    if len(parts) < 2:
        return [*parts, *parts]
    i, j = rng.sample(range(len(parts)), 2)
    parts = list(parts)
    parts[i], parts[j] = parts[j], parts[i]
    return parts


def append_bytes(rng, parts):
    i = rng.randrange(len(parts))
    tail = rng.choice([b"\x00", b"\n", b" ", b"}", b"garbage", b'{"a":1}', rng.randbytes(rng.randrange(1, 300))])
    return [*parts[:i], parts[i] + tail, *parts[i + 1 :]]


def add_part(rng, parts):
    extra = rng.choice(
        [b"", b"{}", b"appendix", b'{"htype":"dconfig-1.0"}', b'{"htype":"dimage-1.0"}', rng.randbytes(100)]
    )
    i = rng.randrange(len(parts) + 1)
    return [*parts[:i], extra, *parts[i:]]


def split_or_join_parts(rng, parts):
    i = rng.randrange(len(parts))
    if len(parts) > 1 and rng.random() < 0.5 and i + 1 < len(parts):
        return [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    cut = rng.randrange(len(parts[i]) + 1)
    return [*parts[:i], parts[i][:cut], parts[i][cut:], *parts[i + 1 :]]


def shuffle_parts(rng, parts):
    parts = list(parts)
    rng.shuffle(parts)
    return parts


def _bad_value(rng, key: str, value):
    if key == "shape":
        return rng.choice(BAD_SHAPES)
    if key == "encoding":
        return rng.choice(BAD_ENCODINGS)
    if key == "type":
        return rng.choice(BAD_TYPES)
    if key == "htype":
        return rng.choice(HTYPES)
    if key == "series":
        return rng.choice([rng.randrange(1000), rng.randrange(1000), -1, 0, "71", None, 71.0, 71.5, 2**63 - 1, 2**64])
    if key == "frame":
        return rng.choice([rng.randrange(-5, 50), -1, -(2**63), 2**63 - 1, 2**63, 10**6, "0", None, 1.5, 3.0])
    if key == "size" and isinstance(value, int):
        return rng.choice([value + 1, value - 1, 0, -1, -value, 2**63 - 1, 2**64, 1e30, float(value), str(value)])
    if key == "hash":
        return rng.choice(["", "0" * 32, "z" * 32, "TODO-MD5-HASH", str(value).upper(), None, 5])
    if key == "header_detail":
        return rng.choice(["none", "basic", "all", "", 3, None])
    if key in FRAME_COUNT_KEYS:
        return rng.choice([-1, 0, 1, 3, 99, "10", None, 2.5, [], True])
    return rng.choice(BAD_VALUES)


def json_value(rng, parts):
    """Change, remove or add one value of one JSON part."""
    candidates = [i for i, p in enumerate(parts) if p[:1] == b"{"]
    if not candidates:
        return bit_flips(rng, parts)
    i = rng.choice(candidates)
    try:
        obj = json.loads(parts[i].rstrip(b"\x00\n"))
    except ValueError:
        return bit_flips(rng, parts)
    action = rng.random()
    if action < 0.1 and obj:
        del obj[rng.choice(sorted(obj))]
    elif action < 0.2:
        obj[rng.choice(["unknown", "appendix", "htype", "shape", "series"])] = rng.choice(BAD_VALUES)
    elif obj:
        key = rng.choice(sorted(obj))
        obj[key] = _bad_value(rng, key, obj[key])
    return [*parts[:i], json.dumps(obj, separators=(",", ":")).encode(), *parts[i + 1 :]]


def other_series(rng, parts):
    """A frame, header or end for another series (never CLEAN_SERIES)."""
    try:
        return with_series(parts, rng.choice([rng.randrange(1000), 71, 72, -1, 0]))
    except (ValueError, AssertionError):
        return parts


def pixel_mask(rng, parts):
    """A v1 header whose pixel mask (sent empty by this detector) gets a shape, a type and a blob."""
    if len(parts) != 8:
        return json_value(rng, parts)
    shape, dtype = rng.choice([([1028, 1062], "uint32"), ([2, 2], "uint32"), ([1028, 1062], "uint8"),
                               ([1028, 1062], "float32"), ([4], "uint16"), ([1028, 1062], "uint32")])  # fmt: skip
    need = int(np.prod(shape)) * {"uint32": 4, "uint8": 1, "float32": 4, "uint16": 2}[dtype]
    size = rng.choice([need, need, need - 1, 0])
    blob = (rng.randbytes(64) * (size // 64 + 1))[:size]
    head = json.dumps({"htype": "dpixelmask-1.0", "shape": shape, "type": dtype}).encode()
    return [*parts[:4], head, blob, *parts[6:]]


MUTATIONS = [
    (bit_flips, 6), (truncate_part, 4), (drop_part, 3), (duplicate_part, 2), (swap_parts, 2), (append_bytes, 3),
    (add_part, 2), (split_or_join_parts, 2), (shuffle_parts, 1), (json_value, 12), (other_series, 3), (pixel_mask, 1),
]  # fmt: skip


def mutate(rng: random.Random, parts: list[bytes]) -> list[bytes]:
    functions, weights = zip(*MUTATIONS, strict=True)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        parts = rng.choices(functions, weights)[0](rng, parts)
    return parts or [b""]


def fuzz_stream(rng: random.Random, real: list[list[bytes]], foreign: list[list[bytes]], n: int) -> list[list[bytes]]:
    stream = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:  # empty and nearly empty messages (ZeroMQ cannot send a message of no parts)
            stream.append(rng.choice([[b""], [b"", b""], [b"{}"], [b"null"], [b"[]"], [b"\x00"], [b"{"], [b"\xd9"]]))
        elif roll < 0.06:  # random bytes
            stream.append([rng.randbytes(rng.randrange(1, 2000)) for _ in range(rng.randrange(1, 6))])
        elif roll < 0.10:  # another protocol's real message, mutated or not
            message = list(rng.choice(foreign))
            stream.append(mutate(rng, message) if rng.random() < 0.5 else message)
        elif roll < 0.14:  # two real messages merged into one (legal in v1), then maybe mutated
            merged = [*rng.choice(real), *rng.choice(real)]
            stream.append(mutate(rng, merged) if rng.random() < 0.7 else merged)
        elif roll < 0.24:  # an unchanged real message: keeps series open for mutated frames to land in
            stream.append(rng.choice(real))
        else:
            stream.append(mutate(rng, list(rng.choice(real))))
    return stream


# ---------------------------------------------------------------------------------------------
# The run


def quiet_endpoints(n: int) -> list[str]:
    """`n` free loopback ports outside the kernel's ephemeral range, for the Splitter to bind. A port
    the kernel handed out (bound to port 0, then closed) is often handed out again at once as the
    source port of the next connect (the Splitter's own PULL connecting to the Pusher included), and
    the Splitter's bind then fails with "Address already in use"."""
    low, high = 32768, 60999
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        pass
    candidates = [*range(high + 1, 65536), *range(max(1024, low - 10_000), low)]
    endpoints = []
    for port in random.SystemRandom().sample(candidates, 100):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        endpoints.append(f"tcp://127.0.0.1:{port}")
        if len(endpoints) == n:
            return endpoints
    raise AssertionError("no free ports outside the ephemeral range")


class Reader(threading.Thread):
    """Asks the Splitter for frames until stopped; decodes the ones whose blob is not a clean one
    (mutated blobs must give a DecodeError or pixels, nothing worse) and keeps the clean series'."""

    def __init__(self, endpoint: str, clean_blobs: set[bytes]):
        super().__init__(daemon=True)
        self.endpoint, self.clean_blobs = endpoint, clean_blobs
        self.stop = threading.Event()
        self.frames = self.decoded = self.decode_errors = 0
        self.clean: dict[int, np.ndarray] = {}
        self.error: BaseException | None = None

    def run(self):
        try:
            self.serve()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def serve(self):
        with FrameSource(self.endpoint, timeout=5) as source:
            while not self.stop.is_set():
                frame = source.next_frame(wait=0.2)
                if frame is None:
                    continue
                self.frames += 1
                if frame.series == CLEAN_SERIES:
                    self.clean[frame.frame] = frame.pixels()
                elif frame.shape == SHAPE and bytes(frame.blob) not in self.clean_blobs:
                    try:
                        frame.pixels()
                        self.decoded += 1
                    except DecodeError:
                        self.decode_errors += 1


def test_fuzzed_messages_then_a_clean_series(tmp_path, shared_data):
    rng = random.Random(SEED)
    real = v1_messages(shared_data)
    foreign = foreign_messages(shared_data)
    fuzz = fuzz_stream(rng, real, foreign, N_MUTATED)
    header, frames, end = real[0], real[1:11], real[11]
    clean = [with_series(m, CLEAN_SERIES) for m in (header, *frames, end)]
    # The first message is a real v1 header: it fixes the protocol ("auto"), as a detector's would.
    stream = [real[0], *fuzz, *clean]
    blobs = [m[2] for m in frames]
    expected = [decode(blob, "lz4<", np.uint32, SHAPE) for blob in blobs]

    serve, publish = quiet_endpoints(2)
    pusher = Pusher()
    started = time.monotonic()
    splitter = Splitter(
        pusher.endpoint, tmp_path, protocol="auto", series_timeout=5, serve=serve, publish=publish,
        skip_after=20, heartbeat=0.5, frames_per_file=4,
    ).start()  # fmt: skip
    listener = Listener(publish)
    listening = threading.Event()

    def listen():
        while not listening.is_set():
            listener.poll(0.1)

    listen_thread = threading.Thread(target=listen, daemon=True)
    listen_thread.start()
    reader = Reader(serve, {m[2] for m in real if len(m) == 4})
    reader.start()
    master = tmp_path / f"series_{CLEAN_SERIES:06d}_master.h5"
    try:
        sender = pusher.send(stream)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counters = splitter.counters()
            if str(master) in counters["files"] or not splitter.running:
                break
            time.sleep(0.05)
        sender.join(10)
        assert splitter.running, f"the splitter stopped: {counters}"
        counters = splitter.counters()
        assert str(master) in counters["files"], f"the clean series was not written in 60 s: {counters}"
        while len(reader.clean) < len(frames) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        splitter.stop()
        joined = splitter.join(20)
        reader.stop.set()
        listening.set()
        reader.join(10)
        listen_thread.join(10)
    elapsed = time.monotonic() - started
    counters = splitter.counters()
    summary = {k: v for k, v in counters.items() if k != "files"} | {"files": len(counters["files"])}
    print(f"\nseed {SEED}: {len(stream)} messages in {elapsed:.1f} s; reader {reader.frames} frames, "
          f"{reader.decoded} mutated blobs decoded, {reader.decode_errors} refused; counters {summary}")  # fmt: skip
    assert joined, "the splitter did not stop"
    assert not splitter.running

    # Every message was taken in, the bad ones counted, and the mutated but readable ones written.
    assert counters["messages"] == len(stream), summary
    assert counters["malformed"] > len(fuzz) // 4, summary
    assert counters["md5_mismatches"] > 0 and counters["frames_written"] > len(frames), summary
    assert counters["series_started"] > 2 and counters["series_ended"] > 1, summary
    assert "panick" not in counters["last_error"], summary

    # The clean series: all ten frames on disk, in order, with the stream's pixels.
    on_disk = data_frames(master)
    assert on_disk.shape == (len(frames), *SHAPE)
    for k, pixels in enumerate(expected):
        assert np.array_equal(on_disk[k], pixels), f"frame {k} of the clean series differs"
    written = [body for topic, body in listener.messages if topic == "series_written"]
    assert {"series": CLEAN_SERIES, "frames_written": len(frames), "master_file": str(master)} in written

    # The reader got the clean frames with the same pixels, and the other blobs did not crash it.
    assert reader.error is None, repr(reader.error)
    assert sorted(reader.clean) == list(range(len(frames)))
    for k, pixels in enumerate(expected):
        assert np.array_equal(reader.clean[k], pixels)
