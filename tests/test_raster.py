"""Crystals in raster scans (intxr.raster): synthetic grids with crystals whose places are known
(one, two touching diagonally, two apart, a snake scan, an empty scan, results out of order,
positions from the mapping header), and the whole way through a real Collector: real thaumatin
frames placed on a grid, processed by a real Reader, and the RASTER line BluIce receives; the
startup keys, two orthogonal scans combined into 3-D, and the daemon's line for a series whose
Collector was killed."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import zmq

from intxr import config as cfg
from intxr.messages import FrameResult, splitter_event
from intxr.raster import RasterScan, grid_cell, place, regions

SECTIONS = cfg.CollectorKeys.raster_sections  # the config's default: [rastering] series are rasters


def result(frame: int, score: float = 0.0, hit: bool | None = None, n_spots: int | None = None,
           hres: float | None = None, mapping: str = "rastering", section: str = "rastering",
           status: str = "processed", **extra) -> FrameResult:
    hit = score > 0 if hit is None else hit
    return FrameResult(series=1, frame=frame, status=status, hit=hit, processing_section=section,
                       n_spots=n_spots if n_spots is not None else (100 if hit else 2), score=score,
                       hres=hres if hres is not None else (2.0 if hit else 99.9), header={"mapping": mapping},
                       **extra)


def scan_of(grid: list[list[float]], snake: bool = False, first: int = 1, order=None) -> list[FrameResult]:
    """Results of a scan of `grid` (rows of scores; 0 is no hit), frames numbered from `first`
    in scan order (row by row, every other row backwards when `snake`)."""
    out = []
    k = first
    for r, row in enumerate(grid):
        columns = range(len(row) - 1, -1, -1) if snake and r % 2 else range(len(row))
        for c in columns:
            out.append(result(k, row[c], n_spots=int(row[c] * 50) if row[c] else 3))
            k += 1
    if order is not None:
        order(out)
    return out


def crystals(results, row_length=None, snake=False, **kwargs):
    scan = RasterScan(SECTIONS, **kwargs)
    for r in results:
        scan.add(r)
    return scan.report(1, "series_000001", row_length, snake)


def near(crystal, x, y):
    assert abs(crystal.x - x) < 0.5 and abs(crystal.y - y) < 0.5, (crystal.x, crystal.y, x, y)


def test_one_crystal_its_centre_of_mass_weighted_by_score_its_box_and_its_numbers():
    grid = [[0, 0, 0, 0, 0],
            [0, 2, 6, 0, 0],
            [0, 2, 2, 0, 0],
            [0, 0, 0, 0, 0]]
    report = crystals(scan_of(grid), row_length=5)
    [c] = report.crystals
    # sum(score * column) / sum(score), sum(score * row) / sum(score)
    assert (c.x, c.y) == pytest.approx(((2 * 1 + 6 * 2 + 2 * 1 + 2 * 2) / 12, (2 * 1 + 6 * 1 + 2 * 2 + 2 * 2) / 12))
    near(c, 1.5, 1.5)
    assert (c.width, c.height, c.score, c.n_frames, c.n_spots) == (2, 2, 6.0, 4, 100 + 300 + 100 + 100)
    assert (c.best_x, c.best_y, c.best_frame) == (2, 1, 8) and c.d_min == 2.0
    assert sorted(c.cells) == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert (report.rows, report.columns, report.frames, report.hits, report.placed_by) == (4, 5, 20, 4, "row_length")
    assert report.line() == "RASTER: series 1 crystals 1 {1.67 1.33 2 2 6.00 4 2.00 600 8 2 1 {}}"


def test_two_crystals_touching_at_a_corner_are_one_8_connected_region():
    grid = [[5, 0, 0, 0],
            [0, 5, 0, 0],
            [0, 0, 0, 0]]
    [c] = crystals(scan_of(grid), row_length=4).crystals
    near(c, 0.5, 0.5)
    assert (c.width, c.height, c.n_frames) == (2, 2, 2)


def test_two_separate_crystals_strongest_first():
    grid = [[3, 3, 0, 0, 0, 0],
            [3, 3, 0, 0, 0, 0],
            [0, 0, 0, 0, 9, 0],
            [0, 0, 0, 0, 9, 0]]
    report = crystals(scan_of(grid), row_length=6)
    weak, strong = report.crystals[1], report.crystals[0]
    near(strong, 4, 2.5)
    near(weak, 0.5, 0.5)
    assert (strong.width, strong.height, strong.n_frames, strong.score) == (1, 2, 2, 9.0)
    assert (weak.width, weak.height, weak.n_frames, weak.score) == (2, 2, 4, 3.0)
    assert report.line().startswith("RASTER: series 1 crystals 2 {4.00 2.50 1 2 9.00 2 2.00 ")
    assert re.fullmatch(r"RASTER: series 1 crystals 2 (\{[^{}]+ \{\}\} ?){2}", report.line()), report.line()


def test_a_snake_scan_is_placed_row_by_row_every_other_row_backwards():
    grid = [[0, 0, 0, 0, 0],
            [0, 0, 0, 7, 4],  # scanned right to left
            [0, 0, 0, 4, 0],
            [0, 0, 0, 0, 0]]
    results = scan_of(grid, snake=True)
    [c] = crystals(results, row_length=5, snake=True).crystals
    near(c, 3.27, 1.27)
    assert (c.best_x, c.best_y, c.width, c.height) == (3, 1, 2, 2)
    assert c.best_frame == 1 + 5 + 1  # row 1 runs backwards: column 3 is its second frame
    # Read as a plain scan the same frames are elsewhere: the snake setting matters.
    plain = crystals(results, row_length=5).crystals
    assert [(p.best_x, p.best_y, p.n_frames) for p in plain] == [(1, 1, 2), (3, 2, 1)]
    assert place(6, 1, 5, True) == (1, 4) and place(10, 1, 5, True) == (1, 0) and place(11, 1, 5, True) == (2, 0)


def test_an_empty_scan_says_crystals_0():
    report = crystals(scan_of([[0] * 4] * 3), row_length=4)
    assert report.crystals == [] and report.line() == "RASTER: series 1 crystals 0"
    nothing = RasterScan(SECTIONS)
    assert nothing.report(3, None).line() == "RASTER: series 3 crystals 0"


def test_results_out_of_order_give_the_same_crystals():
    grid = [[0, 1, 0, 0, 0, 0],
            [0, 4, 2, 0, 0, 8],
            [0, 0, 0, 0, 0, 8],
            [0, 0, 3, 0, 0, 0]]
    in_order = crystals(scan_of(grid, snake=True), row_length=6, snake=True)
    shuffled = crystals(scan_of(grid, snake=True, order=random.Random(4).shuffle), row_length=6, snake=True)
    assert in_order.line() == shuffled.line() and len(in_order.crystals) == 3
    assert [(c.best_x, c.best_y) for c in in_order.crystals] == [(5, 1), (1, 1), (2, 3)]


def test_positions_from_the_mapping_header_and_a_line_scan_without_any():
    assert grid_cell("rastering.row3.col7") == (3, 7) and grid_cell("row 3 col 7") == (3, 7)
    assert grid_cell("r2c11") == (2, 11) and grid_cell("4,5") == (4, 5) and grid_cell("4x5") == (4, 5)
    assert grid_cell("rastering") is None and grid_cell("") is None and grid_cell(None) is None
    results = [result(10 + k, score=5.0, mapping=f"rastering.row{r}.col{c}")
               for k, (r, c) in enumerate([(7, 2), (7, 3), (8, 3)])]
    results += [result(20, mapping="rastering.row0.col0")]
    report = crystals(results, row_length=99)  # the header wins over a row length
    [c] = report.crystals
    near(c, 2.67, 7.33)
    assert report.placed_by == "mapping" and (report.rows, report.columns) == (9, 4)
    # No position and no row length: one row, the frame's place in the series is its column.
    line = crystals([result(1), result(2), result(3, score=4), result(4, score=4), result(5)])
    assert line.placed_by == "one_row"
    near(line.crystals[0], 2.5, 0)


def test_hits_are_the_readers_word_or_a_score_threshold_and_other_series_are_not_rasters():
    results = [result(1, score=3, hit=False), result(2, score=1, hit=True), result(3, score=0, status="blank"),
               result(4, score=5, hit=True, status="failed")]
    assert [c.best_frame for c in crystals(results).crystals] == [2]
    assert {c.best_frame for c in crystals(results, min_score=2.0).crystals} == {1}
    scan = RasterScan(SECTIONS)
    scan.add(result(1, 5, section="screening", mapping=""))
    assert not scan.raster
    scan.add(result(2, 5, section="screening", mapping="row 0 col 1"))
    assert scan.raster and list(scan.hits) == [2]  # a series not known as a raster keeps no hits


def test_the_indexed_cell_of_the_best_indexed_frame_and_regions():
    def indexed(base: FrameResult, sg, cell, ok=True) -> FrameResult:
        base.indexed, base.space_group, base.unit_cell = ok, sg, cell
        return base

    results = [indexed(result(1, 6), "P41212", [57.8, 57.8, 150.2, 90, 90, 90]), result(2, 9),
               indexed(result(3, 2), "P1", [1, 2, 3, 90, 90, 90]),
               indexed(result(4, 8), "C2", [9, 9, 9, 90, 90, 90], ok=False)]  # not indexed: its cell is no cell
    [c] = crystals(results).crystals
    assert c.unit_cell == ("P41212", 57.8, 57.8, 150.2, 90.0, 90.0, 90.0)
    assert c.brace().endswith(" {P41212 57.80 57.80 150.20 90.00 90.00 90.00}}")
    assert regions({(0, 0), (1, 1), (3, 3), (3, 4)}) == [[(0, 0), (1, 1)], [(3, 3), (3, 4)]]


# ---------------------------------------------------------------------------------------------
# Two orthogonal scans: crystals in 3-D


def views_of(sample: dict[tuple[int, int, int], float], columns: int, rows: int, series=(1, 2),
             omegas=(0.0, 90.0)):
    """The two scans of a 3-D sample ({(x, y, z): score}): the first sees (x, y), the second (x, z),
    each cell the strongest voxel along its line of sight; mapping values name cell and omega."""
    reports = []
    for number, omega, axis in ((series[0], omegas[0], 1), (series[1], omegas[1], 2)):
        scan = RasterScan(SECTIONS)
        for k, (row, column) in enumerate((r, c) for r in range(rows) for c in range(columns)):
            score = max((v for voxel, v in sample.items() if voxel[0] == column and voxel[axis] == row), default=0)
            scan.add(result(k, score, mapping=f"rastering.row{row}.col{column}.omega{omega:g}"))
        reports.append(scan.report(number, f"series_{number:06d}"))
    return reports


def test_two_orthogonal_scans_give_each_crystal_its_3d_place():
    from intxr.raster import combine_3d, grid_omega, orthogonal

    assert grid_omega("rastering.row3.col7.omega90") == 90.0 and grid_omega("row 3 col 7 omega -0.5") == -0.5
    assert grid_omega("r3c7_omega 270") == 270.0 and grid_omega("rastering.row3.col7") is None
    assert grid_cell("rastering.row3.col7.omega90") == (3, 7)
    assert orthogonal(0, 90) and orthogonal(10, 277) and orthogonal(45, -45)
    assert not orthogonal(0, 80) and not orthogonal(0, 180) and not orthogonal(None, 90)
    # A crystal of 2 x 2 x 3 cells around (1.5, 1.5, 3) and a small one at (6, 4, 1), apart in x.
    sample = {(x, y, z): 6.0 for x in (1, 2) for y in (1, 2) for z in (2, 3, 4)}
    sample[(6, 4, 1)] = 9.0
    first, second = views_of(sample, columns=8, rows=6)
    assert (first.omega, second.omega) == (0.0, 90.0) and len(first.crystals) == len(second.crystals) == 2
    combined = combine_3d(first, second)
    strong, big = combined.crystals
    assert (strong.x, strong.y, strong.z, strong.best_frames) == (6, 4, 1, (4 * 8 + 6, 1 * 8 + 6))
    assert (big.x, big.y, big.z) == pytest.approx((1.5, 1.5, 3.0))
    assert (big.width, big.height, big.depth, big.score) == (2, 2, 3, 6.0)
    assert combined.line() == ("RASTER3D: series 1 2 crystals 2 {6.00 4.00 1.00 1 1 1 9.00 38 14} "
                               "{1.50 1.50 3.00 2 2 3 6.00 9 17}")
    assert "\n" + combined.line() + "\n" in (Path(__file__).parent.parent / "README.md").read_text()
    # Two crystals over the same columns: two projections cannot tell which y goes with which z,
    # so both pairings are listed (the real two among them); nothing shared, nothing combined.
    twins = views_of({(3, 1, 4): 5.0, (3, 4, 0): 5.0}, columns=5, rows=5)
    assert {(c.x, c.y, c.z) for c in combine_3d(*twins).crystals} == {(3, 1, 4), (3, 4, 0), (3, 1, 0), (3, 4, 4)}
    apart = views_of({(0, 1, 1): 5.0}, columns=5, rows=5)
    apart[1].crystals[0].column_weights = {4: 1.0}
    assert combine_3d(*apart).line() == "RASTER3D: series 1 2 crystals 0"


def test_the_startup_keys_reach_the_collector_and_orthogonal_scans_come_out_in_3d(tmp_path, capfd):
    """raster_sections, raster_min_score and raster_snake from a startup file drive a real
    Collector: a scan with a grid in its headers is a raster and only frames scoring 6 or more
    make its crystals; a series of the rastering section without one is none (raster_sections =
    None); two orthogonal scans, one after the other, give one RASTER3D line to BluIce."""
    from test_faults_pipeline import write_config

    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings
    from intxr.testing import free_ports

    [ui_port] = free_ports(1)
    config, keys = write_config(tmp_path, uihost="127.0.0.1", uiport=ui_port, send_to_ui="True",
                                raster_sections="None", raster_min_score="6", raster_snake="True")
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(grace=1.0, record=str(tmp_path / "r.jsonl")))
    assert (collector.raster_sections, collector.raster_min_score, collector.raster_snake) == ((), 6.0, True)
    ui = UiListener(ui_port)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
    time.sleep(0.5)  # the Collector's UI socket reaches the listener

    def series(number: int, frames: list[tuple[float, str]]) -> None:
        for frame, (score, mapping) in enumerate(frames):
            body = json.loads(_wire_result(frame, score, mapping)[1])
            body.update(series=number, series_name=f"series_{number:06d}")
            push.send_multipart([b"result", json.dumps(body).encode()])
        _take(collector, collector.results_total + len(frames))
        collector.take_series_event(splitter_event("series_end", {
            "series": number, "series_name": f"series_{number:06d}", "timed_out": False,
            "received": len(frames), "forwarded_ranges": [[0, len(frames) - 1]], "skipped_ranges": []}))
        collector.finish_series(collector.series[f"series_{number:06d}"])

    try:
        # Seen at omega 0: a crystal at columns 1-2 (rows 0-1) and a weak frame (5 < 6) at column 4.
        xy = {(0, 1): 8.0, (0, 2): 7.0, (1, 1): 6.0, (1, 4): 5.0}
        series(1, [(xy.get((r, c), 0.0), f"row {r} col {c} omega 0") for r in range(2) for c in range(5)])
        series(2, [(9.0, "rastering")] * 3)  # the rastering section, no grid: not a raster here
        xz = {(2, 1): 9.0, (2, 2): 9.0}  # the same crystal at omega 90: z is row 2
        series(3, [(xz.get((r, c), 0.0), f"row {r} col {c} omega 90") for r in range(3) for c in range(5)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(line.startswith("RASTER3D") for line in ui.lines):
            time.sleep(0.05)
    finally:
        ui.close()
        push.close(linger=0)
        collector.shutdown()
    rasters = [line for line in ui.lines if line.startswith("RASTER")]
    x = (1 * 14 * 9 + 2 * 7 * 9) / (14 * 9 + 7 * 9)  # column weights: first scan's 8 + 6 and 7, second's 9 and 9
    assert rasters == [
        f"RASTER: series 1 crystals 1 {{{(8 + 14 + 6) / 21:.2f} {6 / 21:.2f} 2 2 8.00 3 2.50 840 1 1 0 {{}}}}",
        "RASTER: series 3 crystals 1 {1.50 2.00 2 1 9.00 2 2.50 720 11 1 2 {}}",
        f"RASTER3D: series 1 3 crystals 1 {{{x:.2f} {6 / 21:.2f} 2.00 2 2 1 8.00 1 11}}"], rasters
    assert rasters[-1] in capfd.readouterr().out.splitlines()
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [row["raster3d"]["series"] for row in rows if "raster3d" in row] == [[1, 3]]



def test_the_readmes_example_is_what_the_code_says():
    grid = [[0, 0, 0, 0, 0, 0],
            [0, 2, 6, 0, 0, 0],
            [0, 2, 2, 0, 5, 0],
            [0, 0, 0, 0, 5, 0]]
    results = scan_of(grid)
    results[16].hres = 2.2  # frame 17
    line = crystals(results, row_length=6).line()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "\n" + line + "\n" in readme, line

# ---------------------------------------------------------------------------------------------
# The whole way: real frames on a grid, a real Reader and Collector, the line BluIce receives


class UiListener:
    """What BluIce would read: a PULL socket bound at uihost:uiport (as tests/test_pipeline.py's)."""

    def __init__(self, port: int):
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.lines: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            if self.sock.poll(100):
                self.lines.append(self.sock.recv_string())

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close(linger=0)


INDEXING = """[rastering]
processing_mode = spotfinding_indexing
spf_d_max = 40
spf_algorithm = dispersion
target_unit_cell = 57.8,57.8,150,90,90,90
target_space_group = P41212
exposure_time_cutoff = 0.01
"""


@pytest.mark.parametrize("indexing", [False, True], ids=["spotfinding", "indexing"])
def test_bluice_receives_the_raster_line_with_the_crystal_of_real_frames_on_a_grid(
        tmp_path, thaumatin_cbfs, capfd, indexing):
    """A 5 x 4 grid scanned as a snake: four real thaumatin frames (hundreds to a thousand spots)
    on the cells of columns 1-2, rows 1-2, blank frames (all zero) everywhere else. A real Reader
    processes every frame with [rastering] (the header's run mode), a real Collector sums the
    series up, and the BluIce listener, stdout and the record get one RASTER line: one crystal
    whose centre of mass (by the readers' scores) is within half a cell of (1.5, 1.5); the GUI,
    subscribed to the Collector, has it for its raster map. Where [rastering] indexes (a known
    cell), the crystal carries the cell of its best indexed frame."""
    import numpy as np
    from test_faults_pipeline import write_config

    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings
    from intxr.gui.model import RunModel
    from intxr.gui.server import subscribe
    from intxr.images import open_source
    from intxr.reader.source import ServedFrame
    from intxr.reader.worker import Reader, ReaderSettings
    from intxr.simulate import pixels_for
    from intxr.testing import free_ports

    [ui_port] = free_ports(1)
    processing = {}
    if indexing:
        (tmp_path / "processing.cfg").write_text(INDEXING)
        processing = {"processing_config_file": str(tmp_path / "processing.cfg")}
    config, keys = write_config(tmp_path, uihost="127.0.0.1", uiport=ui_port, send_to_ui="True",
                                raster_row_length="5", raster_snake="True", **processing)
    record = tmp_path / "record.jsonl"
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(grace=1.0, record=str(record)))
    reader = Reader(ReaderSettings(rank=1, splitter_endpoint=f"tcp://127.0.0.1:{keys['port']}",
                                   collector_endpoint=f"tcp://127.0.0.1:{keys['collector_port']}",
                                   control_endpoint=None, timeout=3.0, skip_prescreen=False),
                    collector.configuration)
    ui = UiListener(ui_port)
    model = RunModel(row_length=5, snake=True)
    stop = threading.Event()
    gui = subscribe(model, f"tcp://127.0.0.1:{keys['results_pub_port']}", stop)
    time.sleep(0.5)  # the GUI's subscription reaches the Collector's PUB
    name = "series_000001"
    crystal = {(1, 1): 0, (1, 2): 1, (2, 1): 2, (2, 2): 3}  # (row, column) -> which real frame
    images = [open_source(path).read(0) for path in thaumatin_cbfs[:4]]
    blank = pixels_for(np.zeros_like(images[0].data), "bs32-lz4")
    cell_of, results = {}, []
    try:
        for frame in range(1, 21):
            row, column = place(frame, 1, 5, snake=True)
            cell_of[frame] = (row, column)
            image = images[crystal[row, column]] if (row, column) in crystal else None
            pixels = pixels_for(image.data, "bs32-lz4") if image is not None else blank
            meta = {"series": 1, "series_name": name, "frame": frame, "shape": list(pixels.shape),
                    "type": "uint32", "encoding": "bs32-lz4", "header": {"mapping": "rastering"}}
            served = ServedFrame(meta, {"geometry": images[0].geometry.to_wire()}, memoryview(b""), time.time())
            served.pixels = lambda out=None, pixels=pixels: pixels  # decoded already
            out = reader.process(served)
            results.append(out)
            reader._send("result", out.to_wire())
        deadline = time.monotonic() + 20
        while collector.results_total < 20 and time.monotonic() < deadline:
            collector.receive_results()
            time.sleep(0.01)
        end = {"series": 1, "series_name": name, "timed_out": False, "received": 20, "forwarded": 20,
               "skipped": 0, "forwarded_ranges": [[1, 20]], "skipped_ranges": []}
        collector.take_splitter("series_end", splitter_event("series_end", end))
        collector.take_splitter("series_written", splitter_event(
            "series_written", {"series": 1, "series_name": name, "frames_written": 20}))
        collector.check_series()
        assert collector.series_done == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (any(line.startswith("RASTER:") for line in ui.lines)
                                                   and model.find(name) and model.find(name).crystals):
            time.sleep(0.05)
    finally:
        stop.set()
        gui.join(5)
        ui.close()
        reader.source.close()
        reader.results.close(linger=0)
        collector.shutdown()
    hits = [r for r in results if r.hit]
    assert sorted(cell_of[r.frame] for r in hits) == sorted(crystal), [(r.frame, r.status, r.n_spots)
                                                                        for r in results]
    assert all(r.processing_section == "rastering" for r in results)
    # What the line must say, from the readers' own results.
    total = sum(r.score for r in hits)
    x = sum(r.score * cell_of[r.frame][1] for r in hits) / total
    y = sum(r.score * cell_of[r.frame][0] for r in hits) / total
    best = max(hits, key=lambda r: r.score)
    hres = sorted(r.hres for r in hits)
    assert abs(x - 1.5) < 0.5 and abs(y - 1.5) < 0.5
    expected = (f"RASTER: series 1 crystals 1 {{{x:.2f} {y:.2f} 2 2 {best.score:.2f} 4 {(hres[1] + hres[2]) / 2:.2f} "
                f"{sum(r.n_spots for r in hits)} ")
    raster_lines = [line for line in ui.lines if line.startswith("RASTER:")]
    assert len(raster_lines) == 1 and raster_lines[0].startswith(expected), (raster_lines, expected)
    assert len([line for line in ui.lines if line.startswith("RESULTS:")]) == 20
    assert raster_lines[0] in capfd.readouterr().out.splitlines()
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    [raster] = [row["raster"] for row in rows if "raster" in row]
    assert raster["line"] == raster_lines[0] and raster["series_name"] == name
    assert raster["crystals"][0]["best_frame"] == best.frame and raster["placed_by"] == "row_length"
    indexed = [r for r in hits if r.indexed]
    if not indexing:
        assert not indexed and re.fullmatch(r"RASTER: series 1 crystals 1 \{[^{}]+ \{\}\}", raster_lines[0])
    else:
        assert indexed, [(r.frame, r.indexing, r.errors) for r in hits]
        top = max(indexed, key=lambda r: (r.score, -r.frame))
        cell = " ".join([top.space_group] + [f"{v:.2f}" for v in top.unit_cell])
        assert raster_lines[0].endswith(f" {{{cell}}}}}"), (raster_lines[0], cell)
        assert raster["crystals"][0]["unit_cell"][0] == top.space_group
    [series] = model.delta(0)["series"]
    [shown] = series["crystals"]
    box = (shown["left"], shown["top"], shown["width"], shown["height"])
    assert shown["best_frame"] == best.frame and box == (1, 1, 2, 2)
    # The map puts every frame where the Collector put it for its crystals.
    assert all(tuple(series["grid"][str(frame)]) == cell for frame, cell in cell_of.items())


def _wire_result(frame: int, score: float, mapping: str) -> list[bytes]:
    from intxr.messages import RESULT_HTYPE

    body = {"htype": RESULT_HTYPE, "series": 2, "series_name": "series_000002", "frame": frame,
            "status": "processed", "hit": score > 0, "rank": 1, "processing_section": "rastering",
            "n_spots": int(score * 40) if score else 1, "score": score, "hres": 2.5 if score else 99.9,
            "header": {"mapping": mapping}}
    return [b"result", json.dumps(body).encode()]


def _take(collector, n: int) -> None:
    deadline = time.monotonic() + 10
    while collector.results_total + collector.bad_results.count < n and time.monotonic() < deadline:
        collector.receive_results()
        time.sleep(0.01)


def test_a_restarted_collector_keeps_the_crystals_from_its_journal_and_bad_input_stops_nothing(
        tmp_path, monkeypatch, capfd):
    """Half a raster scan goes to a Collector that is then killed; its journal (compacted on the
    way) gives the next Collector the hits it had, and the RASTER line holds the crystal made of
    hits from both. Odd mapping values and scores never stop it."""
    from test_faults_pipeline import write_config

    from intxr import collector as collector_module
    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings

    monkeypatch.setattr(collector_module, "JOURNAL_COMPACT_AFTER", 7)
    state = tmp_path / "state"
    state.mkdir()
    grid = [[0, 0, 0, 0],
            [0, 3, 8, 0],
            [0, 0, 4, 0],
            [0, 0, 0, 0]]
    messages = [_wire_result(4 * r + c, grid[r][c], f"rastering.row{r}.col{c}") for r in range(4) for c in range(4)]

    def collector_at(directory):
        directory.mkdir(exist_ok=True)
        config, keys = write_config(directory)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
        settings = CollectorSettings(grace=1.0, state_dir=str(state), record=str(tmp_path / "record.jsonl"))
        return Collector(cfg.load(str(config), "t"), settings), push

    def killed(collector, push):
        for sock in (collector.results, collector.splitter, collector.publisher, push):
            sock.close(linger=0)
        collector.record.close()

    first, push = collector_at(tmp_path / "1")
    for message in messages[:8]:  # rows 0 and 1: frames 5 and 6 are hits
        push.send_multipart(message)
    _take(first, 8)
    [journal] = collector_module.journal_paths(state)
    text = open(journal).read()
    assert text.splitlines()[1].startswith("S ") and "\nR *\n" in text, text  # compacted, hits kept
    killed(first, push)
    second, push = collector_at(tmp_path / "2")
    try:
        assert len(second.series["series_000002"].raster.hits) == 2
        odd = [_wire_result(100, 5, "row 99999999999999999999 col 1"), _wire_result(101, 5, "x" * 10_000)]
        odd_header = json.loads(odd[1][1])
        odd_header["header"] = {"mapping": ["row", 1]}
        odd.append([b"result", json.dumps({**odd_header, "frame": 102}).encode()])
        for message in messages[8:] + odd:
            push.send_multipart(message)
        _take(second, 8 + 3)
        assert second.bad_results.count == 0 and second.bad_raster.count == 0
        second.take_series_event(splitter_event("series_end", {
            "series": 2, "series_name": "series_000002", "timed_out": False, "received": 19,
            "forwarded_ranges": [[0, 15], [100, 102]], "skipped_ranges": []}))
        second.finish_series(second.series["series_000002"])
    finally:
        killed(second, push)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("RASTER:")]
    assert len(lines) == 1 and lines[0].startswith("RASTER: series 2 crystals 3 {"), lines
    rows = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    report = [row["raster"] for row in rows if "raster" in row]
    [mine] = [c for c in report[0]["crystals"] if c["n_frames"] == 3]
    assert (mine["best_frame"], mine["width"], mine["height"], mine["left"], mine["top"]) == (6, 2, 2, 1, 1)
    assert abs(mine["x"] - (3 * 1 + 8 * 2 + 4 * 2) / 15) < 1e-3 and abs(mine["y"] - (3 + 8 + 4 * 2) / 15) < 1e-3


def test_the_gui_gets_the_crystals_while_the_series_runs_and_bluice_only_at_its_end(tmp_path):
    from test_faults_pipeline import write_config

    from intxr import config as cfg
    from intxr.collector import Collector, CollectorSettings
    from intxr.gui.model import RunModel
    from intxr.gui.server import subscribe
    from intxr.testing import free_ports

    [ui_port] = free_ports(1)
    config, keys = write_config(tmp_path, uihost="127.0.0.1", uiport=ui_port, send_to_ui="True")
    collector = Collector(cfg.load(str(config), "t"), CollectorSettings(grace=1.0))
    ui = UiListener(ui_port)
    model = RunModel()
    stop = threading.Event()
    gui = subscribe(model, f"tcp://127.0.0.1:{keys['results_pub_port']}", stop)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{keys['collector_port']}")
    try:
        time.sleep(0.5)  # the GUI's subscription reaches the Collector's PUB
        for frame, (r, c) in enumerate([(0, 0), (0, 1), (2, 2)]):
            push.send_multipart(_wire_result(frame, 5.0 + frame, f"row {r} col {c}"))
        _take(collector, 3)
        assert collector.publish_live_rasters() == 1 and collector.publish_live_rasters() == 0  # only when new
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (model.find("series_000002") and
                                                   model.find("series_000002").crystals):
            time.sleep(0.05)
        live = model.find("series_000002")
        assert [c["best_frame"] for c in live.crystals] == [2, 1] and live.summary is None
        push.send_multipart(_wire_result(3, 9.0, "row 1 col 2"))  # joins the two: one crystal now
        _take(collector, 4)
        collector.take_series_event(splitter_event("series_end", {
            "series": 2, "series_name": "series_000002", "timed_out": False, "received": 4,
            "forwarded_ranges": [[0, 3]], "skipped_ranges": []}))
        collector.finish_series(collector.series["series_000002"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (len(live.crystals) == 1 and live.summary is not None
                                                   and any(line.startswith("RASTER") for line in ui.lines)):
            time.sleep(0.05)
    finally:
        stop.set()
        gui.join(5)
        ui.close()
        push.close(linger=0)
        collector.shutdown()
    assert [c["best_frame"] for c in live.crystals] == [3]
    assert [line for line in ui.lines if line.startswith("RASTER")] == [
        # x = (0 * 5 + 1 * 6 + 2 * 7 + 2 * 9) / 27, y = (0 * 5 + 0 * 6 + 2 * 7 + 1 * 9) / 27
        "RASTER: series 2 crystals 1 {1.41 0.85 3 3 9.00 4 2.50 1080 3 2 1 {}}"]


def test_a_scan_full_of_small_crystals_lists_the_strongest_and_says_how_many_there_were():
    from intxr.raster import MAX_CRYSTALS

    grid = [[(1 + (r * 7 + c) % 9) if r % 2 == 0 and c % 2 == 0 else 0 for c in range(30)] for r in range(30)]
    report = crystals(scan_of(grid), row_length=30)
    assert len(report.crystals) == MAX_CRYSTALS and report.to_wire()["found"] == 15 * 15
    assert report.line().startswith(f"RASTER: series 1 crystals {MAX_CRYSTALS} {{")
    scores = sorted((v for row in grid for v in row if v), reverse=True)  # each crystal is one cell
    assert [c.score for c in report.crystals] == scores[:MAX_CRYSTALS]  # the strongest, strongest first


def test_a_raster_series_no_collector_sums_up_gets_its_raster_line_once_from_the_daemon(tmp_path, thaumatin_cbfs):
    """The Collector is killed in the middle of raster series 2 and the daemon gives up restarting
    (max_restarts = 0): the daemon sums series 2 up from the journal the killed Collector wrote,
    and BluIce, stdout and the record get its RASTER line once, made of the hits the killed
    Collector had taken (series 1's line came from the Collector, once too)."""
    from test_faults_pipeline import Daemon, records, summaries, write_config

    from intxr.testing import free_ports

    [ui_port] = free_ports(1)
    config, _ = write_config(tmp_path, simulate_rate="4", max_restarts="0", uihost="127.0.0.1", uiport=ui_port,
                             send_to_ui="True", raster_row_length="3")
    record = tmp_path / "results.jsonl"
    ui = UiListener(ui_port)
    daemon = Daemon(config, "-n", "2", "--verbose", "--record", str(record), "--simulate", *thaumatin_cbfs[:6])
    try:
        collector = daemon.rank_pid(0)
        daemon.wait_for(r"^RESULTS: series 2 frame", stream="out", timeout=60)
        time.sleep(0.3)
        os.kill(collector, signal.SIGKILL)
        daemon.wait_for(r"giving up", timeout=30)
        assert daemon.finish(90) == 1, daemon.text()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(line.startswith("RASTER: series 2 ") for line in ui.lines) < 1:
            time.sleep(0.05)
    finally:
        daemon.stop()
        ui.close()
    assert any(line.startswith("SERIES 2: ") and "summed up by the daemon" in line for _, line in daemon.out), \
        daemon.text()
    assert sorted(summaries(daemon))[:2] == [1, 2]
    out = [line for _, line in daemon.out if line.startswith("RASTER")]
    sent = [line for line in ui.lines if line.startswith("RASTER")]
    # A later series the Splitter began is summed up by the daemon too, with no results: no raster.
    assert [int(line.split()[2]) for line in out] == [1, 2], daemon.text()
    assert sent == out, (sent, out)  # each series' line once, series 2's from the daemon
    results, _ = records(record)
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    [mine] = [row["raster"] for row in rows if "raster" in row and row["raster"]["series"] == 2]
    taken = [r for r in results if r["series"] == 2 and r["status"] == "processed" and r["hit"]]
    assert taken and mine["hits"] == len(taken) and mine["line"] == out[1], (mine, taken)
    assert sum(c["n_frames"] for c in mine["crystals"]) == len(taken)
    assert "Traceback" not in daemon.text()
