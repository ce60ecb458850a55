"""`intxrd` / `connect_mpi`: start the Splitter and the MPI pipeline for one beamline and keep them
running until SIGTERM / Ctrl-C (or, for demos and tests, until `--max_series` series are done).

Order of things: the config is validated first (nothing starts on a bad one); the Splitter
binds its reader and publishing endpoints; mpirun starts the Collector and the Readers; the
simulated detector starts last when the config asks for one. Stopping drains in the same
direction data flows: the detector stops, the Splitter writes and serves what it has and closes
the files, the Collector sums up every series, then the readers stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from intxr import config as cfg
from intxr.launch import plan_launch


def _collector_ready(endpoint: str, mpi: subprocess.Popen, timeout: float) -> bool:
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"health")
    sock.connect(endpoint)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and mpi.poll() is None:
            if sock.poll(200):
                return True
        return False
    finally:
        sock.close(linger=0)


def pipeline_program(args, config_path: str, beamline: str) -> list[str]:
    program = [sys.executable, "-m", "intxr.pipeline", "-c", config_path, "-b", beamline]
    if args.verbose:
        program.append("--verbose")
    if args.time:
        program.append("--time")
    if args.record:
        program += ["--record", os.path.abspath(args.record)]
    if args.result_format != "line":
        program += ["-f", args.result_format]
    if args.max_series is not None:
        program += ["--max_series", str(args.max_series)]
    if getattr(args, "no_prescreen", False):
        program.append("--no-prescreen")
    return program


def run_daemon(args, prog: str, sources: list[str]) -> int:
    path = os.path.abspath(args.config_file or cfg.default_startup_file())
    configuration = cfg.load(path, args.beamline)  # validated here: a bad config stops before anything starts
    bl = configuration.beamline
    launch = plan_launch(
        pipeline_program(args, path, bl.name),
        mpirun=args.mpirun or bl.mpirun,
        n_ranks=args.n_proc,
        mpi_bind=args.mpi_bind,
        hosts=args.host,
        hostfile=args.hostfile,
    )
    if args.dry_run:
        print(f"{prog}: beamline [{bl.name}] from {path}")
        print(f"  splitter: {bl.detector_socket} {bl.detector_endpoint} ({bl.protocol}) -> {bl.output_dir}; "
              f"readers ask on {bl.serve_bind_endpoint}; accounting published on {bl.splitter_publish_bind_endpoint}")
        print(f"  collector: results on {bl.collector_endpoint}, published on {bl.results_publish_endpoint}, "
              f"result lines to {bl.ui_endpoint}" + ("" if bl.send_to_ui else " (send_to_ui off)"))
        if sources:
            print(f"  simulated detector: intxr simulate --protocol {bl.simulate_protocol} --endpoint "
                  f"{bl.detector_endpoint} --rate {bl.simulate_rate:g} {' '.join(sources[:3])}"
                  + (f" ... ({len(sources)} sources)" if len(sources) > 3 else ""))
        if bl.start_gui:
            print(f"  gui: intxr gui -c {path} -b {bl.name} (http://{bl.gui_host}:{bl.gui_port}/)")
        print(launch.describe())
        return 0

    from intxr.simulate import Simulator, SimulatorSettings
    from intxr.splitter import Splitter

    Path(bl.output_dir).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum, _frame):
        print(f"{prog}: {signal.Signals(signum).name}: draining and stopping", file=sys.stderr, flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    splitter = Splitter.from_config(bl, max_series=args.max_series).start()
    print(f"{prog}: [{bl.name}] splitter receiving {bl.protocol} on {bl.detector_endpoint}, writing {bl.output_dir}",
          file=sys.stderr, flush=True)
    env = {**os.environ, **launch.env, "PYTHONUNBUFFERED": "1"}
    gui = None
    if bl.start_gui:
        # Its own process: drawing for browsers never competes with the Splitter's Python side.
        gui = subprocess.Popen([sys.executable, "-m", "intxr.cli", "gui", "-c", path, "-b", bl.name], env=env)
        print(f"{prog}: GUI on http://{bl.gui_host}:{bl.gui_port}/", file=sys.stderr, flush=True)
    mpi = subprocess.Popen(launch.command, env=env)
    print(f"{prog}: started {' '.join(launch.command)}", file=sys.stderr, flush=True)
    simulator = None
    if sources:
        # The simulated detector starts once the Collector is up (its first health message), so
        # that even a short first series is accounted from its first frame.
        if not _collector_ready(bl.results_publish_endpoint, mpi, timeout=60):
            print(f"{prog}: no word from the Collector in 60 s: starting the detector anyway", file=sys.stderr)
        simulator = Simulator(
            sources,
            SimulatorSettings(
                protocol=bl.simulate_protocol,
                endpoint=bl.detector_endpoint,
                rate=bl.simulate_rate,
                loop=args.max_series is None,
                series=args.max_series or 1,
                keys={"reporting": "", "mapping": "rastering"} if bl.simulate_protocol == "cbftoeiger" else {},
            ),
        )
        threading.Thread(target=simulator.run, name="simulator", daemon=True).start()
        simulator.ready.wait(30)
    code = 0
    splitter_done = None
    try:
        while mpi.poll() is None and not stop.is_set():
            time.sleep(0.2)
            if not splitter.running:
                # The Splitter has ended (--max_series): the Collector sums up within its grace
                # time and the ranks stop; a job still running long after that is stopped.
                splitter_done = splitter_done or time.monotonic()
                if time.monotonic() - splitter_done > 30 + 2 * (bl.timeout or 10):
                    print(f"{prog}: the MPI job did not end after the last series: stopping it", file=sys.stderr)
                    code = 1
                    break
        if mpi.poll() is not None and not stop.is_set() and args.max_series is None:
            print(f"{prog}: the MPI job ended (exit {mpi.returncode}) while it should run", file=sys.stderr)
            code = 1
    finally:
        if simulator is not None:
            simulator.stop()
        splitter.stop()
        splitter.join(60)
        if mpi.poll() is None:
            # Give the Collector the Splitter's last series_end, then stop the ranks.
            deadline = time.monotonic() + 3.0
            while mpi.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if mpi.poll() is None:
                mpi.send_signal(signal.SIGTERM)
            try:
                mpi.wait(30)
            except subprocess.TimeoutExpired:
                mpi.kill()
                mpi.wait()
        if gui is not None:
            gui.terminate()
            gui.wait(10)
    c = splitter.counters()
    print(
        f"{prog}: splitter: {c['frames_received']} frames received, {c['frames_written']} written, "
        f"{c['frames_forwarded']} forwarded, {c['frames_skipped']} skipped, {c['malformed']} malformed, "
        f"{c['series_ended']} series; files: {', '.join(c['files']) or 'none'}",
        file=sys.stderr,
        flush=True,
    )
    if mpi.returncode not in (0, None) and not stop.is_set():
        code = code or 1
    return code
