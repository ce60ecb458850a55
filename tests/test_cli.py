"""The command line as users run it: real processes, real sockets, real frames."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pytest
import zmq

from intxr import cli


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def exe(name: str) -> str:
    return str(__import__("pathlib").Path(sys.executable).parent / name)


@pytest.mark.parametrize("sub", ["simulate", "monitor", "splitter", "find-spots", "gui", "config", "version"])
def test_subcommand_help(sub):
    result = run(exe("intxr"), sub, "--help")
    assert result.returncode == 0 and "usage: intxr " + sub in result.stdout


@pytest.mark.parametrize("prog", ["intxrd", "connect_mpi"])
def test_daemon_help_keeps_the_original_option_names(prog):
    result = run(exe(prog), "--help")
    assert result.returncode == 0
    for option in [
        "--config_file",
        "--beamline",
        "--n_proc",
        "--mpi_bind",
        "--host",
        "--hostfile",
        "--verbose",
        "--dry_run",
        "--time",
        "--record",
        "--result_format",
    ]:
        assert option in result.stdout, option


def test_version_reports_what_is_really_loaded():
    import importlib
    import pkgutil

    from intxr import _kernels

    result = run(exe("intxr"), "version")
    assert result.returncode == 0, result.stderr
    kernels = sorted(m.name for m in pkgutil.iter_modules(_kernels.__path__))
    assert {"cbf", "dispersion", "prescreen"} <= set(kernels)  # the three built from cython_ext/
    for name in kernels:
        importlib.import_module(f"intxr._kernels.{name}")
    assert f"  cython kernels: {', '.join(kernels)}\n" in result.stdout
    assert "rust core (intxr._splitter)" in result.stdout and ", links HDF5 " in result.stdout
    from intxr import _splitter

    if hasattr(_splitter, "hdf5_version"):  # the HDF5 the Splitter's writer links, not h5py's
        assert f", links HDF5 {_splitter.hdf5_version()}\n" in result.stdout
    import h5py

    assert f"(HDF5 {h5py.version.hdf5_version})" in result.stdout
    from mpi4py import MPI

    assert f"  MPI: {MPI.Get_library_version().splitlines()[0].split(', package:')[0]}" in result.stdout


def test_config_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "startup.cfg"
    bad.write_text("[bl]\nport = many\n")
    result = run(exe("intxrd"), "-c", str(bad), "-b", "bl")
    assert result.returncode == 2
    assert result.stderr.strip() == f"intxrd: error: {bad}: [bl] port = 'many': expected an integer 1-65535"
    result = run(exe("connect_mpi"), "-b", "nosuchbeamline")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[nosuchbeamline]: no such beamline section" in result.stderr


def test_simulate_bad_source_is_one_line():
    result = run(exe("intxr"), "simulate", "--endpoint", "tcp://127.0.0.1:0", "nosuch.cbf")
    assert result.returncode == 2 and result.stderr.strip() == "intxr: error: nosuch.cbf: no such file"


def test_config_command_validates_shipped_configs():
    result = run(exe("intxr"), "config")
    assert result.returncode == 0 and "[demo] ok" in result.stdout and "[12-1] ok" in result.stdout


def test_gui_needs_somewhere_to_get_results():
    result = run(exe("intxr"), "gui", "--port", "8999")
    assert result.returncode == 2 and "--results ENDPOINT" in result.stderr


def test_dry_run_shows_the_plan():
    result = run(exe("intxrd"), "-b", "demo", "--dry_run")
    assert result.returncode == 0
    assert "intxr simulate --protocol cbftoeiger --endpoint tcp://127.0.0.1:5599" in result.stdout


def test_monitor_counts_bad_messages_and_goes_on():
    """Malformed messages are reported and counted; the frames after them still come through."""
    from intxr.monitor import monitor
    from intxr.simulate import Simulator, SimulatorSettings

    push = zmq.Context.instance().socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    sim = Simulator(["synthetic:256x256:3"], SimulatorSettings())

    def feed():
        push.send_multipart([b'{"htype":"dimage-1.0","frame":0}', b"{not json"])
        push.send_multipart([b"\x00\x01garbage"])
        push.send_multipart(
            [
                b'{"htype":"dimage-1.0","series":1,"frame":0}',
                b'{"htype":"dimage_d-1.0","shape":[4,4],"type":"uint16","encoding":"bs16-lz4<","size":3}',
                b"abc",
                b'{"htype":"dconfig-1.0"}',
            ]
        )
        for parts, _ in sim.series_messages(1):
            push.send_multipart(parts)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    counters = monitor(f"tcp://127.0.0.1:{port}", max_series=1, timeout=20, out=io.StringIO())
    thread.join(10)
    push.close()
    assert counters.errors == 3
    assert counters.frames == 3 and counters.series_ended == 1
    assert counters.last_error.startswith("series 1 frame 0: truncated blob")


def test_default_sources_prefer_the_real_frames(thaumatin_cbfs):
    assert cli.default_sources() == thaumatin_cbfs


def test_find_spots_json_matches_dials_reference(thaumatin_cbfs):
    from intxr.testing import shared_path

    result = run(exe("intxr"), "find-spots", thaumatin_cbfs[0], "--algorithm", "dispersion", "--json")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    frame = json.loads(line)
    reference = json.loads(shared_path("reference", "thaumatin_grid", "thau_3_2_0001.dispersion.json").read_text())
    assert frame["file"] == thaumatin_cbfs[0] and frame["frame"] == 0
    assert frame["n_strong_pixels"] == reference["n_strong_pixels"]
    assert len(frame["spots"]) == reference["n_spots"]
    assert frame["spots"][0]["bbox"] == reference["spots"][0]["bbox"]
    for key in ("n_spots_total", "n_spots_no_ice", "n_spots_4A"):
        assert frame[key] == reference["stats"][key]
    assert frame["estimated_d_min"] == pytest.approx(reference["stats"]["estimated_d_min"])
    assert {"read", "threshold", "spots", "stats"} <= set(frame["timing"])  # + prescreen: [DEFAULT] has it on
    assert frame["score"]["score"] == 6 and frame["score"]["n_spots"] == 253
    assert frame["processing_section"] == "DEFAULT" and frame["algorithm"] == "dispersion"
    # The real read and decode of a .cbf.bz2 (bunzip2 of ~6 MB, then the byte-offset decode) takes time.
    assert frame["timing"]["read"] > 0.02


def test_find_spots_processing_section_picks_the_section(thaumatin_cbfs):
    """The issue's case: find-spots said 303 spots where the demo's line (run mode rastering) said 253."""
    counts = {}
    for section in ("DEFAULT", "rastering"):
        result = run(exe("intxr"), "find-spots", thaumatin_cbfs[0], "--processing-section", section, "--json")
        assert result.returncode == 0, result.stderr
        frame = json.loads(result.stdout)
        assert frame["processing_section"] == section
        counts[section] = (frame["algorithm"], frame["n_spots"], frame["score"]["n_spots"])
    assert counts["DEFAULT"] == ("dispersion_extended", 303, 266)
    assert counts["rastering"] == ("dispersion", 288, 253)  # the demo's `{253 0 6 2.19 ...}`
    verbose = run(exe("intxr"), "find-spots", thaumatin_cbfs[0], "--processing-section", "rastering", "--verbose",
                  "--sigma-s", "3")
    assert verbose.returncode == 0, verbose.stderr
    lines = verbose.stdout.splitlines()
    assert lines[0].startswith("processing section [rastering] of ") and "algorithm dispersion" in lines[0]
    assert "  spf_d_max = 40  (file:[rastering])" in lines and "  spf_sigma_strong = 3  (CLI)" in lines
    assert lines[-1].endswith("| [rastering] dispersion")


def test_find_spots_takes_a_processing_file(tmp_path, thaumatin_cbfs):
    proc = tmp_path / "proc.cfg"
    proc.write_text("[DEFAULT]\nspf_algorithm = dispersion\n[strict]\nmin_Bragg_peaks = 1000\n")
    result = run(exe("intxr"), "find-spots", thaumatin_cbfs[0], "-c", str(proc), "--processing-section", "strict",
                 "--json")
    assert result.returncode == 0, result.stderr
    frame = json.loads(result.stdout)
    assert frame["algorithm"] == "dispersion" and frame["processing_section"] == "strict"
    assert frame["processing_file"] == str(proc)
    assert frame["score"]["errors"] and frame["n_spots"] == 288  # too few for min_Bragg_peaks = 1000
    result = run(exe("intxr"), "find-spots", thaumatin_cbfs[0], "-c", str(proc), "--processing-section", "nosuch")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"intxr: error: {proc}: [nosuch]: no such processing section (sections: DEFAULT, strict)")


def test_find_spots_on_npy_needs_and_takes_geometry(tmp_path, thaumatin_cbfs):
    from intxr.images import read_cbf

    frame = read_cbf(thaumatin_cbfs[0])
    np_path = tmp_path / "frame.npy"
    __import__("numpy").save(np_path, frame.data)
    result = run(exe("intxr"), "find-spots", str(np_path))
    assert result.returncode == 2 and "no geometry in the file" in result.stderr
    g = frame.geometry
    result = run(
        exe("intxr"),
        "find-spots",
        str(np_path),
        "--json",
        "--algorithm",
        "dispersion",
        "--distance",
        str(g.distance),
        "--pixel-size",
        "0.172",
        "--wavelength",
        str(g.wavelength),
        "--beam-center",
        str(g.beam_center[0]),
        str(g.beam_center[1]),
        "--count-cutoff",
        "115897",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_strong_pixels"] == 2172


def test_find_spots_bad_arguments_are_one_line():
    result = run(exe("intxr"), "find-spots", "nosuch.cbf")
    assert result.returncode == 2 and result.stderr.strip() == "intxr: error: nosuch.cbf: no such file"
    result = run(exe("intxr"), "find-spots", "x.cbf", "--kernel-size", "a,b")
    assert result.returncode == 2 and "'a,b': expected one or two integers" in result.stderr
