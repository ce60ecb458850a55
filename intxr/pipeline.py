"""What every MPI rank runs (`python -m intxr.pipeline`, started by the daemon through mpirun):
rank 0 the Collector, every other rank a Reader. MPI places and pins the ranks and tells each
its number; the frames and results travel over ZeroMQ (TCP), so one rank dying leaves the
others running, and readers on other nodes work the same way.
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configuration = cfg.load(args.config_file, args.beamline)
    rank, size, comm = rank_and_size()
    placement = {"rank": rank, **current_placement()}
    # The one collective: rank 0 learns where every rank really runs (a misplaced rank stands out).
    placements = comm.gather(placement, root=0)
    stopping = {"now": False}

    def on_signal(signum, _frame):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
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
                              grace=max(configuration.beamline.timeout or 10.0, 5.0)),
            ranks=placements,
        )
        code = collector.run(stop=lambda: stopping["now"])
    else:
        from intxr.reader.worker import Reader, ReaderSettings

        bl = configuration.beamline
        reader = Reader(
            ReaderSettings(
                rank=rank,
                splitter_endpoint=bl.reader_endpoint,
                collector_endpoint=bl.collector_endpoint,
                control_endpoint=bl.results_publish_endpoint,
                timeout=bl.timeout or 10.0,
                skip_prescreen=args.no_prescreen,
            ),
            configuration,
        )
        code = reader.run(stop=lambda: stopping["now"])
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
