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
