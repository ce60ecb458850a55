"""The live view's indexing: per series the frames indexed, the rates and the lattices found (median cell and
spread), kept compact; the frame view's predicted spots of an indexed frame. The model on its own, then the real
pipeline (`intxrd` on the real thaumatin frames, readers indexing with the known cell), the real `intxr gui` and
the page in a real headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from intxr.gui.model import MAX_CELLS, MAX_LATTICES, MAX_SERIES, MAX_SPOT_FRAMES, RunModel
from intxr.messages import RESULT_HTYPE

EXE = Path(sys.executable).parent
A = [[0.0171, 0.0012, -0.0003], [-0.0011, 0.0170, 0.0009], [0.0004, -0.0007, 0.0066]]


def result(
    series: int,
    frame: int,
    *,
    hit: bool = True,
    indexed: bool | None = None,
    lattice: str = "tP",
    space_group: str = "P4",
    cell=(58.3, 58.3, 152.4, 90, 90, 90),
    **extra,
) -> dict:
    """A result as the Collector publishes it: a hit, indexed or not (None: not tried), or a frame without spots."""
    body = {
        "htype": RESULT_HTYPE,
        "series": series,
        "frame": frame,
        "n_spots": 500 if hit else 2,
        "hres": 2.0,
        "score": 5,
        "status": "processed",
        "hit": hit,
        "rank": 1,
        "latency": 0.1,
        "done": 1000.0 + frame,
    }
    if indexed is not None:
        body.update(
            indexed=indexed,
            indexing="indexed" if indexed else "not indexed",
            n_indexed=300 if indexed else 4,
            rmsd_px=1.2 if indexed else None,
        )
    if indexed:
        body.update(lattice=lattice, space_group=space_group, unit_cell=list(cell), orientation_matrix=A)
    return {**body, **extra}


def test_series_panel_counts_indexed_frames_rates_and_lattices():
    model = RunModel()
    rng = np.random.default_rng(3)
    frame = 0
    tp_cells = []
    for _ in range(40):  # tP cells scattered by 0.5 A in a and b, 1.5 A in c
        cell = (58.3 + rng.normal(0, 0.5), 0.0, 152.4 + rng.normal(0, 1.5), 90, 90, 90)
        cell = (cell[0], cell[0], *cell[2:])
        tp_cells.append(cell)
        model.add_result(result(1, frame, indexed=True, cell=cell))
        frame += 1
    for _ in range(10):
        model.add_result(result(1, frame, indexed=True, lattice="mP", space_group="P2", cell=(45, 55, 70, 90, 100, 90)))
        frame += 1
    for _ in range(25):  # hits the indexer could not index
        model.add_result(result(1, frame, indexed=False))
        frame += 1
    for _ in range(25):  # no hits: not tried
        model.add_result(result(1, frame, hit=False))
        frame += 1
    # A frame's second result (a reader's repeat) counts once, as the series' counts do.
    model.add_result(result(1, 0, indexed=True, lattice="cI", space_group="I23", cell=(70, 70, 70, 90, 90, 90)))
    entry = model.delta(0)["series"][0]
    counts, ix = entry["counts"], entry["indexing"]
    assert (counts["results"], counts["hits"]) == (100, 75)
    assert (ix["indexed"], ix["tried"]) == (50, 75)
    assert ix["rate_of_hits"] == pytest.approx(50 / 75, abs=1e-4) and ix["rate_of_frames"] == 0.5
    tp, mp = ix["lattices"]
    assert (tp["lattice"], tp["space_group"], tp["frames"], tp["fraction"]) == ("tP", "P4", 40, 0.8)
    assert (mp["lattice"], mp["space_group"], mp["frames"]) == ("mP", "P2", 10)
    want = np.median(np.array(tp_cells), axis=0)
    np.testing.assert_allclose(tp["cell"], want, atol=0.01)
    # The spread: a standard deviation for normally scattered cells (0.5 and 1.5 A here), 0 where none.
    assert 0.25 < tp["cell_spread"][0] < 0.8 and 0.8 < tp["cell_spread"][2] < 2.4 and tp["cell_spread"][3] == 0
    assert mp["cell"] == [45, 55, 70, 90, 100, 90] and mp["cell_spread"] == [0] * 6
    # Each point says whether it indexed (the strip chart marks them), and an indexed frame's crystal is kept.
    points = {p["frame"]: p for p in entry["points"]}
    assert points[0]["indexed"] is True and points[60]["indexed"] is False and points[90]["indexed"] is None
    crystal = model.crystal("1", 45)
    assert crystal["lattice"] == "mP" and crystal["orientation_matrix"] == A and crystal["n_indexed"] == 300
    assert model.crystal("1", 60) is None and model.crystal("1", 90) is None
    # The repeat of frame 0 replaced its point and crystal (the frame view shows the latest), not the counts.
    assert model.crystal("1", 0)["lattice"] == "cI"
    # Unchanged series are not sent again: a browser holding this version gets no indexing block.
    model.add_result(result(2, 0, hit=False))
    later = model.delta(model.version - 1)["series"]
    assert "indexing" in later[0] and "indexing" not in later[1]


def test_lattice_rows_and_cells_kept_stay_bounded():
    """However many lattices and cells come, a series keeps MAX_LATTICES rows (the rest counted as other) and
    MAX_CELLS cells per row (a uniform sample: its median is the whole's), and the crystals of the latest
    MAX_SPOT_FRAMES indexed frames."""
    model = RunModel()
    n = 3 * MAX_CELLS
    for frame in range(n):  # a drifting cell: the sample must come from all of the series, not its start
        model.add_result(result(1, frame, indexed=True, cell=(50 + 20 * frame / n, 60, 70, 90, 90, 90)))
    for k in range(MAX_LATTICES + 3):
        model.add_result(result(1, n + k, indexed=True, lattice="aP", space_group=f"X{k}"))
    for frame in range(n + 100, n + 100 + MAX_SPOT_FRAMES):
        model.add_result(result(1, frame, indexed=True))
    ix = model.delta(0)["series"][0]["indexing"]
    assert len(ix["lattices"]) == MAX_LATTICES and ix["other"] == 4
    assert ix["indexed"] == n + MAX_LATTICES + 3 + MAX_SPOT_FRAMES
    first = ix["lattices"][0]
    assert first["cells_used"] == MAX_CELLS and first["frames"] == n + MAX_SPOT_FRAMES
    view = model.find("1")
    assert len(view.indexed_frames) == MAX_SPOT_FRAMES and min(view.indexed_frames) == n + 100
    rows = view.indexing.rows[("tP", "P4")]
    assert len(rows.cells) == 6 * MAX_CELLS


def test_model_memory_levels_off_over_many_indexed_series():
    """Series full of indexed hits: after the warm-up (MAX_SERIES kept) the model's memory stays where it is."""
    import tracemalloc

    from intxr.gui.server import handle_message

    def messages(s: int):
        for frame in range(100):
            body = result(
                s,
                frame,
                indexed=frame % 3 != 0,
                series_name=f"series_{s:06d}",
                cell=(58 + frame % 7 * 0.1, 58, 152, 90, 90, 90),
            )
            yield [b"result", json.dumps(body).encode()]

    model = RunModel()
    traced = {}
    tracemalloc.start()
    try:
        for s in range(1, 2 * MAX_SERIES + 1):
            for parts in messages(s):
                handle_message(model, parts)
            if s % MAX_SERIES == 0:
                model.delta(0)
                traced[s] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert model.bad_messages == 0 and len(model.series) == MAX_SERIES
    assert model.delta(0)["series"][0]["indexing"]["indexed"] == 66
    assert traced[2 * MAX_SERIES] - traced[MAX_SERIES] < 256 << 10, traced


def test_frame_view_predictions_in_view_pixels_or_the_reason_there_are_none():
    """The frame API's predicted spots: the prediction's, scaled as the view is; none, with the reason, for a frame
    not indexed, one whose crystal is no longer kept, a frame without geometry, or a matrix no crystal has."""
    from intxr.geometry import Geometry
    from intxr.gui.frames import predicted as predicted_spots
    from intxr.gui.frames import render
    from intxr.reader.predict import predict_spots

    geometry = Geometry.simple(
        wavelength=1.0, distance=250.0, beam_center=(1231.5, 1263.5), pixel_size=(0.172, 0.172), image_size=(2463, 2527)
    )
    data = np.random.default_rng(1).poisson(2, (2527, 2463)).astype(np.uint32)
    rendered = render(data, geometry, None)
    model = RunModel()
    model.add_result(result(1, 5, indexed=True))
    crystal = model.crystal("1", 5)
    predicted, note = predicted_spots(rendered, model.point("1", 5), crystal)
    want = predict_spots(geometry, A).xy / rendered.scale
    assert note is None and rendered.scale == 3 and len(predicted) == len(want) > 1000
    np.testing.assert_allclose(predicted, want, atol=0.006)
    assert predicted_spots(rendered, {"indexed": False}, None) == ([], "not indexed")
    assert "no longer kept" in predicted_spots(rendered, {"indexed": True}, None)[1]
    no_geometry = render(data, None, None)
    assert predicted_spots(no_geometry, {"indexed": True}, crystal) == (
        [],
        "the master file has no complete geometry to predict with",
    )
    huge = {**crystal, "orientation_matrix": [[1e-4, 0, 0], [0, 1e-4, 0], [0, 0, 1e-4]]}  # a cell of 10^4 A
    predicted, note = predicted_spots(rendered, {"indexed": True}, huge)
    assert predicted == [] and "too large" in note


# ---- the real pipeline, `intxr gui` and the page ---------------------------------------------------------------

INDEXING = """[DEFAULT]
processing_mode = indexing
target_unit_cell = 57.8,57.8,150,90,90,90
target_space_group = P41212
exposure_time_cutoff = 0.01
"""


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _pixels_of(png: bytes, rgb: tuple[int, int, int]) -> int:
    """Pixels of a screenshot in about this colour (what the page really drew, not what it says)."""
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(rgb, np.int16)) < 40).all(axis=2).sum())


def test_indexed_hits_reach_the_page_with_lattices_and_predicted_spots(tmp_path, thaumatin_cbfs):
    from browser import Browser, chromium_or_skip
    from test_gui import _wait_until_served
    from test_pipeline import _free_ports, daemon_command, write_config

    chromium = chromium_or_skip()
    (tmp_path / "processing.cfg").write_text(INDEXING)
    [gui_port] = _free_ports(1)
    config, _keys = write_config(
        tmp_path,
        send_to_ui="False",
        raster_row_length="4",
        gui_port=gui_port,
        simulate_rate="6",
        processing_config_file=str(tmp_path / "processing.cfg"),
    )
    gui = subprocess.Popen([str(EXE / "intxr"), "gui", "-c", str(config), "-b", "t"], stderr=subprocess.PIPE, text=True)
    browser = None
    doc = "Bokeh.documents[0].get_model_by_name"
    try:
        url = f"http://127.0.0.1:{gui_port}/"
        _wait_until_served(url)
        browser = Browser(chromium, height=1700)
        browser.goto(url)
        run = subprocess.run(
            daemon_command(config, "-n", "2", "--max_series", "1", "--simulate", *thaumatin_cbfs),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr
        browser.wait_for(f"{doc}('strip').data.frame.length === 12")
        state = _get(f"{url}api/state")
        [series] = state["series"]
        ix = series["indexing"]
        strip = browser.model("strip")
        points = dict(zip(strip["frame"], zip(strip["hit"], strip["indexed"], strict=True), strict=True))
        indexed = sorted(f for f, (_, i) in points.items() if i == 1)
        hits = sum(1 for h, _ in points.values() if h)
        assert len(indexed) >= 8 and hits == 10 and ix["indexed"] == len(indexed), points
        # Indexed frames are ringed on the strip chart.
        assert sorted(browser.model("strip_indexed")["frame"]) == indexed
        # The series panel: the count, both rates and the lattice table, as the server summed them up.
        assert ix["rate_of_hits"] == pytest.approx(len(indexed) / hits, abs=1e-4)
        assert ix["rate_of_frames"] == pytest.approx(len(indexed) / 12, abs=1e-4)
        browser.wait_for(f"/indexed<span[^>]*>{len(indexed)}</.test({doc}('indexing').text)")
        counts = browser.model("indexing", "text")
        assert f">{round(100 * len(indexed) / hits)}%<" in counts
        lattices = browser.model("lattices")
        assert (lattices["lattice"], lattices["space_group"], lattices["frames"]) == (["tP"], ["P4"], [len(indexed)])
        assert lattices["share"] == ["100%"]
        a, spread = (float(v) for v in lattices["a"][0].split("±"))
        assert abs(a - 58.7) < 0.03 * 58.7 and 0 <= spread < 2, lattices  # DIALS's median on these frames: 58.7
        assert lattices["alpha"][0].startswith("90.00") and lattices["gamma"][0].startswith("90.00")
        # The rates over time: hits and indexed frames per second.
        timeline = browser.wait_for(f"(d => d.t.length > 0 && d)({doc}('timeline').data)")
        assert max(v for v in timeline["indexing_rate"] if v is not None) > 0
        # The frame view of an indexed hit: its crystal and the predicted spots, from the API and on the page.
        frame = indexed[len(indexed) // 2]
        info = _get(f"{url}api/frame?series=1&frame={frame}")
        assert info["indexing"]["lattice"] == "tP" and info["predicted_note"] is None
        scale = info["scale"]
        predicted = np.array(info["predicted"]) * scale
        found = np.array(info["spots"]) * scale
        assert len(predicted) > 1000 and len(found) > 100
        assert (
            (predicted >= 0).all()
            and (predicted[:, 0] < info["detector_shape"][1]).all()
            and (predicted[:, 1] < info["detector_shape"][0]).all()
        )
        nearest = np.array([np.hypot(*(predicted - s).T).min() for s in found])
        print(
            f"frame {frame}: {len(predicted)} predicted, {len(found)} spots kept, "
            f"{(nearest <= 2).mean():.0%} within 2 px of a prediction"
        )
        assert (nearest <= 2).mean() > 0.5
        # A click on the frame's cell of the raster map opens it.
        raster = browser.model("raster")
        row, col = next(
            (r, c) for r, c, f in zip(raster["row"], raster["col"], raster["frame"], strict=True) if f == frame
        )
        crystals = browser.model("crystals")
        # Inside a crystal's box a click opens the crystal's best frame: then pick the frame's cell outside one,
        # or, where every hit is in the box, the best frame itself.
        inside = any(
            lf < col < rt and tp < row < bt
            for lf, rt, tp, bt in zip(
                crystals["left"], crystals["right"], crystals["top"], crystals["bottom"], strict=True
            )
        )
        if inside:
            frame = int(crystals["best_frame"][0])
            row, col = next(
                (r, c) for r, c, f in zip(raster["row"], raster["col"], raster["frame"], strict=True) if f == frame
            )
            info = _get(f"{url}api/frame?series=1&frame={frame}")
        browser.click_at("raster_plot", col, row)
        view = browser.wait_for(
            f"(d => d.frame[0] === {frame} && d.loaded[0] && d.pinned[0] && d)({doc}('frame').data)",
            explain=f"{doc}('frame_note').text",
        )
        assert view["predicted"][0] == len(info["predicted"]) == browser.column_length("frame_predicted", "x")
        if info["indexing"] is not None:
            assert "indexed tP P4 58." in browser.model("frame_note", "text")
        shot = browser.screenshot("frame_plot")
        (tmp_path / "gui_indexing.png").write_bytes(browser.screenshot())  # kept with the test's files, to look at
        teal, pink = _pixels_of(shot, (0, 166, 166)), _pixels_of(shot, (231, 41, 138))
        assert teal > 2000 and pink > 100, (teal, pink)
        # The toggle: off, no predicted marker drawn (the found spots' circles stay); on again, back.
        browser.click_widget("show_predicted")
        browser.wait_for(f"!{doc}('show_predicted').active")
        time.sleep(0.5)  # the server hides the glyph; the page redraws
        shot = browser.screenshot("frame_plot")
        assert _pixels_of(shot, (0, 166, 166)) < teal / 20 and _pixels_of(shot, (231, 41, 138)) > 100
        browser.click_widget("show_predicted")
        time.sleep(0.5)
        assert _pixels_of(browser.screenshot("frame_plot"), (0, 166, 166)) > teal / 2
        # A frame that did not index predicts nothing, and says why.
        blank = next(f for f, (h, _) in points.items() if not h)
        info = _get(f"{url}api/frame?series=1&frame={blank}")
        assert info["predicted"] == [] and info["indexing"] is None and info["predicted_note"] == "not indexed"
    finally:
        gui.terminate()
        _, err = gui.communicate(timeout=10)
        if browser is not None:
            browser.close()
    assert "Traceback" not in err, err
