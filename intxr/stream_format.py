"""The detector stream's message formats, built from frames: DECTRIS stream v1 (multipart JSON + blob),
DECTRIS stream v2 (CBOR) and SSRL's `cbfToEiger-0.1`. No sockets here (see `simulate.py`).

Byte-level conventions, checked against the real captures in `../shared/data` (tests compare them):
- v1 (EIGER2 firmware 2020.2): compact JSON, keys sorted, no terminator, floats in the shortest
  round-trip digits laid out as Rust's ryu does (`0.000075`, `1e-7`, `1.0`); image `shape` is
  [width, height]; `hash` in dimage-1.0 is the MD5 hex digest of the dimage_d-1.0 part's bytes
  (what the firmware sends: checked on all captured frames); frames count from 0.
- v2: tag 55799 around a definite map, `type` first; arrays as RFC 8746 tag 40 [[rows, cols], typed
  array], typed-array tags 64/69/70 (uint8/16/32 LE) around the DECTRIS tag 56500
  [algorithm, element size, bytes]; times as [numerator, denominator] seconds.
- cbfToEiger-0.1: six parts per image (header, config, dimage, dimage_d, blob, dconfig), JSON sorted
  and compact with `%.15g` floats (`.0` added when integral), booleans as 0/1, each part NUL-terminated;
  frames count from 1.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import time

import cbor2
import numpy as np

from intxr import __version__
from intxr.geometry import Geometry

# --------------------------------------------------------------------------------------------
# JSON dialects


def ryu_float(x: float) -> str:
    """Format a float as serde_json/ryu do: shortest round-trip digits, fixed notation for
    1e-5 <= |x| < 1e16 (with `.0` when integral), else `1e-7` / `1.5e-7` style."""
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{x} has no JSON form")
    if x == 0:
        return "-0.0" if str(x).startswith("-") else "0.0"
    r = repr(abs(x))
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:e([+-]\d+))?", r)
    assert m is not None, r
    int_part, frac_part, exp = m.group(1), m.group(2) or "", int(m.group(3) or 0)
    all_digits = int_part + frac_part
    leading = len(all_digits) - len(all_digits.lstrip("0"))
    digits = all_digits.lstrip("0").rstrip("0")
    kk = len(int_part) + exp - leading  # 10^(kk-1) <= |x| < 10^kk
    n = len(digits)
    if 0 <= kk - n and kk <= 16:
        s = digits + "0" * (kk - n) + ".0"
    elif 0 < kk <= 16:
        s = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        s = "0." + "0" * (-kk) + digits
    elif n == 1:
        s = f"{digits}e{kk - 1}"
    else:
        s = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return ("-" if x < 0 else "") + s


def _cbftoeiger_float(x: float) -> str:
    s = f"{x:.15g}"
    return s if ("." in s or "e" in s or "n" in s) else s + ".0"


def _json(value, float_format, bool_as_int: bool) -> str:
    if isinstance(value, bool):
        return str(int(value)) if bool_as_int else ("true" if value else "false")
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return float_format(float(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_json(v, float_format, bool_as_int) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(json.dumps(k) + ":" + _json(v, float_format, bool_as_int) for k, v in items) + "}"
    if value is None:
        return "null"
    raise TypeError(f"no JSON form for {type(value).__name__}")


def dumps_v1(obj: dict) -> bytes:
    """A DECTRIS stream v1 JSON part as EIGER2 firmware writes it."""
    return _json(obj, ryu_float, bool_as_int=False).encode()


def dumps_cbftoeiger(obj: dict) -> bytes:
    """A cbfToEiger-0.1 JSON part as SSRL's Splitter writes it (NUL-terminated)."""
    return _json(obj, _cbftoeiger_float, bool_as_int=True).encode() + b"\x00"


# --------------------------------------------------------------------------------------------
# Detector configuration, from an image's geometry


def collection_date(now: float | None = None) -> str:
    """ISO 8601 with milliseconds and the local UTC offset, as the detector writes it."""
    t = _dt.datetime.fromtimestamp(time.time() if now is None else now).astimezone()
    return t.isoformat(timespec="milliseconds")


def detector_config(
    geometry: Geometry,
    shape: tuple[int, int],
    dtype: np.dtype,
    *,
    nimages: int,
    ntrigger: int = 1,
    algorithm: str = "bslz4",
    date: str | None = None,
) -> dict:
    """The detector configuration part (dheader-1.0 config, header_detail basic/all): the keys of
    EIGER2 firmware 2020.2, lengths in metres, beam centre in pixels. A value the geometry lacks is left
    out, as from a detector that did not send it."""
    height, width = shape
    h = geometry.header_values()
    frame_time = h["frame_time"] or h["count_time"]
    config = {
        "auto_summation": True,
        "beam_center_x": h["beam_center_x"],
        "beam_center_y": h["beam_center_y"],
        "bit_depth_image": int(np.dtype(dtype).itemsize * 8),
        "bit_depth_readout": 16,
        "chi_increment": 0.0,
        "chi_start": 0.0,
        "compression": algorithm,
        "count_time": h["count_time"],
        "countrate_correction_applied": True,
        "countrate_correction_count_cutoff": int(h["count_cutoff"] if h["count_cutoff"] is not None else 2**31 - 1),
        "data_collection_date": date or collection_date(),
        "description": h["description"],
        "detector_distance": _mm_to_m(h["distance"]),
        "detector_number": h["detector_number"],
        "detector_readout_time": 1e-7,
        "detector_translation": _translation(h),
        "eiger_fw_version": f"intxr-simulate-{__version__}",
        "element": "",
        "flatfield_correction_applied": True,
        "frame_count_time": frame_time,
        "frame_period": frame_time,
        "frame_time": frame_time,
        "kappa_increment": 0.0,
        "kappa_start": 0.0,
        "nimages": int(nimages),
        "ntrigger": int(ntrigger),
        "omega_increment": float(h["omega_increment"]),
        "omega_start": float(h["omega_start"]),
        "phi_increment": 0.0,
        "phi_start": 0.0,
        "photon_energy": h["energy_ev"],
        "pixel_mask_applied": True,
        "roi_mode": "",
        "sensor_material": h["sensor_material"],
        "sensor_thickness": h["sensor_thickness"] / 1000.0,
        "software_version": "1.8.0",
        "trigger_mode": "ints",
        "two_theta_increment": 0.0,
        "two_theta_start": float(h["two_theta"]),
        "virtual_pixel_correction_applied": True,
        "wavelength": h["wavelength"],
        "x_pixel_size": _mm_to_m(h["pixel_size_x"]),
        "x_pixels_in_detector": int(width),
        "y_pixel_size": _mm_to_m(h["pixel_size_y"]),
        "y_pixels_in_detector": int(height),
    }
    return {k: v for k, v in config.items() if v is not None}


def _mm_to_m(value: float | None) -> float | None:
    return None if value is None else float(value) / 1000.0


def _translation(h: dict) -> list[float] | None:
    """EIGER's detector_translation (m) with the signs a real EIGER2 16M v2 start message has
    (data/stream_v2/eiger2_16m_final: [+bx px, +by py, -distance]; the DLS v1 header: [0, 0, -0.337])."""
    if None in (h["beam_center_x"], h["pixel_size_x"], h["distance"]):
        return None
    return [h["beam_center_x"] * h["pixel_size_x"] / 1000.0, h["beam_center_y"] * h["pixel_size_y"] / 1000.0,
            -h["distance"] / 1000.0]


def pixel_mask_of(frame: np.ndarray) -> np.ndarray:
    """DECTRIS pixel mask (uint32, bit 0 gap, bit 1 dead) from the values a frame marks:
    2^bits-1 (or -1) for gaps, 2^bits-2 (or -2, PILATUS bad pixels) for dead pixels."""
    info = np.iinfo(frame.dtype)
    top = info.max if info.min == 0 else -1
    dead = info.max - 1 if info.min == 0 else -2
    mask = np.zeros(frame.shape, dtype=np.uint32)
    mask[frame == top] = 1
    mask[frame == dead] = 2
    return mask


# --------------------------------------------------------------------------------------------
# DECTRIS stream v1


def v1_header(
    series: int, header_detail: str, config: dict, pixel_mask: np.ndarray | None = None, extra: dict | None = None
) -> list[bytes]:
    """dheader-1.0 message: 1 part (none), 2 (basic), 8 (all: + flatfield, pixel mask, count-rate table)."""
    if header_detail not in ("none", "basic", "all"):
        raise ValueError(f"header_detail {header_detail!r}: expected none, basic or all")
    parts = [dumps_v1({"header_detail": header_detail, "htype": "dheader-1.0", "series": series, **(extra or {})})]
    if header_detail == "none":
        return parts
    parts.append(dumps_v1(config))
    if header_detail == "all":
        width, height = config["x_pixels_in_detector"], config["y_pixels_in_detector"]
        flatfield = np.ones((height, width), dtype="<f4")
        mask = pixel_mask if pixel_mask is not None else np.zeros((height, width), dtype="<u4")
        # Count-rate table: rows of [true rate, measured rate] for a paralyzable dead time of 100 ns.
        true_rate = np.linspace(0, 1.0e7, 1001, dtype=np.float64)
        table = np.stack([true_rate, true_rate * np.exp(-true_rate * 1e-7)], axis=1).astype("<f4")
        for htype, array, shape in (
            ("dflatfield-1.0", flatfield, [width, height]),
            ("dpixelmask-1.0", mask.astype("<u4"), [width, height]),
            ("dcountrate_table-1.0", table, [2, 1001]),
        ):
            parts.append(dumps_v1({"htype": htype, "shape": shape, "type": str(array.dtype.newbyteorder("="))}))
            parts.append(array.tobytes())
    return parts


def v1_image(
    series: int,
    frame: int,
    blob: bytes,
    encoding: str,
    shape: tuple[int, int],
    dtype,
    start_time_ns: int,
    real_time_ns: int,
    extra: dict | None = None,
) -> list[bytes]:
    """dimage-1.0, dimage_d-1.0, blob, dconfig-1.0 (frame counts from 0)."""
    height, width = shape
    dimage_d = dumps_v1(
        {
            "encoding": encoding,
            "htype": "dimage_d-1.0",
            "shape": [width, height],
            "size": len(blob),
            "type": np.dtype(dtype).name,
        }
    )
    dimage = dumps_v1(
        {
            "frame": frame,
            "hash": hashlib.md5(dimage_d).hexdigest(),
            "htype": "dimage-1.0",
            "series": series,
            **(extra or {}),
        }
    )
    dconfig = dumps_v1(
        {
            "htype": "dconfig-1.0",
            "real_time": real_time_ns,
            "start_time": start_time_ns,
            "stop_time": start_time_ns + real_time_ns,
        }
    )
    return [dimage, dimage_d, blob, dconfig]


def v1_end(series: int) -> list[bytes]:
    return [dumps_v1({"htype": "dseries_end-1.0", "series": series})]


# --------------------------------------------------------------------------------------------
# DECTRIS stream v2 (CBOR)

_TYPED_ARRAY_TAG = {np.dtype("uint8"): 64, np.dtype("uint16"): 69, np.dtype("uint32"): 70, np.dtype("float32"): 85}
TIME_DENOMINATOR = 50_000_000  # the detector clock's tick, as in the captured v2 messages


def _rational(seconds: float) -> list[int]:
    return [int(round(seconds * TIME_DENOMINATOR)), TIME_DENOMINATOR]


def _tag40(array: np.ndarray, payload) -> cbor2.CBORTag:
    """RFC 8746 row-major array: [[rows, cols], typed array]; `payload` is raw bytes or a 56500 tag."""
    return cbor2.CBORTag(40, [list(array.shape), cbor2.CBORTag(_TYPED_ARRAY_TAG[np.dtype(array.dtype)], payload)])


def v2_compressed_array(shape: tuple[int, int], dtype, blob: bytes, algorithm: str) -> cbor2.CBORTag:
    dtype = np.dtype(dtype)
    modifier = dtype.itemsize if algorithm == "bslz4" else 0
    payload = cbor2.CBORTag(56500, [algorithm, modifier, blob])
    return cbor2.CBORTag(40, [list(shape), cbor2.CBORTag(_TYPED_ARRAY_TAG[dtype], payload)])


def _ulid() -> str:
    """A ULID (48-bit ms time + 80 random bits, Crockford base 32), as the detector names a series."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def _cbor(message: dict) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, message))


def v2_start(
    series_id: int,
    unique_id: str,
    geometry: Geometry,
    shape: tuple[int, int],
    dtype,
    *,
    nimages: int,
    channels: list[str],
    pixel_mask: np.ndarray | None,
    arm_date: str,
    user_data: dict | None = None,
) -> bytes:
    height, width = shape
    h = geometry.header_values()
    mask = pixel_mask if pixel_mask is not None else np.zeros(shape, dtype=np.uint32)
    energy = h["energy_ev"]
    message = {
        "type": "start",
        "series_id": series_id,
        "series_unique_id": unique_id,
        "arm_date": cbor2.CBORTag(0, arm_date),
        "beam_center_x": h["beam_center_x"],
        "beam_center_y": h["beam_center_y"],
        "channels": channels,
        "count_time": h["count_time"],
        "countrate_correction_enabled": True,
        "detector_description": h["description"],
        "detector_serial_number": h["detector_number"],
        "detector_translation": _translation(h),
        "flatfield": {c: _tag40(np.ones(shape, "<f4"), np.ones(shape, "<f4").tobytes()) for c in channels},
        "flatfield_enabled": True,
        "frame_time": h["frame_time"] or h["count_time"],
        "goniometer": {
            "chi": {"increment": 0.0, "start": 0.0},
            "omega": {"increment": float(h["omega_increment"]), "start": float(h["omega_start"])},
            "phi": {"increment": 0.0, "start": 0.0},
            "two_theta": {"increment": 0.0, "start": float(h["two_theta"])},
        },
        "image_size_x": int(width),
        "image_size_y": int(height),
        "incident_energy": energy,
        "incident_wavelength": h["wavelength"],
        "number_of_images": int(nimages),
        "pixel_mask": {c: _tag40(mask.astype("<u4"), mask.astype("<u4").tobytes()) for c in channels},
        "pixel_mask_enabled": True,
        "pixel_size_x": _mm_to_m(h["pixel_size_x"]),
        "pixel_size_y": _mm_to_m(h["pixel_size_y"]),
        "saturation_value": int(h["count_cutoff"] if h["count_cutoff"] is not None
                                else np.iinfo(np.dtype(dtype)).max - 2),
        "sensor_material": h["sensor_material"],
        "sensor_thickness": h["sensor_thickness"] / 1000.0,
        "threshold_energy": {c: energy / 2 for c in channels} if energy is not None else None,
        "virtual_pixel_interpolation_enabled": True,
    }
    message = {k: v for k, v in message.items() if v is not None}
    if user_data:
        message["user_data"] = user_data
    return _cbor(message)


def v2_image(
    series_id: int,
    unique_id: str,
    image_id: int,
    channels: dict[str, cbor2.CBORTag],
    *,
    series_date: str,
    start_s: float,
    exposure_s: float,
    user_data: dict | None = None,
) -> bytes:
    message = {
        "type": "image",
        "series_id": series_id,
        "series_unique_id": unique_id,
        "image_id": image_id,
        "real_time": _rational(exposure_s),
        "series_date": cbor2.CBORTag(0, series_date),
        "start_time": _rational(start_s),
        "stop_time": _rational(start_s + exposure_s),
    }
    if user_data:
        message["user_data"] = user_data
    message["data"] = channels
    return _cbor(message)


def v2_end(series_id: int, unique_id: str) -> bytes:
    return _cbor({"type": "end", "series_id": series_id, "series_unique_id": unique_id})


# --------------------------------------------------------------------------------------------
# SSRL cbfToEiger-0.1


def cbftoeiger_config(config: dict) -> dict:
    """The config part as SSRL's Splitter sends it: the v1 config with its own software version."""
    return {**config, "software_version": "SSRL cbf2Eiger 0.1"}


def cbftoeiger_image(
    series: int,
    frame: int,
    blob: bytes,
    encoding: str,
    shape: tuple[int, int],
    dtype,
    config_part: bytes,
    keys: dict[str, str],
) -> list[bytes]:
    """Six parts; the two header parts are resent with every frame (frame counts from 1)."""
    height, width = shape
    header = {
        "header_detail": "basic",
        "htype": "cbfToEiger-0.1",
        "series": series,
        "mapping": "",
        "master_file": "",
        "reporting": "",
        **keys,
    }
    return [
        dumps_cbftoeiger(header),
        config_part,
        dumps_cbftoeiger({"frame": frame, "hash": "TODO-MD5-HASH", "htype": "dimage-1.0", "series": series}),
        dumps_cbftoeiger(
            {
                "encoding": encoding,
                "htype": "dimage_d-1.0",
                "shape": [width, height],
                "size": len(blob),
                "type": np.dtype(dtype).name,
            }
        ),
        blob,
        dumps_cbftoeiger({"htype": "dconfig-1.0", "real_time": 0, "start_time": 0, "stop_time": 0}),
    ]


def cbftoeiger_end(series: int) -> list[bytes]:
    return [dumps_cbftoeiger({"htype": "dseries_end-1.0", "series": series})]
