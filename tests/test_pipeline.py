"""The whole pipeline under a real mpirun: simulated detector -> Splitter -> Readers -> Collector,
on loopback, with the real thaumatin frames; result lines, accounting, HDF5, a killed reader,
SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import pytest
import zmq

from intxr import config as cfg
from intxr.images import open_source
from intxr.reader.spotfinder import SpotFinder, SpotFinderParams
from intxr.simulate import pixels_for
from intxr.testing import free_ports

EXE = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    return free_ports(n)


def write_config(tmp_path: Path, **overrides) -> tuple[Path, dict]:
    detector, port, pub, collector, results, ui = _free_ports(6)
    keys = {
        "beamline": "test",
        "custom_keys": "mapping, reporting, master_file",
        "filepath_key": "master_file",
        "run_mode_key": "mapping",
        "host": "127.0.0.1",
        "port": port,
        "splitter_pub_port": pub,
        "collector_port": collector,
        "results_pub_port": results,
        "uihost": "127.0.0.1",
        "uiport": ui,
        "send_to_ui": "True",
        "timeout": "3",
        "detector_endpoint": f"tcp://127.0.0.1:{detector}",
        "output_dir": str(tmp_path / "data"),
        "simulate_protocol": "cbftoeiger",
        "simulate_rate": "8",
        "skip_after": "20",
        **overrides,
    }
    path = tmp_path / "startup.cfg"
    path.write_text("[t]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return path, keys


class UiListener:
    """What BluIce would read: a PULL socket bound at uihost:uiport."""

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


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """A failed test must not leave a daemon and its MPI job running."""
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def daemon_command(config: Path, *args: str) -> list[str]:
    """`intxrd` on section [t] of a config from write_config."""
    return [str(EXE / "intxrd"), "-c", str(config), "-b", "t", *args]


def daemon(config: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        daemon_command(config, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    RUNNING.append(proc)
    return proc


def records(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "frame" in r], [r["summary"] for r in rows if "summary" in r]


def processing_config(tmp_path: Path, **rastering) -> Path:
    """The bundled processing config with [rastering] keys changed."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(Path(cfg.__file__).parent / "configs" / "processing.cfg")
    for key, value in rastering.items():
        parser["rastering"][key] = str(value)
    path = tmp_path / "processing.cfg"
    with open(path, "w") as f:
        parser.write(f)
    return path


def test_every_real_frame_gets_its_result_line_under_mpirun(tmp_path, thaumatin_cbfs):
    from intxr.gui.model import RunModel
    from intxr.gui.server import subscribe

    # A hit takes 10 spots in [DEFAULT] and 1000 in [rastering], the run mode of these frames: the
    # readers decide with [rastering], and the SERIES line and the GUI say their word.
    processing = processing_config(tmp_path, min_bragg_peaks=1000)
    config, keys = write_config(tmp_path, processing_config_file=str(processing))
    ui = UiListener(keys["uiport"])
    record = tmp_path / "results.jsonl"
    gui, stop = RunModel(), threading.Event()
    subscriber = subscribe(gui, f"tcp://127.0.0.1:{keys['results_pub_port']}", stop)
    try:
        proc = daemon(config, "-n", "3", "--max_series", "1", "--verbose", "--record", str(record),
                      "--simulate", *thaumatin_cbfs)
        out, err = proc.communicate(timeout=240)
        time.sleep(0.3)
    finally:
        ui.close()
        stop.set()
        subscriber.join(5)
    assert proc.returncode == 0, err
    assert re.search(r"rank +2 reader .* on CPU \d", err), err  # every rank says where it runs
    results, summaries = records(record)
    assert sorted(r["frame"] for r in results) == list(range(1, 13))  # cbfToEiger counts from 1
    # The spot finder run directly on the same pixels, with the section the run mode picks.
    loaded = cfg.load(str(config), "t")
    section = loaded.processing.for_run_mode("rastering")
    by_frame = {r["frame"]: r for r in results}
    for k, path in enumerate(thaumatin_cbfs, start=1):
        image = open_source(path).read(0)
        expected = SpotFinder(SpotFinderParams.from_processing(section), image.geometry).find(
            pixels_for(image.data, "bs32-lz4")
        )
        r = by_frame[k]
        assert r["processing_section"] == section.name == "rastering" and r["algorithm"] == "dispersion"
        assert r["hit"] is (not expected.prescreened and expected.score.n_spots >= 1000)
        assert r["status"] == ("blank" if expected.prescreened else "processed")
        assert r["n_spots"] == expected.score.n_spots, (k, r["n_spots"], expected.score.n_spots)
        assert r["score"] == expected.score.score
        assert set(r["timing"]) >= {"receive", "decode", "total"}
    statuses = [by_frame[k]["status"] for k in range(1, 13)]
    assert statuses[:10] == ["processed"] * 10 and statuses[10:] == ["blank"] * 2  # hits are hits, blanks blank
    assert all(by_frame[k]["n_spots"] >= 10 for k in range(1, 11))
    # The result lines: printed with --verbose and sent to the UI endpoint, identical.
    printed = [line for line in out.splitlines() if line.startswith("RESULTS:")]
    assert len(printed) == 12 and sorted(printed) == sorted(p for p in ui.lines if p.startswith("RESULTS:"))
    # The run mode is rastering: one RASTER line after them (to the UI and stdout). No grid position
    # and no raster_row_length: the scan is one row, so its crystals are the runs of hit frames.
    [raster] = [p for p in ui.lines if p.startswith("RASTER:")]
    assert ui.lines[-1] == raster and raster in out.splitlines()
    hit_frames = sorted(r["frame"] for r in results if r["hit"])
    runs = 1 + sum(b - a > 1 for a, b in zip(hit_frames, hit_frames[1:], strict=False)) if hit_frames else 0
    crystals = [c.split() for c in re.findall(r"\{([^{}]*) \{[^{}]*\}\}", raster)]
    assert raster.startswith(f"RASTER: series 1 crystals {runs} ") and len(crystals) == runs, (raster, hit_frames)
    assert sum(int(c[5]) for c in crystals) == len(hit_frames) and all(c[1] == "0.00" for c in crystals)
    best = max((r for r in results if r["hit"]), key=lambda r: (r["score"], r["n_spots"], -r["frame"]))
    assert int(crystals[0][8]) == best["frame"] and float(crystals[0][4]) == best["score"]
    line = next(p for p in printed if " frame 3 " in p)
    assert re.fullmatch(
        r"RESULTS: series 1 frame 3 result \{\d+ \d+ \d+ \d+\.\d\d \d+ \d+\.\d\d NA NA NA NA NA NA NA \{.*\}\} "
        r"mapping \{rastering\} filename intxr_sim_000001_master\.h5",
        line,
    ), line
    [summary] = summaries
    assert summary["received"] == summary["written"] == 12
    hits = sum(r["hit"] for r in results)
    assert 0 < hits < sum(r["status"] == "processed" and r["n_spots"] >= 10 for r in results)  # sections disagree
    assert (summary["processed"], summary["hits"], summary["blank"], summary["skipped"], summary["failed"]) == (
        10, hits, 2, 0, 0)
    assert f"SERIES 1: received 12, written 12, processed 10 (hits {hits}" in out
    [shown] = gui.delta(0)["series"]  # what the GUI shows: the same hits, counted and per point
    assert (shown["counts"]["hits"], shown["counts"]["ended"], len(shown["points"])) == (hits, True, 12)
    assert sum(p["hit"] for p in shown["points"]) == hits
    with h5py.File(Path(keys["output_dir"]) / "intxr_sim_000001_master.h5") as f:
        assert f["entry/data/data_000001"].shape == (12, 2527, 2463)


def _stream_lines(pipe, sink: list[str]) -> threading.Thread:
    def run():
        for line in pipe:
            sink.append(line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_killed_reader_is_reported_and_every_frame_is_accounted(tmp_path, thaumatin_cbfs):
    config, keys = write_config(tmp_path, simulate_rate="4", send_to_ui="False")
    record = tmp_path / "results.jsonl"
    sources = [*thaumatin_cbfs, *thaumatin_cbfs]  # 24 frames, 6 s
    proc = daemon(config, "-n", "3", "--max_series", "1", "--verbose", "--record", str(record),
                  "--simulate", *sources)
    out: list[str] = []
    err: list[str] = []
    threads = [_stream_lines(proc.stdout, out), _stream_lines(proc.stderr, err)]
    deadline = time.monotonic() + 120
    pid = None
    while time.monotonic() < deadline and pid is None:
        for line in err:
            m = re.search(r"rank +1 reader .* pid (\d+)", line)
            if m:
                pid = int(m.group(1))
        time.sleep(0.1)
    assert pid, "".join(err)
    while time.monotonic() < deadline and sum(line.startswith("RESULTS:") for line in out) < 3:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    proc.wait(240)
    for t in threads:
        t.join(10)
    results, [summary] = records(record)
    assert summary["received"] == 24 and summary["written"] == 24
    accounted = summary["processed"] + summary["blank"] + summary["skipped"] + summary["failed"]
    assert accounted == 24, summary
    ranges = summary["skipped_ranges"] + summary["lost_ranges"]
    frames = [r["frame"] for r in results] + [f for first, last in ranges for f in range(first, last + 1)]
    assert sorted(frames) == list(range(1, 25))  # each frame once
    assert any(r["rank"] == 2 for r in results)  # the other reader went on
    assert any(f"reader rank 1 (pid {pid}" in line and "died" in line for line in err), "".join(err)
    assert any("reader rank 1 replaced" in line for line in err), "".join(err)


def test_sigterm_drains_and_leaves_complete_files(tmp_path, thaumatin_cbfs):
    config, keys = write_config(tmp_path, simulate_rate="5", send_to_ui="False")
    proc = daemon(config, "-n", "2", "--verbose", "--simulate", *thaumatin_cbfs[:4])  # loops until stopped
    out: list[str] = []
    err: list[str] = []
    threads = [_stream_lines(proc.stdout, out), _stream_lines(proc.stderr, err)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(line.startswith("RESULTS:") for line in out) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, "".join(err)
    for t in threads:
        t.join(10)
    summaries = [line for line in out if line.startswith("SERIES ")]
    assert summaries, "".join(out)
    masters = sorted(Path(keys["output_dir"]).glob("*_master.h5"))
    assert masters
    splitter_line = next(line for line in err if "splitter:" in line and "frames received" in line)
    written = int(re.search(r"(\d+) written", splitter_line).group(1))
    total = 0
    for master in masters:
        with h5py.File(master) as f:
            total += sum(f["entry/data"][k].shape[0] for k in f["entry/data"] if k.startswith("data_"))
    assert total == written > 0


def test_a_broken_config_stops_the_daemon_before_anything_starts(tmp_path):
    config, _ = write_config(tmp_path, output_format="series, frame, result {}, nosuchkey")
    result = subprocess.run(daemon_command(config), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"{config}: [t] output_format" in result.stderr and "nosuchkey" in result.stderr


@pytest.mark.parametrize("prog", ["intxrd", "connect_mpi"])
def test_both_names_run_the_dry_run(prog, tmp_path):
    config, _ = write_config(tmp_path)
    result = subprocess.run([str(EXE / prog), "-c", str(config), "-b", "t", "--dry_run", "-n", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--map-by core --bind-to core --enable-recovery --np 2" in result.stdout
    assert "-m intxr.pipeline" in result.stdout


def test_an_absent_ui_listener_costs_nothing_and_drops_are_counted(tmp_path, thaumatin_cbfs):
    config, _ = write_config(tmp_path, send_to_ui="True", simulate_rate="10")  # nobody listens on uiport
    proc = daemon(config, "-n", "2", "--max_series", "1", "--simulate", *thaumatin_cbfs[:4])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SERIES 1: received 4, written 4" in out
    assert "0 result lines sent to" in err and "5 dropped" in err  # 4 result lines and the RASTER line
