"""Startup and processing configs: the shipped files load, and every error names file, section and key."""

from __future__ import annotations

import textwrap

import pytest

from intxr import config as cfg
from intxr.config import ConfigError


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_configs_load_every_section():
    path = cfg.default_startup_file()
    sections = cfg.beamline_sections(path)
    assert {"demo", "12-1", "12-2"} <= set(sections)
    for name in sections:
        loaded = cfg.load(path, name)
        assert loaded.beamline.name == name
        assert set(loaded.processing.sections) == {"DEFAULT", "spotfinding", "rastering", "screening"}


def test_demo_section_values_and_inheritance():
    bl = cfg.load_beamline(cfg.default_startup_file(), "demo")
    assert bl.detector_endpoint == "tcp://127.0.0.1:5599" and bl.reader_endpoint == "tcp://127.0.0.1:5600"
    assert bl.custom_keys == ("mapping", "reporting", "master_file")
    assert bl.timeout == 10.0
    assert bl.output_format == ("reporting", "series", "frame", "result {}", "mapping {}", "filename")
    assert bl.default_output_prefix == "RESULTS:" and bl.output_delimiter is None  # inherited from DEFAULT
    twelve = cfg.load_beamline(cfg.default_startup_file(), "12-1")
    assert twelve.simulate is None and twelve.frames_per_file == 1000


def test_processing_sections_by_run_mode():
    processing = cfg.load_processing(str(cfg.PACKAGE_CONFIGS / "processing.cfg"))
    assert processing.for_run_mode("rastering.row3").name == "rastering"
    assert processing.for_run_mode("row3.rastering", index=1).name == "rastering"
    assert processing.for_run_mode("nosuchmode").name == "DEFAULT"
    assert processing.for_run_mode(None).name == "DEFAULT"
    assert processing.for_run_mode("rastering", index=4).name == "DEFAULT"
    raster = processing.sections["rastering"]
    assert raster.spf_d_max == 40.0 and raster.spf_algorithm == "dispersion"
    assert raster.min_bragg_peaks == 10 and raster.spf_kernel_size == (3, 3)  # inherited
    assert processing.default.spf_d_min is None and processing.default.spf_global_threshold == 0.0


def test_original_interceptor_processing_file_loads_with_legacy_keys_ignored(tmp_path):
    path = write(
        tmp_path,
        "proc.cfg",
        """
        [DEFAULT]
        processing_mode = indexing
        processing_phil_file = None
        spf_calculate_score = True
        spf_d_max = None
        spf_d_min = None
        spf_good_spots_only = True
        spf_ice_filter = True
        min_Bragg_peaks = 10
        exposure_time_cutoff = 0.1
        use_ai = True
        resolution_model = None
    """,
    )
    loaded = cfg.load_processing(path)
    assert loaded.default.processing_mode == "indexing"
    assert loaded.ignored_keys == ("resolution_model", "use_ai")


@pytest.mark.parametrize(
    "body,message",
    [
        ("[bl]\nport = abc\n", "[bl] port = 'abc': expected an integer 1-65535"),
        ("[bl]\nport = 70000\n", "[bl] port = '70000': expected an integer 1-65535"),
        ("[bl]\nsend_to_ui = maybe\n", "[bl] send_to_ui = 'maybe': expected True or False"),
        ("[bl]\nprotocol = v3\n", "[bl] protocol = 'v3': expected one of auto, v1, v2, cbftoeiger"),
        ("[bl]\ndetector_endpoint = 127.0.0.1:9999\n", "[bl] detector_endpoint = '127.0.0.1:9999': expected a ZeroMQ"),
        ("[bl]\ntimeout = -1\n", "[bl] timeout = '-1': expected None or a number >= 0"),
        ("[bl]\nprot = v1\n", "[bl] prot: unknown key"),
        ("[DEFAULT]\nbogus = 1\n[bl]\n", "[DEFAULT] bogus: unknown key"),
        ("[bl]\noutput_format = series, nosuchkey {}\n", "[bl] output_format: unknown output key 'nosuchkey'"),
        ("[other]\n", "[bl]: no such beamline section (sections: other)"),
        ("[bl\nport = 1\n", "not a valid INI file"),
    ],
)
def test_startup_errors_name_file_section_and_key(tmp_path, body, message):
    path = write(tmp_path, "startup.cfg", body)
    with pytest.raises(ConfigError) as err:
        cfg.load_beamline(path, "bl")
    assert str(err.value).startswith(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "body,message",
    [
        ("[DEFAULT]\nmin_Bragg_peaks = ten\n", "[DEFAULT] min_bragg_peaks = 'ten': expected an integer >= 0"),
        ("[rastering]\nspf_algorithm = fast\n", "[rastering] spf_algorithm = 'fast': expected one of dispersion"),
        ("[rastering]\nspf_kernel_size = 3,3,3\n", "[rastering] spf_kernel_size = '3,3,3': expected one or two"),
        ("[rastering]\nspf_global_threshold = high\n", "expected a number or Auto"),
        ("[rastering]\nspf_sigma_strong = 3\nspf_sigma_strog = 3\n", "[rastering] spf_sigma_strog: unknown key"),
    ],
)
def test_processing_errors_name_file_section_and_key(tmp_path, body, message):
    path = write(tmp_path, "processing.cfg", body)
    with pytest.raises(ConfigError) as err:
        cfg.load_processing(path)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nosuch.cfg: config file not found"):
        cfg.load_beamline(str(tmp_path / "nosuch.cfg"), "bl")
    startup = write(tmp_path, "startup.cfg", "[bl]\nprocessing_config_file = missing_proc.cfg\n")
    with pytest.raises(ConfigError, match="missing_proc.cfg: config file not found"):
        cfg.load(startup, "bl")


def test_processing_file_is_resolved_beside_the_startup_file(tmp_path):
    write(tmp_path, "proc.cfg", "[DEFAULT]\nmin_Bragg_peaks = 25\n")
    startup = write(tmp_path, "startup.cfg", "[bl]\nprocessing_config_file = proc.cfg\n")
    assert cfg.load(startup, "bl").processing.default.min_bragg_peaks == 25


def test_none_means_unset_and_auto_threshold(tmp_path):
    path = write(tmp_path, "p.cfg", "[DEFAULT]\nspf_gain = None\nspf_global_threshold = Auto\nspf_kernel_size = 5\n")
    default = cfg.load_processing(path).default
    assert default.spf_gain is None and default.spf_global_threshold == "Auto" and default.spf_kernel_size == (5, 5)


def test_retention_and_restarts_keys():
    demo = cfg.load_beamline(cfg.default_startup_file(), "demo")
    assert demo.output_retention_gb == 2.0 and demo.max_restarts == 5
    twelve = cfg.load_beamline(cfg.default_startup_file(), "12-1")
    assert twelve.output_retention_gb is None  # a beamline's data is never deleted unless asked


@pytest.mark.parametrize("host,bound", [("localhost", "127.0.0.1"), ("LocalHost", "127.0.0.1"),
                                        ("127.0.0.1", "127.0.0.1"), ("10.1.2.3", "10.1.2.3"), ("*", "*"),
                                        ("0.0.0.0", "*")])
def test_host_binds_exactly_there(tmp_path, host, bound):
    path = write(tmp_path, "startup.cfg", f"[bl]\nhost = {host}\nport = 7000\n")
    bl = cfg.load_beamline(path, "bl")
    assert bl.serve_bind_endpoint == f"tcp://{bound}:7000"
    assert bl.splitter_publish_bind_endpoint == f"tcp://{bound}:7002"


def test_a_host_that_does_not_resolve_is_named(tmp_path):
    path = write(tmp_path, "startup.cfg", "[bl]\nhost = no-such-host.invalid\n")
    with pytest.raises(ConfigError, match=r"startup.cfg: \[bl\] host: host 'no-such-host.invalid' does not resolve"):
        cfg.load_beamline(path, "bl")


# ---------------------------------------------------------------------------------------------
# One declaration per key


def test_every_key_is_declared_once_and_the_shipped_files_write_every_key():
    import configparser

    startup = configparser.ConfigParser(interpolation=None)
    startup.read(cfg.default_startup_file())
    processing = configparser.ConfigParser(interpolation=None)
    processing.read(cfg.default_processing_file())
    # The INI schema is the models' fields: nothing else declares a key.
    assert set(startup.defaults()) == set(cfg.STARTUP_KEYS) == set(cfg.keys_of(cfg.BeamlineConfig))
    assert set(processing.defaults()) == set(cfg.PROCESSING_KEYS) == set(cfg.keys_of(cfg.ProcessingConfig))
    # Each startup key belongs to exactly one subsystem's model.
    owners = [name for model in cfg.STARTUP_SUBSYSTEMS for name in cfg.keys_of(model)]
    assert sorted(owners) == sorted(set(owners)) == sorted(cfg.STARTUP_KEYS)
    for name, spec in {**cfg.STARTUP_KEYS, **cfg.PROCESSING_KEYS}.items():
        assert spec.name == name and spec.subsystem and spec.help, name
    # The declared default is the model's default, and what a file saying nothing gives.
    assert cfg.BeamlineConfig().frames_per_file == 1000 and cfg.ProcessingConfig().spf_sigma_background == 6.0
    assert cfg.BeamlineConfig().splitter.frames_per_file == 1000


def test_a_key_no_model_declares_is_an_error_not_dropped(tmp_path):
    path = write(tmp_path, "startup.cfg", "[bl]\nheartbeat = 3\n")
    with pytest.raises(ConfigError, match=r"\[bl\] heartbeat: unknown key \(known keys: "):
        cfg.load_beamline(path, "bl")
    path = write(tmp_path, "processing.cfg", "[DEFAULT]\nspf_sigma_strong = 3\n[fast]\nspf_sigma_strongest = 2\n")
    with pytest.raises(ConfigError, match=r"\[fast\] spf_sigma_strongest: unknown key"):
        cfg.load_processing(path)


def test_origins_say_default_file_section_or_cli(tmp_path):
    path = write(tmp_path, "startup.cfg", "[DEFAULT]\nport = 7000\n[bl]\nuiport = 7001\n")
    bl = cfg.load_beamline(path, "bl", {"mpirun": "/opt/mpi/bin/mpirun"})
    assert bl.origins["port"] == "file:[DEFAULT]" and bl.port == 7000
    assert bl.origins["uiport"] == "file:[bl]" and bl.uiport == 7001
    assert bl.origins["gui_port"] == "default" and bl.gui_port == 8080
    assert bl.origins["mpirun"] == "CLI" and bl.mpirun == "/opt/mpi/bin/mpirun"
    lines = cfg.explain_beamline(bl)
    line = {ln.split()[0]: ln for ln in lines if ln.startswith("    ") and not ln.lstrip().startswith("#")}
    assert line["port"].rstrip().endswith("(file:[DEFAULT])") and line["uiport"].rstrip().endswith("(file:[bl])")
    assert line["gui_port"].rstrip().endswith("(default)") and line["mpirun"].rstrip().endswith("(CLI)")
    assert len(line) == len(cfg.STARTUP_KEYS)


def test_explain_on_the_command_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    proc = write(tmp_path, "proc.cfg", "[DEFAULT]\nspf_sigma_strong = 4\n[rastering]\nspf_algorithm = dispersion\n")
    startup = write(tmp_path, "startup.cfg", f"[DEFAULT]\nport = 7100\n[bl]\nprocessing_config_file = {proc}\n")
    intxr = str(Path(sys.executable).parent / "intxr")
    result = subprocess.run([intxr, "config", "-c", startup, "-b", "bl", "--explain", "--mpirun", "/x/mpirun"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()

    def origin(key, after=None):
        start = out.index(after) if after else 0
        return next(ln for ln in out[start:] if ln.split()[:2] == [key, "="]).rstrip().rsplit("(", 1)[1]

    assert origin("port") == "file:[DEFAULT])" and origin("processing_config_file") == "file:[bl])"
    assert origin("mpirun") == "CLI)" and origin("frames_per_file") == "default)"
    assert origin("spf_sigma_strong", "  [rastering]") == "file:[DEFAULT])"
    assert origin("spf_algorithm", "  [rastering]") == "file:[rastering])"
    assert origin("spf_min_local", "  [rastering]") == "default)"
    active = next(ln for ln in out if ln.split()[:1] == ["exposure_time_cutoff"])
    assert "inactive" not in active  # indexing landed (issue 14): the cutoff decides which hits are indexed
    no_section = subprocess.run([intxr, "config", "-c", startup, "--explain"], capture_output=True, text=True)
    assert no_section.returncode == 2 and "--explain needs -b BEAMLINE" in no_section.stderr


def test_keys_that_would_be_ignored_are_refused_with_the_reason(tmp_path):
    path = write(tmp_path, "proc.cfg", "[DEFAULT]\n[screening]\nprocessing_phil_file = find_spots.phil\n")
    with pytest.raises(ConfigError) as err:
        cfg.load_processing(path)
    assert f"{path}: [screening] processing_phil_file = 'find_spots.phil': intxr reads no DIALS PHIL file" in str(
        err.value)
    assert "spf_*" in str(err.value)
    # None, as the original's shipped file says, is accepted.
    assert cfg.load_processing(write(tmp_path, "ok.cfg", "[DEFAULT]\nprocessing_phil_file = None\n"))
    # Indexing landed (issue 14): its keys are active, so nothing says otherwise.
    assert not cfg.PROCESSING_KEYS["exposure_time_cutoff"].note(0.1)
    assert not cfg.PROCESSING_KEYS["processing_mode"].note("indexing")


@pytest.mark.parametrize("body,protocol,origin", [
    ("[bl]\nheader_type = cbfToEiger-0.1\n", "cbftoeiger", "header_type (file:[bl])"),
    ("[DEFAULT]\nheader_type = dheader-1.0\n[bl]\n", "v1", "header_type (file:[DEFAULT])"),
    ("[bl]\nheader_type = stream-v2\nprotocol = v2\n", "v2", "file:[bl]"),
    ("[bl]\n", "auto", "default"),
])
def test_header_type_picks_the_protocol_as_the_original_recognised_headers(tmp_path, body, protocol, origin):
    bl = cfg.load_beamline(write(tmp_path, "startup.cfg", body), "bl")
    assert bl.protocol == protocol and bl.origins["protocol"] == origin


def test_header_type_and_protocol_must_agree(tmp_path):
    path = write(tmp_path, "startup.cfg", "[bl]\nheader_type = dheader-1.0\nprotocol = v2\n")
    with pytest.raises(ConfigError, match=r"\[bl\] header_type = 'dheader-1.0' means protocol v1, but protocol = 'v2'"):
        cfg.load_beamline(path, "bl")


def test_python_gives_the_rust_splitter_every_option(monkeypatch, tmp_path):
    """The Rust core's defaults are never used: every SplitterCore option is passed, from the config."""
    import inspect

    from intxr import _splitter, splitter

    seen = {}
    try:  # the real core's keyword options, as PyO3 declares them
        real = inspect.signature(_splitter.SplitterCore).parameters
        keywords = {name for name, p in real.items() if p.kind == p.KEYWORD_ONLY}
    except (TypeError, ValueError):
        keywords = set()
    keywords = keywords or {
        "bind", "protocol", "frames_per_file", "series_timeout", "max_series", "filepath_key", "buffer_bytes",
        "disk_reserve", "check_free_space", "serve", "serve_mode", "skip_after", "heartbeat", "publish"}

    class Core:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs, _args=args)

    monkeypatch.setattr(splitter._splitter, "SplitterCore", Core)
    path = write(tmp_path, "startup.cfg", "[bl]\nframes_per_file = 7\ndisk_reserve_mb = 1\ncheck_free_space = False\n"
                 "series_timeout = 3\nsplitter_buffer_mb = 64\nfilepath_key = master_file\nhost = 127.0.0.1\n")
    splitter.Splitter.from_config(cfg.load_beamline(path, "bl"))
    assert keywords <= set(seen), keywords - set(seen)
    assert seen["frames_per_file"] == 7 and seen["disk_reserve"] == 1 << 20 and seen["check_free_space"] is False
    assert seen["series_timeout"] == 3.0 and seen["buffer_bytes"] == 64 << 20 and seen["filepath_key"] == "master_file"


def test_notes_say_what_is_accepted_but_not_done(tmp_path):
    proc = write(tmp_path, "proc.cfg", "[DEFAULT]\nexposure_time_cutoff = 0.1\nuse_ai = True\n"
                 "[screening]\nprocessing_mode = indexing\nexposure_time_cutoff = 0.5\n")
    startup = write(tmp_path, "startup.cfg", f"[bl]\nprocessing_config_file = {proc}\n")
    notes = cfg.load(startup, "bl").notes()
    assert any("legacy keys accepted and ignored: use_ai" in n for n in notes)
    # Indexing landed (issue 14): processing_mode = indexing and exposure_time_cutoff are active, not noted.
    assert not any("processing_mode" in n or "exposure_time_cutoff" in n for n in notes)


def test_the_original_interceptor_startup_file_loads(tmp_path):
    # ssrl-px/interceptor resources/connector/startup.cfg's [DEFAULT], with a beamline section.
    path = write(tmp_path, "startup.cfg", """
        [DEFAULT]
        beamline = None
        custom_keys = None
        filepath_key = None
        run_mode_key = None
        run_mode_key_index = 0
        host = localhost
        port = 9999
        stype = req
        uihost = localhost
        uiport = 9998
        uistype = push
        send_to_ui = False
        timeout = None
        header_type = cbfToEiger-0.1
        processing_config_file = None
        output_delimiter = None
        output_format = reporting, series, frame, result {}, mapping {}, filename
        output_prefix_key = reporting
        default_output_prefix = RESULTS:

        [12-1]
        beamline = 12-1
        custom_keys = mapping, reporting, master_file
        filepath_key = master_file
        run_mode_key = mapping
    """)
    bl = cfg.load_beamline(path, "12-1")
    assert bl.protocol == "cbftoeiger" and bl.origins["protocol"] == "header_type (file:[DEFAULT])"
    assert bl.custom_keys == ("mapping", "reporting", "master_file") and bl.origins["custom_keys"] == "file:[12-1]"
    assert bl.origins["output_dir"] == "default"
