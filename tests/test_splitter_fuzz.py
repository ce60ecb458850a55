"""Fuzz the running Splitter: thousands of mutated real stream messages over loopback ZeroMQ.

The messages come from the real captures in ../shared/data (stream v1 EIGER2 1M, stream v2 EIGER2
16M and 1M alpha, SSRL cbfToEiger) and are mutated with a seeded random source: bit flips; truncated,
dropped, duplicated, swapped, split, joined or added parts; random bytes appended; JSON and CBOR
values of the wrong shape, type or size, unknown encodings and element types, negative and huge
frame numbers, frames of other series; empty messages, random bytes, other protocols' messages. They
all go to one running Splitter (serving frames to a reader and publishing its accounting meanwhile),
then one clean, complete real series follows. The Splitter must still be running, must have counted
the bad messages, must stop cleanly, and must have written the clean series with the stream's pixels.

INTXR_FUZZ_SEED and INTXR_FUZZ_MESSAGES change the seed and the number of mutated v1 messages (the
other protocols get a third of it each); a failure prints the seed.
"""

from __future__ import annotations

import collections.abc
import glob
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import numpy as np
from test_serve import Listener
from test_splitter import Pusher, capture_messages, data_frames

from intxr.codec import DecodeError, decode
from intxr.reader.source import FrameSource
from intxr.splitter import Splitter
from intxr.testing import free_ports

SEED = int(os.environ.get("INTXR_FUZZ_SEED", "20240611"))
N_MUTATED = int(os.environ.get("INTXR_FUZZ_MESSAGES", "3000"))
V1_SHAPE = (1062, 1028)  # rows, cols of the EIGER2 1M frames (v1 sends [width, height])
V2_SHAPE = (4362, 4148)  # the EIGER2 16M frame of the v2 capture
# Series numbers of the clean series: no mutation below produces them (random series are < 1000).
CLEAN_V1, CLEAN_V2, CLEAN_CBF = 90210, 40404, 31337

# Keys that set how many frames the writer announces in the master file (nimages x ntrigger): kept
# small in the fuzz, see test_huge_nimages_does_not_stall_the_writer for what a huge value does.
FRAME_COUNT_KEYS = {"nimages", "ntrigger", "number_of_images", "ntriggers", "number_of_triggers"}

HUGE = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 1e300, -(2**63), -(10**30)]
BAD_VALUES = [
    None, True, False, "", "x", "71", "\u2603\x00", -1, 0, 1.5, float(2**70), [], [1], [1028, 1062, 1], {}, {"a": [1]},
    "y" * 100_000, [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]], "[" * 300 + "]" * 300, *HUGE,
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
MASTER_FILES = [
    "../../escaped_master.h5", "/abs/elsewhere_master.h5", "", ".", "..", "/", "a/b/", "_master.h5", "x" * 300,
    "sub/dir/name_master.h5", "\x00", "名前_master.h5", 5, None,
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Real messages


def v1_messages(shared_data: Path) -> list[list[bytes]]:
    """The EIGER2 1M capture: series 71 and 72, each a header, 10 frames and an end."""
    messages = capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")
    assert [len(m) for m in messages] == [8, *[4] * 10, 1, 8, *[4] * 10, 1]
    return messages


def v2_final(shared_data: Path) -> dict[str, bytes]:
    folder = shared_data / "stream_v2/eiger2_16m_final"
    return {name: (folder / f"{name}.cbor").read_bytes() for name in ("start", "image", "end")}


def v2_messages(shared_data: Path) -> list[list[bytes]]:
    """The v2 captures, one part each: the 16M start, image and end, and the 1M alpha images (their
    pixels sit where the current format does not look) and ends."""
    alpha = sorted(glob.glob(str(shared_data / "stream_v2/eiger2_1m_alpha/stream2.*")))
    return [[m] for m in v2_final(shared_data).values()] + [[Path(p).read_bytes()] for p in alpha]


def v2_with(message: bytes, series: int | None = None, image: int | None = None) -> bytes:
    """The 16M v2 message with another series_id (uint16) or image_id (< 24), edited in place."""
    if series is not None:
        old = b"\x69series_id\x19\x3c\xfe"  # "series_id": 15614
        assert message.count(old) == 1 and 0 <= series < 65536
        message = message.replace(old, old[:-2] + series.to_bytes(2, "big"))
    if image is not None:
        old = b"\x68image_id\x00"  # "image_id": 0
        assert message.count(old) == 1 and 0 <= image < 24
        message = message.replace(old, old[:-1] + bytes([image]))
    return message


def v2_blob(message: bytes) -> bytes:
    """The bslz4 payload of the 16M image: data.threshold_1 = 40([dims, 69(56500([alg, 2, blob]))])."""
    array = cbor2.loads(message)["data"]["threshold_1"]
    return array.value[1].value.value[2]


def cbf_messages(shared_data: Path) -> list[list[bytes]]:
    """SSRL cbfToEiger frames (six parts, JSON parts ending in NUL) and an end. The capture lacks the
    blob part, so each frame carries a frame of the v1 capture: its dimage_d part and its blob."""
    v1 = v1_messages(shared_data)
    messages = []
    for n in range(1, 6):
        read = (shared_data / "cbftoeiger").joinpath
        header, config, image, _, dconfig = (read(f"zmq_{n:06d}_{p:02d}.zmq").read_bytes() for p in (1, 2, 3, 4, 6))
        messages.append([header, config, image, v1[n][1], v1[n][2], dconfig])
    return [*messages, with_series(v1[11], 1)]


def with_series(message: list[bytes], series: int) -> list[bytes]:
    """A JSON message with `series` changed in every JSON part that has one. The v1 dimage `hash` is
    the MD5 of the dimage_d part, which has no series and is left as it is: the hash still verifies."""
    parts, changed = [], False
    for part in message:
        body = part.rstrip(b"\x00\n")
        obj = None
        if body[:1] == b"{":
            try:
                obj = json.loads(body)
            except ValueError:
                pass
        if isinstance(obj, dict) and "series" in obj:
            obj["series"] = series
            part = json.dumps(obj, separators=(",", ":")).encode() + part[len(body) :]
            changed = True
        parts.append(part)
    if not changed:
        raise ValueError("no series in this message")
    return parts


# ---------------------------------------------------------------------------------------------
# Mutations: each takes the random source and a message (a list of parts) and returns a new one.


def bit_flips(rng, parts):
    nonempty = [i for i, p in enumerate(parts) if p]
    if not nonempty:
        return parts
    i = rng.choice(nonempty)
    part = bytearray(parts[i])
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8, 64])):
        part[rng.randrange(len(part))] ^= 1 << rng.randrange(8)
    return [*parts[:i], bytes(part), *parts[i + 1 :]]


def truncate_part(rng, parts):
    i = rng.randrange(len(parts))
    n = len(parts[i])
    cut = rng.choice([0, 1, n // 2, n - 1, rng.randrange(n + 1)])
    return [*parts[:i], parts[i][: max(cut, 0)], *parts[i + 1 :]]


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


def shuffle_parts(rng, parts):
    parts = list(parts)
    rng.shuffle(parts)
    return parts


def append_bytes(rng, parts):
    i = rng.randrange(len(parts))
    tail = rng.choice(
        [b"\x00", b"\n", b" ", b"}", b"\xff", b"garbage", b'{"a":1}', rng.randbytes(rng.randrange(1, 300))]
    )
    return [*parts[:i], parts[i] + tail, *parts[i + 1 :]]


def add_part(rng, parts):
    extra = rng.choice(
        [b"", b"{}", b"appendix", b'{"htype":"dconfig-1.0"}', b'{"htype":"dimage-1.0"}', b"\xa0", rng.randbytes(100)]
    )
    i = rng.randrange(len(parts) + 1)
    return [*parts[:i], extra, *parts[i:]]


def split_or_join_parts(rng, parts):
    i = rng.randrange(len(parts))
    if i + 1 < len(parts) and rng.random() < 0.5:
        return [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    cut = rng.randrange(len(parts[i]) + 1)
    return [*parts[:i], parts[i][:cut], parts[i][cut:], *parts[i + 1 :]]


def _bad_json_value(rng, key: str, value):
    if key == "shape":
        return rng.choice(BAD_SHAPES)
    if key == "encoding":
        return rng.choice(BAD_ENCODINGS)
    if key == "type":
        return rng.choice(BAD_TYPES)
    if key == "htype":
        return rng.choice(HTYPES)
    if key == "master_file":
        return rng.choice(MASTER_FILES)
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
        return rng.choice([-1, 0, 1, 3, 40, "10", None, 2.5, [], True])
    return rng.choice(BAD_VALUES)


def json_value(rng, parts):
    """Change, remove or add one value of one JSON part."""
    candidates = [i for i, p in enumerate(parts) if p[:1] == b"{"]
    if not candidates:
        return bit_flips(rng, parts)
    i = rng.choice(candidates)
    body = parts[i].rstrip(b"\x00\n")
    try:
        obj = json.loads(body)
    except ValueError:
        return bit_flips(rng, parts)
    if not isinstance(obj, dict):
        return bit_flips(rng, parts)
    action = rng.random()
    if action < 0.1 and obj:
        del obj[rng.choice(sorted(obj))]
    elif action < 0.2:
        obj[rng.choice(["unknown", "appendix", "htype", "shape", "series", "master_file"])] = rng.choice(BAD_VALUES)
    elif obj:
        key = rng.choice(sorted(obj))
        obj[key] = _bad_json_value(rng, key, obj[key])
    text = json.dumps(obj, separators=(",", ":")).encode() + parts[i][len(body) :]
    return [*parts[:i], text, *parts[i + 1 :]]


def other_series(rng, parts):
    """A frame, header or end for another series (never a clean series)."""
    try:
        return with_series(parts, rng.choice([rng.randrange(1000), 1, 71, 72, -1, 0]))
    except ValueError:
        return json_value(rng, parts)


def pixel_mask(rng, parts):
    """A v1 header whose pixel mask (sent empty by this detector) gets a shape, a type and a blob."""
    if len(parts) < 8 or b"dpixelmask" not in parts[4]:
        return json_value(rng, parts)
    shape, dtype = rng.choice([([1028, 1062], "uint32"), ([2, 2], "uint32"), ([1028, 1062], "uint8"),
                               ([1028, 1062], "float32"), ([4], "uint16"), ([1028, 1062], "uint32")])  # fmt: skip
    need = int(np.prod(shape)) * {"uint32": 4, "uint8": 1, "float32": 4, "uint16": 2}[dtype]
    size = rng.choice([need, need, need - 1, 0])
    blob = (rng.randbytes(64) * (size // 64 + 1))[:size]
    head = json.dumps({"htype": "dpixelmask-1.0", "shape": shape, "type": dtype}).encode()
    return [*parts[:4], head, blob, *parts[6:]]


def _plain(value):
    """cbor2's decoded value with mutable maps and lists."""
    if isinstance(value, collections.abc.Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, _plain(value.value))
    return value


def _bad_cbor_array(rng, array):
    """The tag-40 image array 40([[rows, cols], 69(56500(["bslz4", 2, blob]))]) made wrong."""
    try:
        dims, typed = array.value
        inner = typed.value
    except (AttributeError, TypeError, ValueError):  # already mutated out of shape
        return rng.choice(BAD_VALUES)
    payload = inner.value if isinstance(inner, cbor2.CBORTag) else None
    if not (isinstance(payload, list) and len(payload) == 3 and isinstance(payload[2], bytes) and payload[2]):
        payload = None  # not 56500([algorithm, size, bytes]) (any more)
    choice = rng.randrange(9)
    if choice == 0:
        dims = rng.choice([[], [4362], [0, 4148], [4148, 4362], [4362, 4148, 1], [2**32, 2**32], [2**63, 2], [-1, 4148],
                           ["4362", 4148], [4362.0, 4148], [1, 1], [2**64 + 1, 1]])  # fmt: skip
    elif choice == 1:
        typed = cbor2.CBORTag(rng.choice([64, 65, 66, 68, 70, 71, 72, 77, 85, 0, 40, 56500]), inner)
    elif choice == 2 and payload is not None:
        payload[0] = rng.choice(["lz4", "zstd", "", "BSLZ4", 5, None, b"bslz4"])
    elif choice == 3 and payload is not None:
        payload[1] = rng.choice([1, 4, 0, -2, 2**64, "2", None, 2.0])
    elif choice == 4 and payload is not None:
        blob = payload[2]
        payload[2] = rng.choice([blob[: rng.randrange(len(blob))], b"", blob[:12], "text", [blob], None, blob + blob])
    elif choice == 5 and payload is not None:
        typed = cbor2.CBORTag(typed.tag, payload[2])  # raw, uncompressed: wrong size
    elif choice == 6:
        return rng.choice([None, [], {}, b"raw", cbor2.CBORTag(40, [dims]), cbor2.CBORTag(40, None), [dims, typed]])
    elif choice == 7 and payload is not None:
        typed = cbor2.CBORTag(typed.tag, cbor2.CBORTag(56500, payload[: rng.randrange(3)]))
    else:
        array = cbor2.CBORTag(rng.choice([40, 41, 1040, 55799]), [dims, typed])
        return array
    return cbor2.CBORTag(40, [dims, typed])


def cbor_value(rng, parts):
    """Decode one CBOR part, change one value (the image array in particular), encode it again."""
    i = rng.randrange(len(parts))
    try:
        message = _plain(cbor2.loads(parts[i]))
    except Exception:  # cbor2 raises many kinds on garbage
        return bit_flips(rng, parts)
    if not isinstance(message, dict):
        return bit_flips(rng, parts)
    key = rng.choice([*sorted(message, key=str), "data", "data", "type", "series_id", "image_id"])
    if key == "data" and isinstance(message.get("data"), dict) and message["data"]:
        data = message["data"]
        channel = rng.choice(sorted(data, key=str))
        action = rng.random()
        if action < 0.7:
            data[channel] = _bad_cbor_array(rng, data[channel])
        elif action < 0.8:
            data[rng.choice([5, b"bytes", None, "threshold_2"])] = data.pop(channel)
        elif action < 0.9:
            data.clear()
        else:
            message["data"] = rng.choice([None, [], "data", [data], 0])
    elif key == "type":
        message["type"] = rng.choice(["start", "image", "end", "foo", "", "IMAGE", 5, None, b"image"])
    elif key in ("series_id", "image_id", "series_number", "image_number"):
        message[key] = rng.choice(
            [rng.randrange(1000), -1, -(2**63), 2**63, 2**64, 2**70, "1", None, 1.5, 3.0, -(2**70)]
        )
    elif key in FRAME_COUNT_KEYS:
        message[key] = rng.choice([-1, 0, 1, 3, 40, "10", None, 2.5, []])
    elif rng.random() < 0.2:
        message.pop(key, None)
    else:
        message[key] = rng.choice([*BAD_VALUES, b"\x00" * 8, cbor2.CBORTag(55799, None), cbor2.undefined])
    try:
        encoded = cbor2.dumps(message)
    except Exception:
        return bit_flips(rng, parts)
    if rng.random() < 0.5:
        encoded = b"\xd9\xd9\xf7" + encoded  # the self-describe tag, as the detector sends it
    return [*parts[:i], encoded, *parts[i + 1 :]]


PART_MUTATIONS = [
    (bit_flips, 6), (truncate_part, 4), (drop_part, 3), (duplicate_part, 2), (swap_parts, 2), (append_bytes, 3),
    (add_part, 2), (split_or_join_parts, 2), (shuffle_parts, 1),
]  # fmt: skip
JSON_MUTATIONS = [*PART_MUTATIONS, (json_value, 12), (other_series, 3), (pixel_mask, 1)]
CBOR_MUTATIONS = [*PART_MUTATIONS, (cbor_value, 16)]


def mutate(rng: random.Random, parts: list[bytes], mutations) -> list[bytes]:
    functions, weights = zip(*mutations, strict=True)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        parts = rng.choices(functions, weights)[0](rng, parts)
    return parts or [b""]


def fuzz_stream(rng, real, foreign, n: int, mutations, merge: bool = True) -> list[list[bytes]]:
    stream = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:  # empty and nearly empty messages (ZeroMQ cannot send a message of no parts)
            stream.append(rng.choice([[b""], [b"", b""], [b"{}"], [b"null"], [b"[]"], [b"\x00"], [b"{"], [b"\xd9"]]))
        elif roll < 0.06:  # random bytes
            stream.append([rng.randbytes(rng.randrange(1, 2000)) for _ in range(rng.randrange(1, 6))])
        elif roll < 0.10:  # another protocol's real message, mutated or not
            message = list(rng.choice(foreign))
            stream.append(mutate(rng, message, PART_MUTATIONS) if rng.random() < 0.5 else message)
        elif roll < 0.14 and merge:  # two real messages in one (legal in v1 and v2), maybe mutated
            merged = [*rng.choice(real), *rng.choice(real)]
            stream.append(mutate(rng, merged, mutations) if rng.random() < 0.7 else merged)
        elif roll < 0.24:  # an unchanged real message: keeps series open for mutated frames to land in
            stream.append(list(rng.choice(real)))
        else:
            stream.append(mutate(rng, list(rng.choice(real)), mutations))
    return stream


# ---------------------------------------------------------------------------------------------
# The run


def quiet_endpoints(n: int) -> list[str]:
    return [f"tcp://127.0.0.1:{port}" for port in free_ports(n)]


class Reader(threading.Thread):
    """Asks the Splitter for frames until stopped; keeps the clean series' pixels and decodes the
    frames whose blob is not a real one (a mutated blob must give pixels or a DecodeError)."""

    def __init__(self, endpoint: str, clean_series: int, shape: tuple[int, int], real_blobs: set[bytes]):
        super().__init__(daemon=True)
        self.endpoint, self.clean_series, self.shape, self.real_blobs = endpoint, clean_series, shape, real_blobs
        self.halt = threading.Event()
        self.frames = self.decoded = self.refused = 0
        self.clean: dict[int, np.ndarray] = {}
        self.error: BaseException | None = None

    def run(self):
        try:
            with FrameSource(self.endpoint, timeout=5) as source:
                while not self.halt.is_set():
                    frame = source.next_frame(wait=0.2)
                    if frame is None:
                        continue
                    self.frames += 1
                    if frame.series == self.clean_series:
                        self.clean[frame.frame] = frame.pixels()
                    elif frame.shape == self.shape and bytes(frame.blob) not in self.real_blobs:
                        try:
                            frame.pixels()
                            self.decoded += 1
                        except DecodeError:
                            self.refused += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


@dataclass
class Run:
    counters: dict
    reader: Reader
    published: list[tuple[str, dict]]
    seconds: float
    summary: dict = field(default_factory=dict)


def run_splitter(tmp_path, stream, *, protocol, clean_series, master, shape, real_blobs, n_clean, **kwargs) -> Run:
    """Push `stream` to a running Splitter that serves and publishes; wait for `master` (the clean
    series at the end of the stream) to be written and for the reader to have its frames; stop."""
    serve, publish = quiet_endpoints(2)
    pusher = Pusher()
    started = time.monotonic()
    splitter = Splitter(
        pusher.endpoint, tmp_path, protocol=protocol, series_timeout=5, serve=serve, publish=publish,
        skip_after=20, heartbeat=0.5, frames_per_file=2, **kwargs,
    ).start()  # fmt: skip
    listener = Listener(publish)
    halt = threading.Event()

    def listen():
        while not halt.is_set():
            listener.poll(0.1)

    listening = threading.Thread(target=listen, daemon=True)
    listening.start()
    reader = Reader(serve, clean_series, shape, real_blobs)
    reader.start()
    try:
        sender = pusher.send(stream)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counters = splitter.counters()
            if str(master) in counters["files"] or not splitter.running:
                break
            time.sleep(0.05)
        sender.join(10)
        assert splitter.running, f"seed {SEED}: the splitter stopped: {counters}"
        while len(reader.clean) < n_clean and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        splitter.stop()
        joined = splitter.join(20)
        halt.set()
        reader.halt.set()
        reader.join(10)
        listening.join(10)
        listener.sock.close(linger=0)
    counters = splitter.counters()
    run = Run(counters, reader, listener.messages, time.monotonic() - started)
    run.summary = {k: v for k, v in counters.items() if k != "files"} | {"files": len(counters["files"])}
    print(
        f"\n{protocol}, seed {SEED}: {len(stream)} messages in {run.seconds:.1f} s; reader: {reader.frames} frames, "
        f"{reader.decoded} mutated blobs decoded, {reader.refused} refused; counters {run.summary}"
    )
    assert joined and not splitter.running, f"seed {SEED}: the splitter did not stop: {run.summary}"
    assert reader.error is None, f"seed {SEED}: the reader failed: {reader.error!r}"
    assert str(master) in counters["files"], f"seed {SEED}: the clean series was not written: {run.summary}"
    # Every message was taken in; the bad ones were counted and nothing was fatal.
    assert counters["messages"] == len(stream), run.summary
    assert counters["malformed"] > 0 and "panick" not in counters["last_error"], run.summary
    assert all(Path(f).parent == tmp_path for f in counters["files"]), counters["files"]
    return run


def check_clean_series(run: Run, master: Path, clean_series: int, expected: list[np.ndarray]) -> None:
    """The clean series: every frame on disk, in order, with the stream's pixels; the same pixels
    served to the reader; its files announced to listeners."""
    on_disk = data_frames(master)
    assert on_disk.shape == (len(expected), *expected[0].shape), run.summary
    for k, pixels in enumerate(expected):
        assert np.array_equal(on_disk[k], pixels), f"seed {SEED}: frame {k} of the clean series differs on disk"
    name = master.name.removesuffix("_master.h5")
    written = {"series": clean_series, "series_name": name, "frames_written": len(expected),
               "master_file": str(master), "not_written": 0, "write_error": None}  # fmt: skip
    assert written in [body for topic, body in run.published if topic == "series_written"]
    served = [run.reader.clean[k] for k in sorted(run.reader.clean)]
    assert len(served) == len(expected), f"seed {SEED}: the reader got frames {sorted(run.reader.clean)}"
    for k, (got, pixels) in enumerate(zip(served, expected, strict=True)):
        assert np.array_equal(got, pixels), f"seed {SEED}: served frame {k} of the clean series differs"


def test_v1_fuzzed_messages_then_a_clean_series(tmp_path, shared_data):
    rng = random.Random(SEED)
    real = v1_messages(shared_data)
    foreign = v2_messages(shared_data) + cbf_messages(shared_data)
    fuzz = fuzz_stream(rng, real, foreign, N_MUTATED, JSON_MUTATIONS)
    clean = [with_series(m, CLEAN_V1) for m in real[:12]]  # header, 10 frames, end of series 71
    # The first message is a real v1 header: it fixes the protocol ("auto"), as a detector's would.
    stream = [real[0], *fuzz, *clean]
    expected = [decode(m[2], "lz4<", np.uint32, V1_SHAPE) for m in real[1:11]]
    master = tmp_path / f"series_{CLEAN_V1:06d}_master.h5"
    real_blobs = {m[2] for m in real if len(m) == 4}
    run = run_splitter(tmp_path, stream, protocol="auto", clean_series=CLEAN_V1, master=master, shape=V1_SHAPE,
                       real_blobs=real_blobs, n_clean=len(expected))  # fmt: skip
    c = run.counters
    assert c["malformed"] > len(fuzz) // 4, run.summary
    assert c["md5_mismatches"] > 0 and c["frames_written"] > len(expected), run.summary
    assert c["series_started"] > 2 and c["series_ended"] > 1, run.summary
    check_clean_series(run, master, CLEAN_V1, expected)


def test_v2_fuzzed_messages_then_a_clean_series(tmp_path, shared_data):
    rng = random.Random(SEED + 2)
    final = v2_final(shared_data)
    real = v2_messages(shared_data)
    # The 16M image is what the current format's frames look like: mutate it most.
    sources = [*real, *[[final["image"]]] * 6, *[[v2_with(final["image"], image=k)] for k in range(1, 4)]]
    foreign = v1_messages(shared_data)[:13] + cbf_messages(shared_data)
    fuzz = fuzz_stream(rng, sources, foreign, max(N_MUTATED // 3, 100), CBOR_MUTATIONS)
    n_clean = 3
    clean = [
        [v2_with(final["start"], series=CLEAN_V2)],
        *[[v2_with(final["image"], series=CLEAN_V2, image=k)] for k in range(n_clean)],
        [v2_with(final["end"], series=CLEAN_V2)],
    ]
    pixels = decode(v2_blob(final["image"]), "bslz4", np.uint16, V2_SHAPE)
    master = tmp_path / f"series_{CLEAN_V2:06d}_master.h5"
    run = run_splitter(tmp_path, fuzz + clean, protocol="v2", clean_series=CLEAN_V2, master=master, shape=V2_SHAPE,
                       real_blobs={v2_blob(final["image"])}, n_clean=n_clean)  # fmt: skip
    c = run.counters
    assert c["malformed"] > len(fuzz) // 4 and c["frames_written"] > n_clean, run.summary
    check_clean_series(run, master, CLEAN_V2, [pixels] * n_clean)


def test_cbftoeiger_fuzzed_messages_then_a_clean_series(tmp_path, shared_data):
    rng = random.Random(SEED + 3)
    real = cbf_messages(shared_data)
    foreign = v1_messages(shared_data)[:13] + v2_messages(shared_data)[:5]
    fuzz = fuzz_stream(rng, real, foreign, max(N_MUTATED // 3, 100), JSON_MUTATIONS, merge=False)
    clean = [with_series(m, CLEAN_CBF) for m in real]
    name = f"fuzz_clean_{CLEAN_CBF}"
    for message in clean[:-1]:  # the clean series names its files (no mutation writes this name)
        header = json.loads(message[0].rstrip(b"\x00"))
        header["master_file"] = f"/beamline/data/{name}_master.h5"
        message[0] = json.dumps(header).encode() + b"\x00"
    expected = [decode(m[4], "lz4<", np.uint32, V1_SHAPE) for m in real[:-1]]
    master = tmp_path / f"{name}_master.h5"
    run = run_splitter(tmp_path, fuzz + clean, protocol="cbftoeiger", clean_series=CLEAN_CBF, master=master,
                       shape=V1_SHAPE, real_blobs={m[4] for m in real[:-1]}, n_clean=len(expected),
                       filepath_key="master_file")  # fmt: skip
    c = run.counters
    assert c["malformed"] > len(fuzz) // 4 and c["frames_written"] > len(expected), run.summary
    check_clean_series(run, master, CLEAN_CBF, expected)


# ---------------------------------------------------------------------------------------------
# A Splitter bug the fuzz finds when FRAME_COUNT_KEYS may be huge (kept out of the fuzz above)

HUGE_NIMAGES_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_splitter import Pusher, capture_messages
from test_splitter_fuzz import with_series
from pathlib import Path
from intxr.splitter import Splitter

messages = capture_messages(Path(sys.argv[2]) / "stream_v1/eiger2_1m_lz4")
header = list(messages[0])
config = json.loads(header[1])
config["nimages"] = 10**15
header[1] = json.dumps(config).encode()
clean = [with_series(m, 90210) for m in messages[:12]]
pusher = Pusher()
with Splitter(pusher.endpoint, sys.argv[3], max_series=2) as splitter:
    pusher.send([header, messages[1], messages[11], *clean])
    splitter.join()
print(json.dumps(splitter.counters()))
"""


def test_huge_nimages_does_not_stall_the_writer(tmp_path, shared_data):
    """A header announcing 10^15 frames once made the writer build links and angles for all of them."""
    # In a child process: the stalled writer cannot be stopped from here.
    child = subprocess.Popen(
        [sys.executable, "-c", HUGE_NIMAGES_SCRIPT, str(Path(__file__).parent), str(shared_data), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = child.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        out = ""
    assert child.returncode == 0, "the Splitter did not finish two short series in 5 s"
    counters = json.loads(out)
    assert counters["series_ended"] == 2 and counters["frames_written"] == 11
    assert len(data_frames(tmp_path / "series_090210_master.h5")) == 10
