"""Read detector stream messages (DECTRIS stream v1, v2, SSRL cbfToEiger-0.1) into events.

`parse_message(parts)` turns one ZeroMQ multipart message into a list of events (a v1 sender may
merge a header and its first frame into one multipart, so parts are read by htype, not by count).
Bad input raises `StreamError` naming the part and what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import cbor2
import numpy as np

PROTOCOLS = ("v1", "v2", "cbftoeiger")
_TYPED_ARRAY_DTYPES = {64: "uint8", 69: "<u2", 70: "<u4", 85: "<f4"}


class StreamError(ValueError):
    """A message that cannot be read; the text names the part and the problem."""


@dataclass
class SeriesStart:
    protocol: str
    series: int
    header: dict  # dheader / cbfToEiger part / v2 start without its large arrays
    config: dict  # detector configuration (v1 config part; v2 start message)
    arrays: dict = field(default_factory=dict)  # e.g. pixel_mask, flatfield (numpy) when sent


@dataclass
class FrameMessage:
    protocol: str
    series: int
    frame: int  # as the detector numbers it (v1/v2 from 0, cbfToEiger from 1)
    shape: tuple[int, int]  # (rows, columns)
    dtype: np.dtype
    encoding: str  # v1 encoding string, or v2 algorithm (bslz4, lz4)
    blob: object  # bytes-like; zero-copy zmq.Frame buffer where the caller gave one
    header: dict = field(default_factory=dict)  # cbfToEiger: the header part resent with the frame
    hash: str | None = None
    hash_of: bytes | None = None  # the bytes the v1 hash covers (the dimage_d part)
    times: dict = field(default_factory=dict)


@dataclass
class SeriesEnd:
    protocol: str
    series: int


def _bytes(part) -> memoryview:
    if hasattr(part, "buffer"):  # zmq.Frame
        return part.buffer
    return memoryview(part)


def _json_part(part, where: str) -> dict:
    raw = bytes(_bytes(part))
    text = raw.rstrip(b"\x00\n\r ")  # real parts end in nothing, '\n' or a NUL byte
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamError(f"{where}: not JSON ({exc}): {raw[:60]!r}") from None
    if not isinstance(value, dict):
        raise StreamError(f"{where}: JSON part is not an object")
    return value


def _htype(part) -> str | None:
    view = _bytes(part)
    if view.nbytes == 0 or view[0] != ord("{") or view.nbytes > 1 << 20:
        return None
    try:
        return _json_part(part, "part").get("htype")
    except StreamError:
        return None


def detect_protocol(parts) -> str:
    """v2 messages are CBOR (self-describe tag d9d9f7 or a map); v1 and cbfToEiger are JSON by htype."""
    first = _bytes(parts[0])
    if first.nbytes >= 3 and bytes(first[:3]) == b"\xd9\xd9\xf7":
        return "v2"
    if first.nbytes and first[0] != ord("{") and 0xA0 <= first[0] <= 0xBF:
        return "v2"
    htype = _htype(parts[0]) or ""
    if htype.startswith("cbfToEiger"):
        return "cbftoeiger"
    if htype.startswith(("dheader", "dimage", "dseries_end", "dconfig")):
        return "v1"
    raise StreamError(
        f"part 0: cannot tell the protocol (htype {htype!r}, first byte {first[:1].hex() if first.nbytes else 'none'})"
    )


def _shape_dtype(d: dict, where: str) -> tuple[tuple[int, int], np.dtype]:
    try:
        width, height = (int(v) for v in d["shape"])  # v1 shape is [width, height]
        dtype = np.dtype(d["type"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StreamError(f"{where}: bad shape/type ({exc})") from None
    if dtype.kind not in "ui" or width <= 0 or height <= 0:
        raise StreamError(f"{where}: unsupported pixel type {d.get('type')!r} or shape {d.get('shape')!r}")
    return (height, width), dtype


def parse_v1(parts) -> list:
    events = []
    i = 0
    n = len(parts)
    while i < n:
        where = f"part {i}"
        header = _json_part(parts[i], where)
        htype = str(header.get("htype", ""))
        if htype.startswith("dheader"):
            detail = header.get("header_detail", "none")
            config = _json_part(parts[i + 1], f"part {i + 1} (config)") if detail != "none" and i + 1 < n else {}
            i += 2 if detail != "none" else 1
            arrays = {}
            # header_detail all: flatfield / pixel mask / count-rate table, each a header + blob pair
            while i + 1 < n and (_htype(parts[i]) or "").startswith(
                ("dflatfield", "flatfield", "dpixelmask", "dcountrate")
            ):
                h = _json_part(parts[i], f"part {i}")
                blob = _bytes(parts[i + 1])
                name = h["htype"].lstrip("d").split("-")[0]
                if h.get("shape") and h.get("type") not in (None, "undefined") and blob.nbytes:
                    try:
                        shape = [int(v) for v in h["shape"]][::-1]
                        arrays[name] = np.frombuffer(blob, dtype=np.dtype(h["type"]).newbyteorder("<")).reshape(shape)
                    except (TypeError, ValueError) as exc:
                        raise StreamError(f"part {i + 1} ({name}): blob does not match {h} ({exc})") from None
                i += 2
            if i == n - 1 and _htype(parts[i]) is None:
                i += 1  # header appendix: one last non-JSON-htype part
            events.append(SeriesStart("v1", int(header.get("series", -1)), header, config, arrays))
        elif htype.startswith("dimage") and not htype.startswith("dimage_d"):
            if i + 2 >= n:
                raise StreamError(f"{where}: image message truncated ({n - i} parts, need 4)")
            d = _json_part(parts[i + 1], f"part {i + 1} (dimage_d)")
            shape, dtype = _shape_dtype(d, f"part {i + 1} (dimage_d)")
            blob = _bytes(parts[i + 2])
            if "size" in d and int(d["size"]) != blob.nbytes:
                raise StreamError(f"part {i + 2} (blob): {blob.nbytes} bytes, dimage_d says {d['size']}")
            times = {}
            step = 3
            if i + 3 < n and (_htype(parts[i + 3]) or "").startswith("dconfig"):
                times = _json_part(parts[i + 3], f"part {i + 3} (dconfig)")
                step = 4
            events.append(
                FrameMessage(
                    "v1",
                    int(header.get("series", -1)),
                    int(header.get("frame", -1)),
                    shape,
                    dtype,
                    str(d.get("encoding", "")),
                    blob,
                    header,
                    header.get("hash"),
                    bytes(_bytes(parts[i + 1])),
                    times,
                )
            )
            i += step
            if i < n and _htype(parts[i]) is None:
                i += 1  # image appendix
        elif htype.startswith("dseries_end"):
            events.append(SeriesEnd("v1", int(header.get("series", -1))))
            i += 1
        else:
            raise StreamError(f"{where}: unexpected htype {htype!r}")
    return events


def parse_cbftoeiger(parts) -> list:
    header = _json_part(parts[0], "part 0 (cbfToEiger header)")
    htype = str(header.get("htype", ""))
    if htype.startswith("dseries_end"):
        return [SeriesEnd("cbftoeiger", int(header.get("series", -1)))]
    if len(parts) < 6:
        raise StreamError(f"cbfToEiger message has {len(parts)} parts, expected 6")
    config = _json_part(parts[1], "part 1 (config)")
    image = _json_part(parts[2], "part 2 (dimage)")
    d = _json_part(parts[3], "part 3 (dimage_d)")
    shape, dtype = _shape_dtype(d, "part 3 (dimage_d)")
    blob = _bytes(parts[4])
    if "size" in d and int(d["size"]) != blob.nbytes:
        raise StreamError(f"part 4 (blob): {blob.nbytes} bytes, dimage_d says {d['size']}")
    series = int(image.get("series", header.get("series", -1)))
    frame = FrameMessage(
        "cbftoeiger",
        series,
        int(image.get("frame", -1)),
        shape,
        dtype,
        str(d.get("encoding", "")),
        blob,
        header,
        times=_json_part(parts[5], "part 5 (dconfig)"),
    )
    return [SeriesStart("cbftoeiger", series, header, config), frame]


def _untag(value):
    """CBOR tags this module knows become plain values: tag 40 arrays -> ('array', shape, dtype, payload)."""
    if isinstance(value, cbor2.CBORTag):
        if value.tag == 40:
            dims, typed = value.value
            if not isinstance(typed, cbor2.CBORTag) or typed.tag not in _TYPED_ARRAY_DTYPES:
                raise StreamError(f"tag 40 array with unsupported element type {getattr(typed, 'tag', type(typed))}")
            dtype = np.dtype(_TYPED_ARRAY_DTYPES[typed.tag])
            payload = typed.value
            if isinstance(payload, cbor2.CBORTag) and payload.tag == 56500:
                algorithm, _elem, blob = payload.value
                return {"shape": tuple(int(v) for v in dims), "dtype": dtype, "encoding": str(algorithm), "blob": blob}
            return {"shape": tuple(int(v) for v in dims), "dtype": dtype, "encoding": "none", "blob": payload}
        if value.tag == 55799:
            return _untag(value.value)
        return _untag(value.value)
    if isinstance(value, Mapping):  # cbor2 >= 6 gives frozendicts and tuples
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_untag(v) for v in value]
    return value


def parse_v2(parts) -> list:
    events = []
    for k, part in enumerate(parts):
        try:
            message = cbor2.loads(bytes(_bytes(part)))
        except Exception as exc:  # cbor2 raises several types for malformed input
            raise StreamError(f"part {k}: not CBOR ({exc})") from None
        message = _untag(message)
        if not isinstance(message, dict) or "type" not in message:
            raise StreamError(f"part {k}: CBOR message without a type")
        kind = message["type"]
        series = int(message.get("series_id", message.get("series_number", -1)))
        if kind == "start":
            arrays = {}
            for name in ("pixel_mask", "flatfield"):
                for channel, arr in (message.get(name) or {}).items():
                    if isinstance(arr, dict) and arr.get("encoding") == "none":
                        arrays[f"{name}:{channel}"] = np.frombuffer(arr["blob"], arr["dtype"]).reshape(arr["shape"])
            header = {
                k2: v
                for k2, v in message.items()
                if k2 not in ("pixel_mask", "flatfield", "countrate_correction_lookup_table")
            }
            events.append(SeriesStart("v2", series, header, header, arrays))
        elif kind == "image":
            data = message.get("data")
            if not isinstance(data, dict) or not data:
                raise StreamError(f"part {k}: image message without data channels")
            channel, arr = next(iter(data.items()))
            if not isinstance(arr, dict):
                raise StreamError(f"part {k}: channel {channel!r} is not a tag-40 array")
            times = {t: message[t] for t in ("start_time", "stop_time", "real_time") if t in message}
            events.append(
                FrameMessage(
                    "v2",
                    series,
                    int(message.get("image_id", -1)),
                    arr["shape"],
                    arr["dtype"],
                    arr["encoding"],
                    arr["blob"],
                    {"channel": channel, "channels": list(data)},
                    times=times,
                )
            )
        elif kind == "end":
            events.append(SeriesEnd("v2", series))
        else:
            raise StreamError(f"part {k}: unknown v2 message type {kind!r}")
    return events


def parse_message(parts, protocol: str = "auto") -> list:
    if not parts:
        raise StreamError("empty message")
    if protocol == "auto":
        protocol = detect_protocol(parts)
    if protocol == "v1":
        return parse_v1(parts)
    if protocol == "v2":
        return parse_v2(parts)
    if protocol == "cbftoeiger":
        return parse_cbftoeiger(parts)
    raise StreamError(f"unknown protocol {protocol!r}: expected auto, {', '.join(PROTOCOLS)}")
