"""The one stream parser (the Splitter's, in Rust) as Python sees it through `intxr.stream`: the real
captures of every protocol in ../shared/data, the pixel types, and malformed messages."""

from __future__ import annotations

import hashlib
import json

import cbor2
import numpy as np
import pytest
import zmq

from intxr import codec
from intxr.stream import (
    FrameMessage,
    SeriesConfig,
    SeriesEnd,
    SeriesStart,
    StreamError,
    StreamParser,
    detect_protocol,
    parse_message,
)


def v1_capture_messages(shared_data) -> list[list[bytes]]:
    from test_splitter import capture_messages  # the EIGER2 1M capture grouped into messages

    return capture_messages(shared_data / "stream_v1/eiger2_1m_lz4")


def cbf_messages(shared_data) -> list[list[bytes]]:
    """SSRL's five cbfToEiger messages; the blob (part 05, not in the capture) made of zeros of the
    declared size."""
    out = []
    for n in range(1, 6):
        parts = [(shared_data / f"cbftoeiger/zmq_{n:06d}_{p:02d}.zmq").read_bytes() for p in (1, 2, 3, 4, 6)]
        size = json.loads(parts[3].rstrip(b"\0 \n"))["size"]
        parts.insert(4, bytes(size))
        out.append(parts)
    return out


def v1_image(pixels: np.ndarray, type_name: str | None = None, encoding: str = "lz4<", series=1, frame=0):
    blob = codec.encode(pixels, encoding)
    rows, cols = pixels.shape
    d = {"htype": "dimage_d-1.0", "shape": [cols, rows], "type": type_name or pixels.dtype.name,
         "encoding": encoding, "size": len(blob)}
    return [json.dumps({"htype": "dimage-1.0", "series": series, "frame": frame}).encode(),
            json.dumps(d).encode(), blob, b'{"htype":"dconfig-1.0"}']


def v2_message(kind: str, **fields) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, {"type": kind, "series_id": 7, **fields}))


def v2_image(rows: int, cols: int, typed_tag: int, payload) -> bytes:
    array = cbor2.CBORTag(40, [[rows, cols], cbor2.CBORTag(typed_tag, payload)])
    return v2_message("image", image_id=3, data={"threshold_1": array})


# --- real captures ------------------------------------------------------------------------------------


def test_v1_eiger2_capture_two_series(shared_data):
    parser = StreamParser()
    events = [e for msg in v1_capture_messages(shared_data) for e in parser.parse(msg)]
    assert parser.protocol == "v1"
    starts = [e for e in events if isinstance(e, SeriesStart)]
    ends = [e for e in events if isinstance(e, SeriesEnd)]
    frames = [e for e in events if isinstance(e, FrameMessage)]
    assert [s.series for s in starts] == [71, 72] and [e.series for e in ends] == [71, 72]
    assert starts[0].header["header_detail"] == "all" and starts[0].config["x_pixels_in_detector"] == 1028
    assert starts[0].config["wavelength"] == 1.5418000685586377
    assert [(f.series, f.frame) for f in frames] == [(s, k) for s in (71, 72) for k in range(10)]
    for f in frames:
        assert (f.shape, f.dtype, f.encoding, f.codec) == ((1062, 1028), np.uint32, "lz4<", "lz4<")
        assert f.md5_ok is True  # the hash is the MD5 of the dimage_d part, checked in Rust
    pixels = frames[0].pixels()
    assert pixels.shape == (1062, 1028) and pixels.dtype == np.uint32
    assert np.array_equal(pixels, codec.decode(frames[0].blob, "lz4<", np.uint32, (1062, 1028)))


def test_v1_dls_16m_capture(shared_data):
    msgpack = pytest.importorskip("msgpack")
    folder = shared_data / "stream_v1/dls_eiger2_16m_roi4m"

    def message(name):  # a msgpack list of parts, the first one already a dict; blanked blobs are ""
        parts = msgpack.unpackb((folder / name).read_bytes(), raw=False)
        return [json.dumps(p).encode() if isinstance(p, dict) else (p.encode() if isinstance(p, str) else p)
                for p in parts]

    parser = StreamParser()
    [start] = parser.parse(message("header"))
    assert isinstance(start, SeriesStart) and start.series == 2619 and start.pixel_mask is None
    assert start.config["x_pixels_in_detector"] == 2068
    [frame] = parser.parse(message("image000044"))
    assert (frame.series, frame.frame, frame.shape, frame.dtype) == (2619, 43, (2162, 2068), np.uint16)
    assert frame.encoding == "bs16-lz4<" and frame.md5_ok is True
    pixels = frame.pixels()
    assert pixels.max() == 0xFFFF and 0 < pixels[pixels < 0xFFFE].sum()


def test_v2_eiger2_16m_capture(shared_data):
    folder = shared_data / "stream_v2/eiger2_16m_final"
    parser = StreamParser()
    [start] = parser.parse([(folder / "start.cbor").read_bytes()])
    [frame] = parser.parse([(folder / "image.cbor").read_bytes()])
    [end] = parser.parse([(folder / "end.cbor").read_bytes()])
    assert parser.protocol == "v2"
    assert isinstance(start, SeriesStart) and start.series == frame.series == end.series == 15614
    assert "pixel_mask" not in start.config and start.config is not start.header
    assert start.config["detector_translation"][2] == pytest.approx(-0.237, abs=1e-3)
    assert (frame.shape, frame.dtype, frame.encoding, frame.codec) == ((4362, 4148), np.uint16, "bslz4", "bslz4")
    assert frame.header["channel"] == frame.header["channels"][0]
    assert frame.pixels().shape == (4362, 4148)


def test_v2_alpha_format_images_are_refused_with_the_reason(shared_data):
    folder = shared_data / "stream_v2/eiger2_1m_alpha"
    with pytest.raises(StreamError, match=r"^part 0: image message without data channels$") as exc:
        parse_message([(folder / "stream2.000002").read_bytes()])
    assert exc.value.part == 0


def test_cbftoeiger_capture_starts_its_series_once(shared_data):
    parser = StreamParser()
    events = [e for msg in cbf_messages(shared_data) for e in parser.parse(msg)]
    events += parser.parse([b'{"htype":"dseries_end-1.0","series":1}\0'])
    assert [type(e).__name__ for e in events] == ["SeriesStart"] + ["FrameMessage"] * 5 + ["SeriesEnd"]
    frames = events[1:6]
    assert [f.frame for f in frames] == [1, 3, 4, 5, 6] and {f.series for f in frames} == {1}  # as captured
    assert frames[0].header["master_file"].endswith("hdf5_test_0361-000_master.h5")
    assert (frames[0].shape, frames[0].dtype, frames[0].encoding) == ((4371, 4150), np.uint32, "bs32-lz4<")
    assert frames[0].md5_ok is None  # `TODO-MD5-HASH`
    # A message read on its own gives its start too.
    assert [type(e).__name__ for e in parse_message(cbf_messages(shared_data)[2])] == ["SeriesStart", "FrameMessage"]


def test_detect_protocol_on_the_captures(shared_data):
    assert detect_protocol([(shared_data / "stream_v2/eiger2_16m_final/start.cbor").read_bytes()]) == "v2"
    assert detect_protocol(v1_capture_messages(shared_data)[1]) == "v1"
    assert detect_protocol(cbf_messages(shared_data)[0]) == "cbftoeiger"
    with pytest.raises(StreamError, match="cannot tell the protocol"):
        detect_protocol([b"hello"])
    with pytest.raises(StreamError, match="empty message"):
        detect_protocol([])


# --- pixel types ------------------------------------------------------------------------------------
# stream_decode.py (gone) took any numpy integer type in v1 (uint64 too) and float32 (tag 85) in v2; the
# Rust parser took 8/16/32-bit integers. What both took is what the one parser takes, as the unsigned
# pixels the Splitter writes: uint8/16/32 and int8/16/32 (v1), typed-array tags 64/69/70 (v2).


@pytest.mark.parametrize("type_name", ["uint8", "uint16", "uint32", "int8", "int16", "int32"])
@pytest.mark.parametrize("compressed", [True, False])
def test_v1_pixel_types(type_name, compressed):
    rng = np.random.default_rng(3)
    info = np.iinfo(type_name)
    pixels = rng.integers(max(info.min, -100), min(info.max, 5000), (12, 20)).astype(type_name)
    encoding = f"bs{info.bits}-lz4<" if compressed else "lz4<"
    [frame] = parse_message(v1_image(pixels, encoding=encoding))
    unsigned = np.dtype(f"uint{info.bits}")
    assert frame.dtype == unsigned and frame.shape == (12, 20)
    assert np.array_equal(frame.pixels(), pixels.view(unsigned))


@pytest.mark.parametrize("type_name", ["uint64", "int64", "float32", "float64", "bool"])
def test_v1_pixel_types_refused(type_name):
    parts = v1_image(np.zeros((4, 4), np.uint8), type_name=type_name)
    with pytest.raises(StreamError, match=rf'^part 1 \(dimage_d\): unsupported pixel type "{type_name}"') as exc:
        parse_message(parts)
    assert exc.value.part == 1


@pytest.mark.parametrize("tag,dtype", [(64, np.uint8), (69, np.uint16), (70, np.uint32)])
def test_v2_pixel_types(tag, dtype):
    pixels = (np.arange(6 * 10) * 37 % 251).astype(dtype).reshape(6, 10)
    raw, packed = v2_image(6, 10, tag, pixels.tobytes()), v2_image(
        6, 10, tag, cbor2.CBORTag(56500, ["bslz4", pixels.itemsize, codec.encode(pixels, "bslz4")]))
    for message, encoding in ((raw, "none"), (packed, "bslz4")):
        [frame] = parse_message([message])
        assert (frame.series, frame.frame, frame.dtype, frame.encoding) == (7, 3, dtype, encoding)
        assert np.array_equal(frame.pixels(), pixels)


def test_v2_float_pixels_refused():
    message = v2_image(2, 2, 85, np.zeros((2, 2), "<f4").tobytes())
    with pytest.raises(StreamError, match='^part 0: channel "threshold_1": tag 40 array with unsupported element '
                                          "type 85$"):
        parse_message([message])


# --- malformed messages ----------------------------------------------------------------------------


def _good_v1():
    return v1_image(np.arange(16, dtype=np.uint16).reshape(4, 4), encoding="bs16-lz4<")


def _with(parts, k, value):
    parts = list(parts)
    parts[k] = value
    return parts


@pytest.mark.parametrize(
    "parts,protocol,message,part",
    [
        ([], "auto", "^empty message$", None),
        ([b"\x00\x01garbage"], "auto", r"^part 0: cannot tell the protocol \(htype \"\", first byte 00\)$", 0),
        (_good_v1()[:2], "auto", r"^part 0 \(dimage\): image message truncated \(2 parts, need 4\)$", 0),
        (_with(_good_v1(), 1, b"{not json"), "auto", r"^part 1 \(dimage_d\): not JSON", 1),
        (_with(_good_v1(), 1, b"[1, 2]"), "auto", r"^part 1 \(dimage_d\): JSON part is not an object$", 1),
        (_with(_good_v1(), 2, b"abc"), "auto", r"^part 2 \(blob\): 3 bytes, dimage_d says 35$", 2),
        (_with(_good_v1(), 1, _good_v1()[1].replace(b"bs16-lz4<", b"zstd")), "auto",
         r'^part 1 \(dimage_d\): unknown encoding "zstd"$', 1),
        (_with(_good_v1(), 1, _good_v1()[1].replace(b"bs16-lz4<", b"bs32-lz4<")), "auto",
         r'^part 1 \(dimage_d\): encoding "bs32-lz4<" does not match pixel type "uint16"$', 1),
        (_with(_good_v1(), 1, _good_v1()[1].replace(b'"frame"', b'"x"').replace(b"[4, 4]", b"[4]")), "auto",
         r"^part 1 \(dimage_d\): bad shape/type \(shape has 1 dimensions, expected 2\)$", 1),
        ([b'{"htype":"dfoo-1.0"}'], "v1", r'^part 0: unexpected htype "dfoo-1.0"$', 0),
        ([b'{"htype":"cbfToEiger-0.1","series":1}\0', b"{}"], "auto",
         "^cbfToEiger message has 2 parts, expected 6$", None),
        ([b"\xa1\x64type"], "v2", r"^part 0: not CBOR", 0),
        ([cbor2.dumps({"series_id": 1})], "v2", "^part 0: CBOR message without a type$", 0),
        ([v2_message("start"), v2_message("frobnicate")], "auto", r'^part 1: unknown v2 message type "frobnicate"$', 1),
        ([v2_message("image", image_id=0, data={})], "v2", "^part 0: image message without data channels$", 0),
        (_good_v1(), "v2", "^part 0: not CBOR", 0),
    ],
)
def test_malformed_messages_raise_one_clear_error(parts, protocol, message, part):
    with pytest.raises(StreamError, match=message) as exc:
        parse_message(parts, protocol)
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)
    assert exc.value.part == part


def test_a_bad_message_changes_nothing_and_the_next_one_parses():
    parser = StreamParser()
    with pytest.raises(StreamError):
        parser.parse([b"\x00garbage"])
    assert parser.protocol is None
    [frame] = parser.parse(_good_v1())
    assert parser.protocol == "v1" and frame.frame == 0
    # Once the stream told its protocol, a message of another one is read as that protocol (as the
    # Splitter does): a v2 message is a bad v1 message.
    with pytest.raises(StreamError, match="^part 0: not JSON"):
        parser.parse([v2_message("end")])
    assert parser.parse(_good_v1())[0].frame == 0


def test_parts_that_are_not_bytes_and_unknown_protocols():
    with pytest.raises(TypeError, match="part 0: not a bytes-like object"):
        parse_message(["text"])
    with pytest.raises(ValueError, match='protocol "v3": expected auto, v1, v2 or cbftoeiger'):
        StreamParser("v3")


def test_v1_config_sent_alone_after_its_dheader():
    config = {"description": "Dectris EIGER2 Si 1M", "nimages": 2, "x_pixels_in_detector": 4}
    parser = StreamParser()
    [start] = parser.parse([b'{"htype":"dheader-1.0","header_detail":"basic","series":5}'])
    assert isinstance(start, SeriesStart) and start.config == {}
    [late] = parser.parse([json.dumps(config).encode() + b"\n"])
    assert late == SeriesConfig("v1", 5, config)
    [frame] = parser.parse(v1_image(np.ones((4, 4), np.uint32), series=5))
    assert frame.series == 5
    # Only right after its dheader: later, a lone JSON object is a bad message.
    with pytest.raises(StreamError, match='unexpected htype ""'):
        parser.parse([json.dumps(config).encode()])


def test_v1_hash_mismatch_is_reported_not_refused():
    parts = _good_v1()
    good = hashlib.md5(parts[1]).hexdigest()
    for digest, ok in ((good, True), ("0" * 32, False), ("TODO-MD5-HASH", None)):
        head = json.dumps({"htype": "dimage-1.0", "series": 1, "frame": 0, "hash": digest}).encode()
        assert parse_message([head, *parts[1:]])[0].md5_ok is ok


def test_zmq_frames_are_read_without_a_copy():
    parts = [zmq.Frame(p) for p in _good_v1()]
    [frame] = parse_message(parts)
    assert isinstance(frame.blob, memoryview) and frame.blob.obj is parts[2]
    assert bytes(frame.blob) == bytes(parts[2].buffer)
    [frame] = parse_message([memoryview(p) for p in _good_v1()])
    assert frame.blob.nbytes == len(_good_v1()[2])


def test_merged_v1_header_and_first_frame(shared_data):
    messages = v1_capture_messages(shared_data)
    events = parse_message(messages[0] + messages[1])
    assert [type(e).__name__ for e in events] == ["SeriesStart", "FrameMessage"]


# --- intxr monitor ---------------------------------------------------------------------------------


def test_monitor_reads_a_cbftoeiger_series_once_and_says_one_line_per_bad_message(capsys):
    """`intxr monitor` on the one parser: cbfToEiger's header resent with every frame starts one series;
    a bad message is one line naming the message and the part, counted, and the frames after it come."""
    import io
    import threading

    from intxr.monitor import monitor
    from intxr.simulate import Simulator, SimulatorSettings

    push = zmq.Context.instance().socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    sim = Simulator(["synthetic:64x48:2"], SimulatorSettings(protocol="cbftoeiger", frames=3))
    messages = [parts for parts, _ in sim.series_messages(4)]

    def feed():
        push.send_multipart(messages[0])
        push.send_multipart(messages[1][:3])  # cut short
        for parts in messages[1:]:
            push.send_multipart(parts)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    out = io.StringIO()
    counters = monitor(f"tcp://127.0.0.1:{port}", max_series=1, timeout=20, out=out)
    thread.join(10)
    push.close()
    assert (counters.series_started, counters.frames, counters.series_ended, counters.errors) == (1, 3, 1, 1)
    assert counters.last_error == "cbfToEiger message has 3 parts, expected 6"
    err = capsys.readouterr().err
    assert "monitor: message 2 skipped: cbfToEiger message has 3 parts, expected 6\n" in err
    assert "Traceback" not in err
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("series 4 start (cbftoeiger)") and lines[-1] == "series 4 end"
    assert [line.split(" |")[0] for line in lines[1:4]] == [f"series 4 frame {k}" for k in (1, 2, 3)]
