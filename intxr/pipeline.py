"""What every MPI rank runs (`python -m intxr.pipeline`, started by the daemon through mpirun):
rank 0 the Collector, every other rank a Reader. MPI places and pins the ranks and tells each
its number; the frames and results travel over ZeroMQ (TCP), so one rank dying leaves the
others running, and readers on other nodes work the same way.

`--reader RANK` runs one reader without MPI: the Collector starts one so when a reader rank dies
(bound to the dead rank's CPUs; it stops when the Collector, `--parent`, is gone).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from intxr import config as cfg
from intxr.launch import current_placement


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m intxr.pipeline", description=__doc__)
    p.add_argument("-c", "--config_file", required=True)
    p.add_argument("-b", "--beamline", required=True)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--time", action="store_true")
    p.add_argument("--record")
    p.add_argument("-f", "--result_format", choices=["line", "json"], default="line")
    p.add_argument("--max_series", type=int, default=None)
    p.add_argument("--no-prescreen", action="store_true", help="run the full spot finder on every frame")
    p.add_argument("--reader", type=int, metavar="RANK", help="one reader without MPI (a replacement)")
    p.add_argument("--parent", type=int, metavar="PID", help="with --reader: stop when this process is gone")
    p.add_argument("--job-restarts", type=int, default=0, help="times the daemon restarted the job before")
    p.add_argument("--resume", metavar="FILE", help="the daemon's series accounts after a job restart")
    p.add_argument("--state-dir", metavar="DIR", help="the daemon's state directory: the Collector's journals")
    p.add_argument("--daemon", metavar="HOST:PID", help="the Collector ends when this daemon process is gone")
    return p


def rank_and_size() -> tuple[int, int, object]:
    import mpi4py

    # No MPI_Finalize at exit: it waits on every rank, so one dead reader would hang the others
    # at the end of a run (seen with Open MPI 5 and --enable-recovery). After the placement gather
    # the ranks talk only over ZeroMQ, so there is nothing for it to finish.
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm


def placement_line(p: dict) -> str:
    return (f"rank {p['rank']:3d} {'collector' if p['rank'] == 0 else 'reader':9s} host {p['host']} pid {p['pid']} "
            f"on CPU {p['cpu']} (allowed {p['cpus']}), NUMA node {p['numa']}")


def reader_settings(configuration, rank: int, args):
    from intxr.reader.worker import ReaderSettings

    bl = configuration.beamline
    return ReaderSettings(
        rank=rank,
        splitter_endpoint=bl.reader_endpoint,
        collector_endpoint=bl.collector_endpoint,
        control_endpoint=bl.results_publish_endpoint,
        timeout=bl.wait_timeout,
        skip_prescreen=args.no_prescreen,
    )


def reader_command(args) -> list[str]:
    """How the Collector starts a replacement reader (it adds --reader RANK --parent PID)."""
    command = [sys.executable, "-m", "intxr.pipeline", "-c", args.config_file, "-b", args.beamline]
    return command + (["--no-prescreen"] if args.no_prescreen else [])


def run(args, stopping: dict) -> int:
    configuration = cfg.load(args.config_file, args.beamline)
    if args.reader is not None:
        from intxr.reader.worker import Reader

        parent = args.parent
        reader = Reader(reader_settings(configuration, args.reader, args), configuration)
        print("  " + placement_line({"rank": args.reader, **reader.placement}) + " (replacement, no MPI)",
              file=sys.stderr, flush=True)
        # A replacement outlives nothing: when its Collector is gone, so is it.
        return reader.run(stop=lambda: stopping["now"] or (parent is not None and os.getppid() != parent))
    rank, size, comm = rank_and_size()
    placement = {"rank": rank, **current_placement()}
    # The one collective: rank 0 learns where every rank really runs (a misplaced rank stands out).
    placements = comm.gather(placement, root=0)
    if rank == 0:
        from intxr.collector import Collector, CollectorSettings

        print(f"pipeline: {size} ranks, 1 collector and {size - 1} readers; where each runs "
              f"(buffers are first touched, so allocated, on the NUMA node of its CPU):", file=sys.stderr)
        for p in placements:
            print("  " + placement_line(p), file=sys.stderr)
        shared = [p["cpu"] for p in placements]
        if len(set(shared)) < len(shared):
            print("  note: some ranks run on the same CPU", file=sys.stderr)
        sys.stderr.flush()
        collector = Collector(
            configuration,
            CollectorSettings(verbose=args.verbose, show_time=args.time, record=args.record,
                              result_format=args.result_format, max_series=args.max_series,
                              grace=max(configuration.beamline.wait_timeout, 5.0),
                              reader_command=reader_command(args), job_restarts=args.job_restarts,
                              resume_file=args.resume, state_dir=args.state_dir, daemon=args.daemon),
            ranks=placements,
        )
        return collector.run(stop=lambda: stopping["now"])
    from intxr.reader.worker import Reader

    reader = Reader(reader_settings(configuration, rank, args), configuration)
    return reader.run(stop=lambda: stopping["now"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config_file = os.path.abspath(args.config_file)
    stopping = {"now": False}

    def on_signal(signum, _frame):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    role = f"reader rank {args.reader}" if args.reader is not None else "pipeline"
    try:
        code = run(args, stopping)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # one line, never a traceback: the daemon notices the exit and acts
        print(f"{role} (pid {os.getpid()}): error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
