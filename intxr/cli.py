"""Command line: `intxr` (tools), `intxrd` (the daemon) and `connect_mpi` (the original's name for it).

Errors are one line on stderr and exit status 2; Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Callable

from intxr import __version__
from intxr.config import ConfigError

SHARED_THAUMATIN = "cbf/thaumatin_grid/thau_3_2_*.cbf.bz2"


class UsageError(Exception):
    """A command that cannot run as asked; the message is shown as is."""


def _run(fn: Callable[[], int | None], prog: str) -> int:
    from intxr.codec import DecodeError
    from intxr.images import SourceError

    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `intxr version | head`: the reader left; say nothing, as a killed pipe would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UsageError, ConfigError, SourceError, DecodeError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # zmq.ZMQError and the like: still one line, never a traceback
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def shared_data_dir() -> str | None:
    """`../shared/data` beside the checkout (or $INTXR_SHARED_DATA), where the real frames live."""
    candidates = [os.environ.get("INTXR_SHARED_DATA", "")]
    here = os.path.dirname(os.path.abspath(__file__))
    candidates += [os.path.join(here, "..", "..", "shared", "data"), os.path.join(os.getcwd(), "..", "shared", "data")]
    for path in candidates:
        if path and os.path.isdir(path):
            return os.path.abspath(path)
    return None


def default_sources() -> list[str]:
    """The embedded default: the real thaumatin grid scan when ../shared/data is there, else synthetic."""
    data = shared_data_dir()
    if data:
        frames = sorted(glob.glob(os.path.join(data, SHARED_THAUMATIN)))
        if frames:
            return frames
    return ["synthetic:2463x2527:20"]


def _key_values(items: list[str]) -> dict[str, str]:
    keys = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--key {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        keys[name.strip()] = value
    return keys


# ---------------------------------------------------------------------------------------------
# intxr subcommands


# Simulator keys `intxr simulate` exposes as flags (declared in intxr.config.SimulatorKeys).
SIMULATE_KEYS = ["simulate_protocol", "simulate_rate"]


def cmd_simulate(args) -> int:
    from intxr import config as cfg
    from intxr.simulate import Simulator, SimulatorSettings

    declared = cfg.with_overrides(cfg.BeamlineConfig(), cfg.key_overrides(args, cfg.BeamlineConfig, SIMULATE_KEYS))
    settings = SimulatorSettings(
        protocol=declared.simulate_protocol,
        encoding=args.encoding,
        header_detail=args.header_detail,
        endpoint=args.endpoint,
        rate=declared.simulate_rate,
        frames=args.frames,
        series=args.series,
        loop=args.loop,
        keys=_key_values(args.key),
        first_series=args.first_series,
    )
    sources = args.sources or default_sources()
    simulator = Simulator(sources, settings, drain_timeout=args.drain_timeout)
    try:
        simulator.run()
    except KeyboardInterrupt:
        simulator.stop()
        raise
    return 0


def cmd_monitor(args) -> int:
    from intxr.monitor import monitor

    endpoint = args.bind or args.connect
    record = open(args.record, "a") if args.record else None
    try:
        counters = monitor(
            endpoint,
            protocol=args.protocol,
            bind=bool(args.bind),
            timeout=args.timeout,
            max_series=args.max_series,
            max_frames=args.max_frames,
            record=record,
        )
    finally:
        if record:
            record.close()
    return 1 if counters.errors and not counters.frames else 0


def loaded_kernels() -> dict[str, str]:
    """Each compiled Cython kernel module in intxr._kernels: "ok" when it imports, else why not."""
    import importlib
    import pkgutil

    from intxr import _kernels

    found = {}
    for info in sorted(pkgutil.iter_modules(_kernels.__path__), key=lambda m: m.name):
        try:
            importlib.import_module(f"intxr._kernels.{info.name}")
            found[info.name] = "ok"
        except ImportError as exc:
            found[info.name] = f"does not import ({exc})"
    return found


def splitter_hdf5_version() -> str:
    """The HDF5 library the Rust Splitter links (intxr._splitter.hdf5_version), or why it is unknown."""
    from intxr import _splitter

    get = getattr(_splitter, "hdf5_version", None)
    if get is None:
        return "unknown (this build of intxr._splitter does not report it)"
    try:
        return str(get())
    except Exception as exc:  # a broken build says so rather than stopping `intxr version`
        return f"unknown ({type(exc).__name__}: {exc})"


def mpi_library_version() -> str:
    """The MPI library mpi4py loads (first line of MPI_Get_library_version), or why not."""
    try:
        import mpi4py

        # MPI_Get_library_version may be called before MPI_Init: report it without starting MPI.
        mpi4py.rc.initialize = mpi4py.rc.finalize = False
        from mpi4py import MPI
    except ImportError as exc:
        return f"not available ({exc})"
    except Exception as exc:  # an MPI library that fails to load
        return f"does not load ({type(exc).__name__}: {exc})"
    try:
        text = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    return text.split(", package:")[0]


def cmd_version(args) -> int:
    import h5py
    import hdf5plugin
    import numpy
    import zmq

    from intxr import _splitter

    kernels = loaded_kernels()
    imported = [name for name, state in kernels.items() if state == "ok"]
    print(f"intxr {__version__}")
    print(f"  rust core (intxr._splitter) {_splitter.__version__}, links HDF5 {splitter_hdf5_version()}")
    print(f"  cython kernels: {', '.join(imported) if imported else 'none'}")
    for name, state in kernels.items():
        if state != "ok":
            print(f"    {name}: {state}")
    print(
        f"  numpy {numpy.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), "
        f"hdf5plugin {hdf5plugin.version}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"
    )
    print(f"  MPI: {mpi_library_version()}")
    try:
        import gemmi

        print(f"  gemmi {gemmi.__version__} (the indexer's cells, space groups and lattice symmetry)")
    except ImportError as exc:
        print(f"  gemmi: not importable ({exc}): a dependency of intxr, needed for indexing")
    try:
        import dials  # noqa: F401

        print("  dials: available (spf_backend = dials can be used)")
    except ImportError:
        print("  dials: not installed (native spot finder only)")
    return 0


def _geometry_from_args(args, image):
    """Geometry for a frame: the file's own (intxr.geometry, as the Splitter normalises headers), with the
    command line's values in its place where given (a simple flat panel, as dxtbx builds one); a frame
    without geometry (.npy) needs them all."""
    rows, cols = image.data.shape[-2:]
    geometry = image.geometry.with_overrides(
        wavelength=args.wavelength,
        distance=args.distance,
        pixel_size=args.pixel_size,
        beam_center=tuple(args.beam_center) if args.beam_center else None,
        count_cutoff=args.count_cutoff,
        image_size=(cols, rows),
    )
    if not geometry.panels:
        missing = ", ".join(geometry.resolution_missing)
        raise UsageError(
            f"{image.source}: no geometry in the file; give --distance, --pixel-size, "
            f"--beam-center and --wavelength (missing: {missing})"
        )
    return geometry


# Processing keys `intxr find-spots` exposes as flags (declared in intxr.config.ProcessingConfig).
FIND_SPOTS_KEYS = [
    "spf_algorithm", "spf_gain", "spf_kernel_size", "spf_sigma_background", "spf_sigma_strong", "spf_min_local",
    "spf_global_threshold", "spf_min_spot_size", "spf_max_spot_size", "spf_max_separation", "spf_backend",
    "spf_prescreen", "min_bragg_peaks",
]


def find_spots_section(args):
    """The processing section find-spots uses: --processing-section of -c FILE (default: the shipped
    processing.cfg's [DEFAULT]), with the command line's spot-finder flags on top."""
    from intxr import config as cfg

    path = args.config_file or cfg.default_processing_file()
    section = cfg.load_processing(path).section(args.processing_section)
    return cfg.with_overrides(section, cfg.key_overrides(args, cfg.ProcessingConfig, FIND_SPOTS_KEYS))


def _read_frames(args):
    """Every frame of the paths, as find-spots and index read them: (path, index, data, geometry, static mask,
    read seconds); the file's geometry with the command line's values in its place."""
    import time

    import numpy as np

    from intxr.images import open_source

    mask = None
    if args.mask:
        mask = np.load(args.mask) != 0  # nonzero = a pixel to use, as DIALS masks are
    for path in args.images:
        t = time.perf_counter()
        source = open_source(path)  # a miniCBF is read and decoded here, once
        open_s = time.perf_counter() - t
        for index in range(len(source)):
            t = time.perf_counter()
            image = source.read(index)
            data = np.asarray(image.data)  # a memory-mapped .npy is read here
            read_s = time.perf_counter() - t + (open_s if index == 0 else 0.0)
            geometry = _geometry_from_args(args, image)
            static = mask if mask is not None else image.extra.get("mask")
            yield path, index, data, geometry, static, read_s


def cmd_find_spots(args) -> int:
    import json
    from dataclasses import replace

    from intxr import config as cfg
    from intxr.reader.spotfinder import SpotFinder, SpotFinderParams

    section = find_spots_section(args)
    params = replace(SpotFinderParams.from_processing(section), d_min=args.d_min, d_max=args.d_max)
    used = {"processing_section": section.name, "processing_file": section.source_file,
            "algorithm": section.spf_algorithm, "backend": section.spf_backend}
    if args.verbose:
        print(f"processing section [{section.name}] of {section.source_file}: algorithm {section.spf_algorithm}, "
              f"backend {section.spf_backend}", flush=True)
        for name, spec in cfg.PROCESSING_KEYS.items():
            origin = section.origins.get(name, "default")
            if getattr(section, name) != spec.parse(spec.default) or origin in ("CLI", f"file:[{section.name}]"):
                print(f"  {name} = {cfg.format_value(getattr(section, name))}  ({origin})", flush=True)
    finders: dict = {}
    for path, index, data, geometry, static, read_s in _read_frames(args):
        key = (json.dumps(geometry.to_wire(), sort_keys=True), None if static is None else id(static))
        finder = finders.get(key)
        if finder is None:
            finder = finders[key] = SpotFinder(params, geometry, static)
        result = finder.find(data)
        result.timing = {"read": read_s, **result.timing}
        if args.json:
            print(json.dumps({**result.as_json(file=path, frame=index), **used}), flush=True)
        else:
            s = result.stats
            print(
                f"{path} frame {index}: {len(result.spots)} spots ({result.n_strong_pixels} strong pixels), "
                f"{s.n_spots_no_ice} without ice, {s.n_spots_4A} beyond 4 A, d_min {s.estimated_d_min:.2f} A, "
                f"score {result.score.score}, hres {result.score.hres:.2f}"
                + (" [blank: pre-screened]" if result.prescreened else "")
                + f" | {sum(result.timing.values()) * 1000:.0f} ms"
                + (f" (read {read_s * 1000:.0f} ms) | [{section.name}] {section.spf_algorithm}"
                   if args.verbose else ""),
                flush=True,
            )
    return 0


# Processing keys `intxr index` exposes as flags, besides find-spots' own.
INDEX_KEYS = ["target_unit_cell", "target_space_group", "indexing_method", "indexing_max_lattices"]


def cmd_index(args) -> int:
    """Find spots and index every frame with enough of them, as a reader does for a run mode that indexes."""
    import json
    import time
    from dataclasses import replace

    from intxr import config as cfg
    from intxr.reader.indexing import index_spots, params_from_processing
    from intxr.reader.spotfinder import SpotFinder, SpotFinderParams

    section = find_spots_section(args)
    section = cfg.with_overrides(section, cfg.key_overrides(args, cfg.ProcessingConfig, INDEX_KEYS))
    params = replace(SpotFinderParams.from_processing(section), d_min=args.d_min, d_max=args.d_max)
    index_params = params_from_processing(section)
    finders: dict = {}
    for path, index, data, geometry, static, read_s in _read_frames(args):
        key = (json.dumps(geometry.to_wire(), sort_keys=True), None if static is None else id(static))
        finder = finders.get(key)
        if finder is None:
            finder = finders[key] = SpotFinder(params, geometry, static)
        t = time.perf_counter()
        found = finder.find(data, skip_prescreen=True)
        spots_s = time.perf_counter() - t
        result = index_spots(geometry, found.spots.x, found.spots.y, index_params)
        out = {"file": path, "frame": index, "n_spots": len(found.spots), **result.as_dict(),
               "processing_section": section.name, "target_unit_cell": index_params.target_unit_cell,
               "target_space_group": index_params.target_space_group}
        out["timing"] = {"read": round(read_s, 6), "spotfinding": round(spots_s, 6), **out["timing"]}
        if args.json:
            print(json.dumps(out), flush=True)
        elif result.indexed:
            cell = " ".join(f"{v:.2f}" for v in result.unit_cell)
            print(f"{path} frame {index}: {len(found.spots)} spots, indexed {result.n_indexed}: {result.lattice} "
                  f"{result.space_group} {cell}, rmsd {result.rmsd_px:.2f} px | "
                  f"{result.timing * 1000:.0f} ms", flush=True)
        else:
            print(f"{path} frame {index}: {len(found.spots)} spots, {'; '.join(result.errors)} | "
                  f"{result.timing * 1000:.0f} ms", flush=True)
    return 0


# Splitter keys `intxr splitter` exposes as flags (declared in intxr.config.SplitterKeys).
SPLITTER_KEYS = ["protocol", "output_dir", "skip_after", "frames_per_file", "series_timeout", "filepath_key",
                 "disk_reserve_mb"]


def cmd_splitter(args) -> int:
    import signal

    from intxr import config as cfg
    from intxr.splitter import Splitter

    given = cfg.key_overrides(args, cfg.BeamlineConfig, SPLITTER_KEYS)
    if args.no_free_space_check:
        given["check_free_space"] = False
    endpoint = args.bind or args.connect
    if args.beamline:
        beamline = cfg.load_beamline(args.config_file or cfg.default_startup_file(), args.beamline, given)
        splitter = Splitter.from_config(
            beamline,
            endpoint=endpoint,
            bind=True if args.bind else None,
            max_series=args.max_series,
            serve=args.serve,
            serve_mode=args.serve_mode,
            publish=args.publish,
        )
    else:
        # Without a beamline: the declared defaults, the command line's values, and only the sockets asked for.
        options = cfg.with_overrides(cfg.BeamlineConfig(), given)
        splitter = Splitter(
            endpoint or options.detector_endpoint,
            options.output_dir if "output_dir" in given else ".",
            bind=bool(args.bind),
            protocol=options.protocol,
            frames_per_file=options.frames_per_file,
            max_series=args.max_series,
            series_timeout=options.splitter_series_timeout,
            filepath_key=options.filepath_key,
            buffer_mb=options.splitter_buffer_mb,
            disk_reserve_mb=options.disk_reserve_mb,
            check_free_space=options.check_free_space,
            serve=args.serve,
            serve_mode=args.serve_mode or "request",
            skip_after=options.skip_after,
            publish=args.publish,
        )
    # SIGTERM as Ctrl-C: stop receiving, write what was received, close the files.
    signal.signal(signal.SIGTERM, lambda *_: splitter.stop())
    splitter.start()
    print(f"splitter: receiving on {args.bind or args.connect or 'the configured endpoint'}", file=sys.stderr)
    try:
        while not splitter.join(0.5):
            pass
    except KeyboardInterrupt:
        splitter.stop()
        splitter.join()
    c = splitter.counters()
    full = (f" ({c['frames_not_written']} not written: disk full {c['disk_full']} time(s), writing resumed when "
            f"space returned)" if c["disk_full"] else "")
    print(
        f"splitter: {c['frames_written']} of {c['frames_received']} frames written in {c['series_ended']} series"
        f"{full}, {c['frames_forwarded']} forwarded to readers, {c['frames_skipped']} skipped for processing, "
        f"{c['malformed']} malformed messages, {c['md5_mismatches']} hash mismatches, "
        f"{c['write_errors']} write errors",
        file=sys.stderr,
    )
    for path in c["files"]:
        print(path)
    # A full disk is handled (files closed cleanly, writing resumed); any other write error is a failure.
    return 1 if c["write_errors"] else 0


# Startup keys intxrd (and so `intxr config`) take from the command line.
DAEMON_KEYS = ["mpirun", "simulate"]


def daemon_overrides(args) -> dict:
    """The startup keys given on intxrd's command line (--mpirun, --simulate)."""
    given = {"mpirun": args.mpirun, "simulate": " ".join(args.simulate) if args.simulate else None}
    return {k: v for k, v in given.items() if v is not None}


def cmd_config(args) -> int:
    from intxr import config as cfg

    path = args.config_file or cfg.default_startup_file()
    names = [args.beamline] if args.beamline else cfg.beamline_sections(path)
    if args.explain and not args.beamline:
        raise UsageError("--explain needs -b BEAMLINE (the section to explain)")
    for name in names:
        loaded = cfg.load(path, name, daemon_overrides(args))
        bl = loaded.beamline
        if args.explain:
            print("\n".join(loaded.explain()))
            continue
        print(
            f"[{name}] ok: detector {bl.detector_endpoint} ({bl.protocol}), readers on {bl.reader_endpoint}, "
            f"output {bl.output_dir}, processing {loaded.processing.source_file} "
            f"(sections: {', '.join(loaded.processing.sections)})"
        )
        for note in loaded.notes():
            print(f"  note: {note}")
    return 0


def cmd_gui(args) -> int:
    from intxr import config as cfg
    from intxr.gui.server import run_gui

    given = cfg.key_overrides(args, cfg.BeamlineConfig, ["gui_host", "gui_port", "raster_row_length", "raster_snake"])
    if args.beamline:
        loaded = cfg.load(args.config_file or cfg.default_startup_file(), args.beamline, given)
        bl, results = loaded.beamline, loaded.beamline.results_publish_endpoint
    else:
        bl, results = cfg.with_overrides(cfg.BeamlineConfig(), given), None
    results = args.results or results
    if not results:
        raise UsageError("give --results ENDPOINT (the Collector's PUB) or -b BEAMLINE")
    if args.min_bragg_peaks is not None:  # kept so scripts that pass it still run
        print("intxr gui: note: --min-bragg-peaks is ignored: each result says whether it is a hit, decided by its "
              "reader with its run mode's min_Bragg_peaks", file=sys.stderr)
    return run_gui(results, bl.gui_host, bl.gui_port, row_length=bl.raster_row_length, snake=bl.raster_snake)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return value


def _add_frame_source_args(p) -> None:
    """The images and processing section, as find-spots and index both read them."""
    p.add_argument("images", nargs="+", metavar="PATH")
    p.add_argument("-c", "--config_file", metavar="FILE",
                   help="processing config (default: the processing.cfg shipped with intxr)")
    p.add_argument("--processing-section", default="DEFAULT", metavar="NAME",
                   help="its section to use, as a series whose run mode names it (default: DEFAULT)")


def _add_spot_finding_args(p) -> None:
    """The spot finder's keys and the geometry overrides, as find-spots and index both take them."""
    from intxr import config as cfg

    cfg.add_key_flags(p, cfg.ProcessingConfig, FIND_SPOTS_KEYS, "default: the section's; DEFAULT's is {default}",
                      spf_kernel_size={"metavar": "NY,NX"}, spf_global_threshold={"metavar": "T|Auto"})
    p.add_argument("--d-min", type=float, default=None, help="mask pixels at d <= D before thresholding")
    p.add_argument("--d-max", type=float, default=None, help="mask pixels at d >= D before thresholding")
    p.add_argument("--mask", metavar="MASK.npy", help="pixels to use (nonzero), same shape as the frames")
    p.add_argument("--distance", type=float, metavar="MM")
    p.add_argument("--pixel-size", type=float, metavar="MM")
    p.add_argument("--beam-center", type=float, nargs=2, metavar=("X", "Y"), help="pixels (fast, slow)")
    p.add_argument("--wavelength", type=float, metavar="A")
    p.add_argument("--count-cutoff", type=int, help="highest trusted count (overrides the file's)")


def build_parser() -> argparse.ArgumentParser:
    from intxr import config as cfg

    parser = argparse.ArgumentParser(
        prog="intxr", description="Interceptor: real-time analysis of streamed X-ray diffraction frames."
    )
    parser.add_argument("--version", action="version", version=f"intxr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="stream frames as a DECTRIS detector does (the built-in simulated detector)",
        description="Replay image files (miniCBF .cbf[.bz2|.gz], Eiger/NXmx .h5, .npy) or synthetic "
        "frames (synthetic:WIDTHxHEIGHT[:FRAMES[:SEED]]) on a bound ZeroMQ PUSH socket. "
        "Without SOURCE: the real thaumatin frames in ../shared/data, else synthetic.",
    )
    cfg.add_key_flags(p, cfg.BeamlineConfig, SIMULATE_KEYS)
    p.add_argument("--encoding", choices=["bs32-lz4", "bs16-lz4", "bs8-lz4", "lz4"], default="bs32-lz4")
    p.add_argument("--header-detail", choices=["none", "basic", "all"], default="basic")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:9999", help="bind address (default %(default)s)")
    p.add_argument("--frames", type=int, default=None, help="frames per series (cycles through the sources)")
    p.add_argument("--loop", action="store_true", help="start a new series after each one until stopped")
    p.add_argument("--series", type=int, default=1, help="number of series to send (default 1)")
    p.add_argument("--first-series", type=int, default=1, help="number of the first series")
    p.add_argument("--drain-timeout", type=_non_negative, default=10.0, metavar="S",
                   help="at the end, wait for queued frames to leave until none has for S seconds (default 10); "
                   "those still queued are dropped and counted, never said sent")
    p.add_argument(
        "--key",
        action="append",
        metavar="NAME=VALUE",
        help="custom header key (cbfToEiger: mapping, reporting, master_file; v1: dheader; v2: user_data)",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("monitor", help="connect to a detector stream and print what each frame holds")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--connect", default="tcp://127.0.0.1:9999", metavar="ENDPOINT")
    group.add_argument("--bind", metavar="ENDPOINT")
    p.add_argument("--protocol", choices=["auto", "v1", "v2", "cbftoeiger"], default="auto")
    p.add_argument("--max-series", type=int, default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds without a message")
    p.add_argument("--record", metavar="FILE", help="append one JSON line per frame")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser(
        "splitter",
        help="receive the detector stream, write NXmx HDF5, serve frames to readers",
        description="Receive the detector stream, write every frame to NXmx HDF5 (never replacing a file), "
        "serve frames to readers. Prints the master files written (the latest 1000) on stdout. Exit status 0 "
        "also after a full disk it handled; 1 after any other write failure.",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--connect", metavar="ENDPOINT", help="the detector's PUSH endpoint (DECTRIS convention)")
    group.add_argument("--bind", metavar="ENDPOINT")
    cfg.add_key_flags(p, cfg.BeamlineConfig, SPLITTER_KEYS, "with -b: the section's; default {default}",
                      output_dir={"metavar": "DIR", "help": "where the files go (with -b: the section's "
                                  "output_dir; without: the current folder)"})
    p.add_argument("--serve", metavar="ENDPOINT", help="bind here for readers (REQ asks, the Splitter answers)")
    p.add_argument("--serve-mode", choices=["request", "push"], default=None,
                   help="request: readers ask (default); push: round-robin fan-out")
    p.add_argument("--publish", metavar="ENDPOINT", help="bind a PUB socket here for counters and series accounting")
    p.add_argument("--max-series", type=int, default=None, help="exit cleanly after N series have ended")
    p.add_argument("--no-free-space-check", action="store_true",
                   help="do not check free space before each frame (for file systems whose statvfs misleads): "
                   "writing stops when a write fails for want of space, and resumes the same way "
                   "[check_free_space = False]")
    p.add_argument("-c", "--config_file", help="startup config (with -b: its settings, overridden by options)")
    p.add_argument("-b", "--beamline")
    p.set_defaults(func=cmd_splitter)

    p = sub.add_parser(
        "find-spots",
        help="find Bragg spots on image files (DIALS dispersion algorithm)",
        description="Find spots as a reader does for a series whose run mode names --processing-section (default "
        "[DEFAULT]: dials.find_spots's defaults), with DIALS's per-image statistics and the Interceptor score; "
        "the flags below override that section's keys. Reads .cbf[.bz2|.gz], Eiger/NXmx .h5 (all frames) and "
        ".npy (give its geometry).",
    )
    _add_frame_source_args(p)
    _add_spot_finding_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per frame per line (with processing_section and algorithm)")
    p.add_argument("--verbose", action="store_true",
                   help="say the processing section, algorithm and every value not at its default, and each "
                   "frame's read time")
    p.set_defaults(func=cmd_find_spots)

    p = sub.add_parser(
        "index",
        help="find spots and index each frame (native stills indexer)",
        description="Find spots as find-spots does, then index every frame with at least 10 spots with the native "
        "stills indexer: with --unit-cell and --space-group (or the section's target_unit_cell and "
        "target_space_group) it searches for that cell and rejects solutions that do not match it. Reads "
        ".cbf[.bz2|.gz], Eiger/NXmx .h5 (all frames) and .npy (give its geometry).",
    )
    _add_frame_source_args(p)
    cfg.add_key_flags(p, cfg.ProcessingConfig, INDEX_KEYS, "default: the section's; DEFAULT's is {default}",
                      target_unit_cell={"metavar": "a,b,c,al,be,ga"}, target_space_group={"metavar": "SG"})
    _add_spot_finding_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per frame per line: file, frame, n_spots, indexed, n_indexed, lattice, "
                   "space_group, unit_cell, p1_unit_cell, rmsd_px, orientation_matrix, lattices, errors, timing")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "gui",
        help="serve the live web view of runs",
        description="A web page any browser can open (a Bokeh server application): series list, strip chart, "
        "raster map with the crystals found, rates over time, resolution histogram, frame view, indexing, health. "
        "Subscribes to the Collector's published results (the beamline section's results_pub_port, or --results).",
    )
    cfg.add_key_flags(p, cfg.BeamlineConfig, ["gui_port", "gui_host"], "default: the section's, else {default}")
    p.add_argument("--results", metavar="ENDPOINT", help="the Collector's PUB endpoint")
    cfg.add_key_flags(p, cfg.BeamlineConfig, ["raster_row_length", "raster_snake"],
                      "default: the section's, else {default}")
    p.add_argument("--min-bragg-peaks", type=int, default=None, metavar="N",
                   help="ignored (kept for scripts): each result says whether it is a hit, decided by its reader "
                   "with its run mode's min_Bragg_peaks")
    p.add_argument("-c", "--config_file", help="startup config")
    p.add_argument("-b", "--beamline", help="section of the startup config")
    p.set_defaults(func=cmd_gui)

    p = sub.add_parser("config", help="validate the startup and processing configs and show what they resolve to")
    p.add_argument("-c", "--config_file", help="startup config (default: intxr/configs/startup.cfg)")
    p.add_argument("-b", "--beamline", help="one section (default: all)")
    p.add_argument("--explain", action="store_true",
                   help="print every key of the section and of its processing config: value, meaning and where it "
                   "came from (default, file:[SECTION], CLI)")
    cfg.add_key_flags(p, cfg.BeamlineConfig, DAEMON_KEYS, "as intxrd's; default {default}",
                      simulate={"nargs": "+", "type": str, "metavar": "SOURCE"})
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("version", help="show versions of intxr, its compiled parts and dependencies")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(lambda: args.func(args), "intxr")


# ---------------------------------------------------------------------------------------------
# intxrd / connect_mpi


def build_daemon_parser(prog: str) -> argparse.ArgumentParser:
    from intxr import config as cfg

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Interceptor daemon: start the pipeline for one beamline and keep it running. "
        "`intxrd -b demo` runs against the built-in simulated detector on loopback.",
    )
    parser.add_argument("-c", "--config_file", help="startup config (default: intxr/configs/startup.cfg)")
    parser.add_argument("-b", "--beamline", required=True, help="section of the startup config")
    parser.add_argument("-n", "--n_proc", type=int, default=None, help="MPI ranks (collector + readers)")
    parser.add_argument("--mpi_bind", help="CPUs for the ranks, e.g. '[0-47,96-191]' or '0-3 8 9'")
    parser.add_argument("--host", help="comma-separated hosts for mpirun")
    parser.add_argument("--hostfile", help="mpirun hostfile")
    cfg.add_key_flags(parser, cfg.BeamlineConfig, ["mpirun"], "default: the section's, else {default}")
    parser.add_argument("--verbose", action="store_true", help="print every result line")
    parser.add_argument("--dry_run", action="store_true", help="print what would run, then exit")
    parser.add_argument("--time", action="store_true", help="print processing rate")
    parser.add_argument("--record", metavar="FILE", help="append every result as a JSON line")
    parser.add_argument(
        "-f", "--result_format", choices=["line", "json"], default="line", help="stdout format of results"
    )
    cfg.add_key_flags(parser, cfg.BeamlineConfig, ["simulate"], "overrides the config",
                      simulate={"nargs": "+", "type": str, "metavar": "SOURCE"})
    parser.add_argument("--max_series", type=int, default=None, help="stop after N series (tests, demos)")
    parser.add_argument("--no_prescreen", action="store_true", help="run the full spot finder on every frame")
    return parser


def daemon_main(argv: list[str] | None, prog: str) -> int:
    args = build_daemon_parser(prog).parse_args(argv)

    def run() -> int:
        from intxr import config as cfg
        from intxr.daemon import run_daemon

        path = args.config_file or cfg.default_startup_file()
        args.key_overrides = daemon_overrides(args)
        # Validated here: a bad config stops before anything starts.
        bl = cfg.load(path, args.beamline, args.key_overrides).beamline
        sources = args.simulate or (
            [] if bl.simulate is None else default_sources() if bl.simulate == "auto" else bl.simulate.split()
        )
        return run_daemon(args, prog, sources)

    return _run(run, prog)


def intxrd_main(argv: list[str] | None = None) -> int:
    return daemon_main(argv, "intxrd")


def connect_mpi_main(argv: list[str] | None = None) -> int:
    return daemon_main(argv, "connect_mpi")


if __name__ == "__main__":
    sys.exit(main())
