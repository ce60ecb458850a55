"""The messages between processes (intxr.messages): each kind round-trips through JSON, a bad field
is named, a message of another version is counted and said, and a hit and a series' summary are
decided once: by the reader with the processing section it used, summed up by one tally that the
Collector's SERIES line and the GUI share."""

from __future__ import annotations

import json
import threading
import time

import pytest
import zmq

from intxr.messages import (
    RESULT_HTYPE,
    STATUS_HTYPE,
    SUMMARY_HTYPE,
    BadMessage,
    FrameResult,
    ReaderStatus,
    SeriesEnd,
    SeriesStart,
    SeriesSummary,
    SeriesTally,
    SeriesWritten,
    VersionMismatch,
    splitter_event,
)
from intxr.report import Reporter

RESULT = {
    "htype": RESULT_HTYPE, "series": 3, "frame": 7, "status": "processed", "hit": True,
    "series_name": "series_000003_r2", "rank": 2, "processing_section": "rastering", "algorithm": "dispersion",
    "n_spots": 253, "n_overloads": 0, "score": 6.0, "hres": 2.19, "n_ice_rings": 3, "mean_shape_ratio": 1.81,
    "n_strong_pixels": 4000, "n_spots_total": 300, "errors": ["Too few (3) spots found!"],
    "indexing": "not available", "spots_xy": [[1.5, 2.5], [3.0, 4.0]], "header": {"mapping": "rastering"},
    "master_file": "/data/x_master.h5", "received": 1.7e9, "timing": {"decode": 0.01, "total": 0.1},
    "done": 1.7e9 + 1, "latency": 0.2, "line": "RESULTS: series 3 frame 7 result {253 0 6 2.19 3 1.81}",
}
STATUS = {"htype": STATUS_HTYPE, "rank": 1, "pid": 4242, "host": "bl12", "cpus": [0, 1], "cpu": 1, "numa": 0,
          "buffer_numa": 0, "frames": 10, "failed": 1, "rate": 8.5, "reconnects": 0, "bad_replies": 2,
          "time": 1.7e9}
END = {"series": 3, "series_name": "series_000003_r2", "timed_out": False, "received": 6, "forwarded": 4,
       "skipped": 2, "malformed": 0, "forwarded_ranges": [[0, 3]], "skipped_ranges": [[4, 5]], "bytes": 100,
       "md5_mismatches": 0, "time": 1.7e9}
WRITTEN = {"series": 3, "series_name": "series_000003_r2", "frames_written": 6, "master_file": "/d/x_master.h5",
           "time": 1.7e9}


def wire(body: dict) -> dict:
    return json.loads(json.dumps(body))


@pytest.mark.parametrize("model, body", [
    (FrameResult, RESULT), (ReaderStatus, STATUS), (SeriesEnd, END), (SeriesWritten, WRITTEN),
    (SeriesStart, {"series": 3, "series_name": "series_000003_r2", "time": 1.7e9}),
])
def test_each_message_round_trips_with_every_field_name(model, body):
    assert wire(model.from_wire(wire(body)).to_wire()) == body


def test_a_summary_round_trips_and_older_frame_lists_are_read_as_ranges():
    tally = SeriesTally(3, "series_000003_r2")
    for frame, status, hit in ((0, "processed", True), (1, "processed", False), (2, "blank", False)):
        assert tally.add(frame, status, hit, hres=2.0, latency=0.1, at=100.0 + frame)
    assert not tally.add(1, "failed", False)  # a second result of a frame counts nothing
    end = SeriesEnd.from_wire({"series": 3, "series_name": "series_000003_r2", "received": 5,
                               "forwarded_frames": [0, 1, 2, 3], "skipped_frames": [4]})
    assert end.to_wire()["forwarded_ranges"] == [[0, 3]] and end.skipped_count == 1
    summary = tally.summary(end, written=5, master_file="/d/x_master.h5")
    assert (summary.processed, summary.hits, summary.blank, summary.skipped, summary.failed, summary.lost) == (
        2, 1, 1, 1, 1, 1)
    assert summary.lost_ranges == [[3, 3]] and summary.rate == pytest.approx(1.0)
    body = wire(summary.to_wire())
    assert body["htype"] == SUMMARY_HTYPE and SeriesSummary.from_wire(body) == summary
    assert summary.line().startswith("SERIES 3 r2: received 5, written 5, processed 2 (hits 1, median hres 2.00 A)")
    live = tally.summary(end, final=False)  # the GUI's while results still come: nothing lost yet
    assert (live.lost, live.failed, live.hits) == (None, 0, 1)


@pytest.mark.parametrize("model, body, field", [
    (FrameResult, {**RESULT, "series": None}, "series"),
    (FrameResult, {**RESULT, "frame": -1}, "frame"),
    (FrameResult, {**RESULT, "status": "exploded"}, "status"),
    (FrameResult, {k: v for k, v in RESULT.items() if k != "hit"}, "hit"),
    (FrameResult, {**RESULT, "hit": "yes"}, "hit"),
    (FrameResult, {**RESULT, "n_spots": "many"}, "n_spots"),
    (FrameResult, {**RESULT, "hres": float("nan")}, "hres"),
    (FrameResult, {**RESULT, "spots_xy": [[1, "a"]]}, "spots_xy"),
    (FrameResult, {**RESULT, "errors": [1]}, "errors"),
    (FrameResult, {**RESULT, "header": [1]}, "header"),
    (FrameResult, {**RESULT, "algorithm": 3}, "algorithm"),
    (FrameResult, {**RESULT, "timing": {"total": "x"}}, "timing"),
    (FrameResult, {k: v for k, v in RESULT.items() if k != "htype"}, "htype"),
    (FrameResult, {**RESULT, "htype": STATUS_HTYPE}, "htype"),
    (ReaderStatus, {**STATUS, "rank": 0}, "rank"),
    (ReaderStatus, {**STATUS, "cpus": [-1]}, "cpus"),
    (ReaderStatus, {**STATUS, "pid": "x"}, "pid"),
    (SeriesEnd, {**END, "forwarded_ranges": [[5, 2]]}, "forwarded_ranges"),
    (SeriesEnd, {"series": 1, "skipped_frames": [1, "2"]}, "skipped_frames"),
    (SeriesEnd, {**END, "timed_out": "no"}, "timed_out"),
    (SeriesWritten, {**WRITTEN, "frames_written": -1}, "frames_written"),
    (SeriesSummary, {"htype": SUMMARY_HTYPE, "series": 1, "hits": -1}, "hits"),
    (SeriesSummary, {"htype": SUMMARY_HTYPE, "series": 1, "lost_ranges": "all"}, "lost_ranges"),
])
def test_a_bad_field_is_named(model, body, field):
    with pytest.raises(BadMessage, match=f"'{field}'"):
        model.from_wire(body)


def test_another_version_is_its_own_error_and_the_same_major_version_is_read():
    with pytest.raises(VersionMismatch, match="'intxr-result-2.0': this intxr reads intxr-result-1.0"):
        FrameResult.from_wire({**RESULT, "htype": "intxr-result-2.0"})
    assert FrameResult.from_wire({**RESULT, "htype": "intxr-result-1.3", "new_field": 1}).frame == 7
    with pytest.raises(BadMessage, match="unknown topic"):
        splitter_event("series_exploded", {})


def test_a_reporter_says_the_first_at_once_then_a_count_at_most_every_interval(capsys):
    report = Reporter("collector", "malformed message", "the results socket tcp://x:1", interval=60)
    for k in range(5):
        report(f"bad {k}")
    report.flush()
    err = capsys.readouterr().err.splitlines()
    assert err == ["collector: malformed message on the results socket tcp://x:1: bad 0; counted and ignored",
                   "collector: 4 more malformed message(s) on the results socket tcp://x:1 (5 in all; last: bad 4)"]


def _collector(tmp_path, **overrides):
    from test_faults_pipeline import write_config

    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings

    config, keys = write_config(tmp_path, **overrides)
    return Collector(cfg.load(str(config), "t"), CollectorSettings(grace=1.0)), keys, config


def _close(collector) -> None:
    for sock in (collector.results, collector.splitter, collector.publisher):
        sock.close(linger=0)


def test_a_message_of_another_version_is_counted_and_said(tmp_path, capfd):
    from intxr.gui.model import RunModel
    from intxr.gui.server import handle_message

    collector, keys, _ = _collector(tmp_path)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
    try:
        for kind, body in ((b"result", {**RESULT, "htype": "intxr-result-2.0"}),
                           (b"status", {**STATUS, "htype": "intxr-status-9.1"}),
                           (b"result", {**RESULT, "frame": 8, "htype": "intxr-result-1.3"})):
            push.send_multipart([kind, json.dumps(body).encode()])
        deadline = time.monotonic() + 10
        while collector.other_version.count + collector.results_total < 3 and time.monotonic() < deadline:
            collector.receive_results()
            time.sleep(0.01)
        assert (collector.other_version.count, collector.bad_results.count, collector.results_total) == (2, 0, 1)
        assert collector.health()["other_version_results"] == 2
    finally:
        push.close(linger=0)
        _close(collector)
    err = capfd.readouterr().err
    assert ("collector: message of another version on the results socket tcp://127.0.0.1:"
            in err and "result: 'intxr-result-2.0': this intxr reads intxr-result-1.0" in err), err
    model = RunModel()
    with pytest.raises(VersionMismatch, match="result: 'intxr-result-2.0'"):
        handle_message(model, [b"result", json.dumps({**RESULT, "htype": "intxr-result-2.0"}).encode()])


PROCESSING = """[DEFAULT]
min_Bragg_peaks = 10

[rastering]
spf_d_max = 40
spf_algorithm = dispersion
min_Bragg_peaks = 1000
"""


def test_the_hit_is_the_readers_with_its_section_and_the_series_line_and_the_gui_agree(
        tmp_path, thaumatin_cbfs, capfd):
    """[DEFAULT] says 10 spots make a hit, the run mode's [rastering] says 1000: the reader decides
    with [rastering], and the Collector's SERIES line, the GUI's counts and its points all say the
    reader's word (the Collector used to count hits with [DEFAULT]'s threshold)."""
    from intxr.gui.model import RunModel
    from intxr.gui.server import subscribe
    from intxr.images import open_source
    from intxr.reader.source import ServedFrame
    from intxr.reader.worker import Reader, ReaderSettings
    from intxr.simulate import pixels_for

    processing = tmp_path / "processing.cfg"
    processing.write_text(PROCESSING)
    collector, keys, _ = _collector(tmp_path, processing_config_file=str(processing))
    reader = Reader(ReaderSettings(rank=1, splitter_endpoint=f"tcp://127.0.0.1:{keys['port']}",
                                   collector_endpoint=f"tcp://127.0.0.1:{keys['collector_port']}",
                                   control_endpoint=None, timeout=3.0, skip_prescreen=False),
                    collector.configuration)
    model = RunModel()
    stop = threading.Event()
    gui = subscribe(model, f"tcp://127.0.0.1:{keys['results_pub_port']}", stop)
    name = "series_000001"
    results = []
    try:
        time.sleep(0.5)  # the GUI's subscription reaches the Collector's PUB
        for k, path in enumerate(thaumatin_cbfs[:4], start=1):  # 253, 1127, 1219 and 1161 spots
            image = open_source(path).read(0)
            pixels = pixels_for(image.data, "bs32-lz4")
            meta = {"series": 1, "series_name": name, "frame": k, "shape": list(pixels.shape), "type": "uint32",
                    "encoding": "bs32-lz4", "header": {"mapping": "rastering"}}
            frame = ServedFrame(meta, {"geometry": image.geometry.to_wire()}, memoryview(b""), time.time())
            frame.pixels = lambda out=None, pixels=pixels: pixels  # decoded already
            result = reader.process(frame)
            results.append(result)
            reader._send("result", result.to_wire())
        deadline = time.monotonic() + 20
        while collector.results_total < 4 and time.monotonic() < deadline:
            collector.receive_results()
            time.sleep(0.01)
        end = {"series": 1, "series_name": name, "timed_out": False, "received": 4, "forwarded": 4, "skipped": 0,
               "forwarded_ranges": [[1, 4]], "skipped_ranges": []}
        collector.take_splitter("series_end", splitter_event("series_end", end))
        collector.take_splitter("series_written", splitter_event(
            "series_written", {"series": 1, "series_name": name, "frames_written": 4}))
        collector.check_series()
        assert collector.series_done == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (model.find(name) and model.find(name).summary):
            time.sleep(0.05)
    finally:
        stop.set()
        gui.join(5)
        reader.source.close()
        reader.results.close(linger=0)
        _close(collector)
    n_spots = [r.n_spots for r in results]
    assert all(r.status == "processed" and r.processing_section == "rastering" and r.algorithm == "dispersion"
               for r in results), results
    assert [r.hit for r in results] == [n >= 1000 for n in n_spots]
    hits = sum(n >= 1000 for n in n_spots)
    assert 0 < hits < sum(n >= 10 for n in n_spots), n_spots  # the two sections disagree on these frames
    out = capfd.readouterr().out
    assert f"SERIES 1: received 4, written 4, processed 4 (hits {hits}," in out, out
    [series] = model.delta(0)["series"]
    assert series["counts"]["hits"] == hits and series["counts"]["ended"]
    assert sum(p["hit"] for p in series["points"]) == hits
