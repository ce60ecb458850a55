"""`intxrd` / `connect_mpi`: start the Splitter and the MPI pipeline for one beamline and keep them
running until SIGTERM / Ctrl-C (or, for demos and tests, until `--max_series` series are done).

Order of things: the config is validated first (nothing starts on a bad one); the Splitter
binds its reader and publishing endpoints; mpirun starts the Collector and the Readers; the
simulated detector starts last when the config asks for one. Stopping drains in the same
direction data flows: the detector stops, the Splitter writes and serves what it has, closes the
files and publishes its last series_end, the Collector (told alone) sums up every series, then
the readers stop.

Supervision: the MPI job runs in its own session. The daemon listens to the Collector's health
(once a second) and watches mpirun; a Collector that dies or goes silent for a few seconds, or
an mpirun that ends, is said loudly and the whole job is killed and started again, while the
Splitter, its files and its per-series accounts go on (frames that arrive meanwhile are skipped
for processing and counted, never lost from disk). The new Collector is handed the series the
old one summed up and the Splitter's accounts of series that ended meanwhile, and takes the
results the old one had taken of series not summed up from its journals (both in the daemon's
state directory), so every series gets exactly one SERIES line and every frame is counted once.
Too many restarts in 10 minutes and the daemon gives up and exits non-zero. Dead readers are the
Collector's business (it replaces them).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from intxr import config as cfg
from intxr.launch import plan_launch

HEALTH_SILENT_AFTER = 5.0  # seconds without the Collector's health before the job is restarted
START_TIMEOUT = 60.0  # seconds for a new job's Collector to say it is up
RESTART_WINDOW = 600.0  # max_restarts count within this many seconds
RETENTION_INTERVAL = 5.0
KEEP_DONE = 10_000  # names of series summed up, remembered for the next job


def say(prog: str, text: str) -> None:
    print(f"{prog}: {text}", file=sys.stderr, flush=True)


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
    if getattr(args, "no_prescreen", False):
        program.append("--no-prescreen")
    return program


# ---------------------------------------------------------------------------------------------
# Processes


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (mpirun's: the launcher, the ranks, replacement readers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """End mpirun and everything it started, orphaned ranks and replacement readers included. A
    job killed is one given up on: SIGKILL, so that no part of it sums up half a series on its way
    out (the next job, or the daemon, sums up from the Splitter's accounts)."""
    sid = proc.pid
    for _ in range(3):
        pids = session_pids(sid)
        if proc.poll() is None and proc.pid not in pids:
            pids.append(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        while session_pids(sid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.05)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class Job:
    """One run of the MPI job, and what its Collector says on its PUB socket."""

    def __init__(self, command: list[str], env: dict, number: int):
        self.number = number
        # Its own session: a Ctrl-C in the terminal reaches the daemon only, which then stops
        # things in order; and the whole job can be killed at once.
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        self.last_health: float | None = None
        self.collector_pid: int | None = None
        self.collector_host: str | None = None
        self.resumed = False
        self.ending: float | None = None  # when its Collector said it sums up to end
        self.series_done = 0

    def take_health(self, body: dict) -> None:
        pid = body.get("collector_pid")
        host = next((r.get("host") for r in body.get("ranks") or [] if isinstance(r, dict) and r.get("rank") == 0),
                    None)
        if host in (None, os.uname().nodename) and not (isinstance(pid, int) and pid in session_pids(self.proc.pid)):
            return  # from the job before this one, still queued: not this job's Collector
        self.last_health = time.monotonic()
        self.collector_pid = pid if isinstance(pid, int) else None
        self.collector_host = host
        if body.get("ending") is True:
            self.ending = self.ending or time.monotonic()
        self.resumed = self.resumed or body.get("resumed") is True

    def failure(self) -> str | None:
        """Why this job no longer works, or None."""
        code = self.proc.poll()
        if code is not None:
            return f"the MPI job ended (mpirun exit status {code})"
        if self.ending is not None:
            # The Collector ends by itself (--max_series, or told so): its exit is no failure.
            if time.monotonic() - self.ending > 30:
                return "the MPI job did not end within 30 s after its Collector summed up"
            return None
        if (self.collector_pid and self.collector_host in (None, os.uname().nodename)
                and not pid_alive(self.collector_pid)):
            return f"the Collector (rank 0, pid {self.collector_pid}) died"
        now = time.monotonic()
        if self.last_health is not None and now - self.last_health > HEALTH_SILENT_AFTER:
            silent = now - self.last_health
            return f"the Collector (rank 0, pid {self.collector_pid}) has been silent for {silent:.0f} s"
        if self.last_health is None and now - self.started > START_TIMEOUT:
            return f"the Collector did not come up within {START_TIMEOUT:.0f} s"
        return None


# ---------------------------------------------------------------------------------------------
# Retention: the daemon's own output directory stays under a limit


SPLITTER_FILE = re.compile(r"^(?P<name>.+)_(?:master|data_\d{6})\.h5$")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class Retention:
    """Deletes the oldest complete series (master + data files together) while the Splitter's
    files in `directory` hold more than `limit_gb`. Only files named as the Splitter names them
    and that are HDF5 files count, and only series that are complete: closed by this Splitter
    (its `files`) or already there when the daemon started. Never an open series."""

    def __init__(self, directory: str, limit_gb: float):
        self.directory = Path(directory)
        self.limit = int(limit_gb * 1e9)
        self.deleted_series = 0
        self.deleted_bytes = 0
        self._verified: dict[str, int] = {}  # path -> inode of files whose HDF5 signature was read
        self.preexisting = {name for name, _ in self._groups().items()}
        # Names the Splitter has closed: its `files` holds only the latest ones, so they are remembered.
        self.closed: set[str] = set()

    def _groups(self) -> dict[str, list[tuple[Path, int, float]]]:
        groups: dict[str, list[tuple[Path, int, float]]] = {}
        verified: dict[str, int] = {}
        for entry in os.scandir(self.directory):
            m = SPLITTER_FILE.match(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                # Each file's signature is read once (a beamline directory holds many thousands).
                if self._verified.get(entry.path) != st.st_ino:
                    with open(entry.path, "rb") as f:
                        if f.read(8) != HDF5_MAGIC:
                            continue
            except OSError:
                continue
            verified[entry.path] = st.st_ino
            groups.setdefault(m.group("name"), []).append((Path(entry.path), st.st_size, st.st_mtime))
        self._verified = verified
        return groups

    def run(self, closed_masters: list[str]) -> list[str]:
        """Delete what is over the limit; the lines to say."""
        groups = self._groups()
        self.closed.update(Path(m).name.removesuffix("_master.h5") for m in closed_masters)
        self.closed.intersection_update(groups)  # bounded by what is on disk (a name is never reused by the Splitter)
        total = sum(size for files in groups.values() for _, size, _ in files)
        if total <= self.limit:
            return []
        complete = [name for name, files in groups.items()
                    if (name in self.closed or name in self.preexisting)
                    and any(p.name == f"{name}_master.h5" for p, _, _ in files)]
        complete.sort(key=lambda name: max(mtime for _, _, mtime in groups[name]))
        deleted, freed = [], 0
        for name in complete:
            if total <= self.limit:
                break
            size = 0
            for path, nbytes, _ in groups[name]:
                try:
                    path.unlink()
                    size += nbytes
                except FileNotFoundError:
                    pass
            total -= size
            freed += size
            deleted.append(name)
            self.preexisting.discard(name)
            self.closed.discard(name)
        self.deleted_series += len(deleted)
        self.deleted_bytes += freed
        if not deleted:
            return [f"retention: {total / 1e9:.2f} GB in {self.directory} is over output_retention_gb = "
                    f"{self.limit / 1e9:g}, but no complete series is left to delete"]
        names = ", ".join(deleted[:3]) + (f" and {len(deleted) - 3} more" if len(deleted) > 3 else "")
        return [f"retention: deleted {len(deleted)} oldest complete series ({freed / 1e6:.0f} MB: {names}) "
                f"from {self.directory} to stay under {self.limit / 1e9:g} GB"]


# ---------------------------------------------------------------------------------------------
# The GUI


def cannot_listen(host: str, port: int) -> str | None:
    """Why the GUI could not listen on host:port, or None when it can."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} in use on {host}: set gui_port"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc}): set gui_host"
    return None


# ---------------------------------------------------------------------------------------------
# The daemon


class Daemon:
    def __init__(self, args, prog: str, sources: list[str]):
        self.args = args
        self.prog = prog
        self.sources = sources
        self.path = os.path.abspath(args.config_file or cfg.default_startup_file())
        # Validated here: a bad config stops before anything starts.
        self.configuration = cfg.load(self.path, args.beamline, getattr(args, "key_overrides", None))
        self.bl = self.configuration.beamline
        self.launch = plan_launch(
            pipeline_program(args, self.path, self.bl.name),
            mpirun=self.bl.mpirun,
            n_ranks=args.n_proc,
            mpi_bind=args.mpi_bind,
            hosts=args.host,
            hostfile=args.hostfile,
        )
        self.stop = threading.Event()
        self.done_names: list[str] = []  # series the Collectors summed up, in order
        self.done_set: set[str] = set()
        self.restarts: list[float] = []  # when the job failed, within RESTART_WINDOW
        self.jobs_started = 0
        self.job: Job | None = None
        self.job_clean = False  # the last job ended by itself after summing up
        self.gui: subprocess.Popen | None = None
        self.simulator = None
        self.simulator_thread: threading.Thread | None = None
        self.state_dir = Path(tempfile.mkdtemp(prefix="intxrd-"))
        self.resume_path = self.state_dir / "resume.json"
        self.resume_failed_at: float | None = None  # when a failed write was last said (once a minute)
        self.resume_ended: tuple | None = None

    def dry_run(self) -> int:
        bl, prog = self.bl, self.prog
        print(f"{prog}: beamline [{bl.name}] from {self.path}")
        print(f"  splitter: {bl.detector_socket} {bl.detector_endpoint} ({bl.protocol}) -> {bl.output_dir}; "
              f"readers ask on {bl.serve_bind_endpoint}; accounting published on {bl.splitter_publish_bind_endpoint}")
        print(f"  collector: results on {bl.collector_endpoint}, published on {bl.results_publish_endpoint}, "
              f"result lines to {bl.ui_endpoint}" + ("" if bl.send_to_ui else " (send_to_ui off)"))
        if bl.output_retention_gb is not None:
            print(f"  retention: at most {bl.output_retention_gb:g} GB of series files in {bl.output_dir}")
        if self.sources:
            print(f"  simulated detector: intxr simulate --protocol {bl.simulate_protocol} --endpoint "
                  f"{bl.detector_endpoint} --rate {bl.simulate_rate:g} {' '.join(self.sources[:3])}"
                  + (f" ... ({len(self.sources)} sources)" if len(self.sources) > 3 else ""))
        if bl.start_gui:
            print(f"  gui: intxr gui -c {self.path} -b {bl.name} (http://{bl.gui_host}:{bl.gui_port}/)")
        print(self.launch.describe())
        for note in self.configuration.notes():
            print(f"  note: {note}")
        return 0

    # -- pieces --------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        say(self.prog, text)

    def start_job(self) -> Job:
        number = self.jobs_started
        self.jobs_started += 1
        command = [*self.launch.command, "--daemon", f"{os.uname().nodename}:{os.getpid()}",
                   "--state-dir", str(self.state_dir)]
        if number:
            command += ["--job-restarts", str(number), "--resume", str(self.resume_path)]
        if self.args.max_series is not None:
            command += ["--max_series", str(max(1, self.args.max_series - len(self.done_names)))]
        env = {**os.environ, **self.launch.env, "PYTHONUNBUFFERED": "1"}
        self.job = Job(command, env, number)
        if number == 0:
            self.say(f"started {' '.join(command)}")
        return self.job

    def write_resume(self, splitter) -> None:
        """What the next Collector needs: the series summed up already and the Splitter's accounts
        of the others. Rewritten while it starts, whenever a series ends (see Collector.take_resume)."""
        counters = splitter.counters()
        version = (counters.get("series_ended"), counters.get("series_started"), len(self.done_names))
        if version == self.resume_ended and self.resume_path.exists():
            return
        accounts = [a for a in counters.get("series", []) if self.name_of(a) not in self.done_set]
        tmp = self.resume_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"done": self.done_names[-KEEP_DONE:], "accounts": accounts}))
            tmp.replace(self.resume_path)
        except OSError as exc:  # a full disk: the previous file stays; tried again next time
            if self.resume_failed_at is None or time.monotonic() - self.resume_failed_at >= 60.0:
                self.resume_failed_at = time.monotonic()
                self.say(f"cannot write {self.resume_path}: {exc.strerror or exc}; the previous one is kept")
            return
        self.resume_ended = version

    @staticmethod
    def name_of(body: dict) -> str:
        from intxr.messages import series_key

        name = body.get("series_name")
        return series_key(body.get("series"), name if isinstance(name, str) else None)

    def take_done(self, body: dict) -> None:
        name = self.name_of(body)
        if name not in self.done_set:
            self.done_set.add(name)
            self.done_names.append(name)
            if len(self.done_names) > 2 * KEEP_DONE:
                for old in self.done_names[:-KEEP_DONE]:
                    self.done_set.discard(old)
                del self.done_names[:-KEEP_DONE]

    def start_gui(self) -> None:
        bl = self.bl
        why = cannot_listen(bl.gui_host, bl.gui_port)
        if why is not None:
            self.say(f"GUI: {why} in [{bl.name}] of {self.path}; going on without the GUI")
            return
        # Its own process (and session): drawing for browsers never competes with the Splitter's
        # Python side, and a Ctrl-C reaches the daemon, which stops it last.
        self.gui = subprocess.Popen([sys.executable, "-m", "intxr.cli", "gui", "-c", self.path, "-b", bl.name],
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.say(f"GUI on http://{bl.gui_host}:{bl.gui_port}/")

    def check_gui(self) -> None:
        if self.gui is not None and self.gui.poll() is not None:
            self.say(f"GUI: `intxr gui` exited (status {self.gui.returncode}; its reason is above): going on "
                     f"without the live view")
            self.gui = None

    def start_simulator(self) -> None:
        from intxr.simulate import Simulator, SimulatorSettings

        bl, args = self.bl, self.args
        self.simulator = Simulator(
            self.sources,
            SimulatorSettings(
                protocol=bl.simulate_protocol,
                endpoint=bl.detector_endpoint,
                rate=bl.simulate_rate,
                loop=args.max_series is None,
                series=args.max_series or 1,
                keys={"reporting": "", "mapping": "rastering"} if bl.simulate_protocol == "cbftoeiger" else {},
            ),
        )

        def run() -> None:
            try:
                self.simulator.run()
            except Exception as exc:  # one line, never a traceback
                self.say(f"simulated detector: {type(exc).__name__}: {exc}")

        self.simulator_thread = threading.Thread(target=run, name="simulator", daemon=True)
        self.simulator_thread.start()
        self.simulator.ready.wait(30)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        if self.args.dry_run:
            return self.dry_run()
        try:
            return self._run()
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _run(self) -> int:
        import zmq

        from intxr.splitter import Splitter

        for note in self.configuration.notes():
            self.say(f"note: {note}")

        bl = self.bl
        Path(bl.output_dir).mkdir(parents=True, exist_ok=True)

        def on_signal(signum, _frame):
            self.say(f"{signal.Signals(signum).name}: draining and stopping")
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        retention = None
        if bl.output_retention_gb is not None:
            retention = Retention(bl.output_dir, bl.output_retention_gb)
            self.say(f"keeping at most {bl.output_retention_gb:g} GB of series files in {bl.output_dir} "
                     f"(output_retention_gb): the oldest complete series are deleted beyond that")
        splitter = Splitter.from_config(bl, max_series=self.args.max_series).start()
        self.say(f"[{bl.name}] splitter receiving {bl.protocol} on {bl.detector_endpoint}, writing {bl.output_dir}")
        if bl.start_gui:
            self.start_gui()
        health = zmq.Context.instance().socket(zmq.SUB)
        for topic in (b"health", b"series"):
            health.setsockopt(zmq.SUBSCRIBE, topic)
        health.connect(bl.results_publish_endpoint)
        self.write_resume(splitter)
        job = self.start_job()
        code = 0
        splitter_done = None
        last_retention = 0.0
        try:
            while not self.stop.is_set():
                if self.sources and self.simulator is None and job.last_health is not None:
                    # The simulated detector starts once the Collector is up (its first health), so
                    # that even a short first series is accounted from its first frame.
                    self.start_simulator()
                if job.number and not job.resumed:
                    self.write_resume(splitter)
                self.check_gui()
                now = time.monotonic()
                if retention is not None and now - last_retention >= RETENTION_INTERVAL:
                    last_retention = now
                    try:
                        for line in retention.run(splitter.counters().get("files", [])):
                            self.say(line)
                    except OSError as exc:
                        self.say(f"retention: {bl.output_dir}: {exc}")
                # Last before judging the job: what its Collector said while the above took time.
                self.drain(health, job)
                now = time.monotonic()
                if not splitter.running:
                    if self.args.max_series is None:
                        self.say(f"the Splitter stopped: {splitter.counters().get('last_error') or 'no reason given'}")
                        code = 1
                        break
                    splitter_done = splitter_done or now
                    if job.proc.poll() == 0:
                        self.job_clean = True  # the Collector summed up its last series and ended
                        break
                    if now - splitter_done > 30 + 2 * bl.wait_timeout:
                        self.say("the MPI job did not end after the last series: stopping it")
                        code = 1
                        break
                why = job.failure()
                if why is not None:
                    if job.proc.poll() == 0 and job.ending and self.args.max_series is not None:
                        self.job_clean = True  # it summed up its last series and ended
                        break
                    job = self.restart(why, splitter, health)
                    if job is None:
                        code = 1
                        break
                time.sleep(0.1)
        finally:
            code = self.shutdown(splitter, health, code)
        return code

    def drain(self, health, job: Job) -> None:
        while health.poll(0):
            try:
                topic, body = health.recv_multipart()
                message = json.loads(body)
            except ValueError:
                continue  # only the Collector publishes here; a bad one is not worth a restart
            if not isinstance(message, dict):
                continue
            if topic == b"health":
                job.take_health(message)
            elif topic == b"series":
                self.take_done(message)
                job.series_done += 1

    def restart(self, why: str, splitter, health) -> Job | None:
        """Kill what is left of the job and start it again; None when it has failed too often."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
        limit = self.bl.max_restarts
        self.say(f"JOB FAILED: {why}: stopping what is left of it (the Splitter goes on writing; frames are "
                 f"skipped for processing until the job is back)")
        kill_session(self.job.proc)
        self.restarts.append(now)
        if len(self.restarts) > limit:
            self.say(f"the MPI job failed {len(self.restarts)} times in {RESTART_WINDOW / 60:.0f} min "
                     f"(max_restarts = {limit}): giving up")
            return None
        # A series the old Collector summed up just before it died is in the resume file as done.
        self.drain(health, self.job)
        self.resume_ended = None  # written now, whatever changed, and again whenever a series ends
        self.write_resume(splitter)
        job = self.start_job()
        self.say(f"restarting the MPI job (restart {len(self.restarts)} of at most {limit} in "
                 f"{RESTART_WINDOW / 60:.0f} min): mpirun pid {job.proc.pid}")
        return job

    def shutdown(self, splitter, health, code: int) -> int:
        job = self.job
        if self.simulator is not None:
            self.simulator.stop()
            # Its queued frames reach the Splitter, and so the disk, before the Splitter stops.
            limit = self.simulator.drain_timeout + 5
            if self.simulator_thread is not None:
                self.simulator_thread.join(limit)
                if self.simulator_thread.is_alive():
                    self.say(f"the simulated detector did not finish sending within {limit:.0f} s")
            # What has left it may still be in the Splitter's socket: taken in before the stop.
            settle, last = time.monotonic() + 3.0, None
            while time.monotonic() < settle and (count := splitter.counters()["messages"]) != last:
                last = count
                time.sleep(0.3)
        splitter.stop()
        if not splitter.join(60):
            self.say("the Splitter did not finish writing within 60 s")
            code = code or 1
        if job is not None and job.proc.poll() is None:
            # A job still starting is waited for: its Collector is the one to sum up.
            while job.proc.poll() is None and job.last_health is None and job.failure() is None:
                self.drain(health, job)
                time.sleep(0.1)
            self.drain(health, job)
            if job.collector_pid and pid_alive(job.collector_pid):
                # The Collector alone is told: it takes the Splitter's last series_end, sums up every
                # series (mpirun still forwards what it prints) and stops the readers.
                try:
                    os.kill(job.collector_pid, signal.SIGTERM)
                except OSError:
                    pass
                deadline = time.monotonic() + 20 + min(self.configuration.beamline.wait_timeout, 5.0)
                while job.proc.poll() is None and time.monotonic() < deadline:
                    self.drain(health, job)
                    time.sleep(0.1)
                self.job_clean = job.proc.poll() == 0
                if job.proc.poll() is None:
                    self.say("the MPI job did not end when told: stopping it")
            else:
                self.say("no Collector is up to sum up: stopping the MPI job")
        if job is not None:
            kill_session(job.proc)  # ranks a dead launcher left behind, too
            self.drain(health, job)
        health.close(linger=0)
        if job is not None and not self.job_clean:
            self.sum_up_unaccounted(splitter)
        if self.gui is not None:
            self.gui.terminate()
            try:
                self.gui.wait(10)
            except subprocess.TimeoutExpired:
                self.gui.kill()
        c = splitter.counters()
        self.say(
            f"splitter: {c['frames_received']} frames received, {c['frames_written']} written, "
            f"{c['frames_forwarded']} forwarded, {c['frames_skipped']} skipped, {c['malformed']} malformed, "
            f"{c['series_ended']} series; files: {', '.join(c['files'][-20:]) or 'none'}"
            + (f" (and {c['master_files'] - 20} more)" if c["master_files"] > 20 else "")
        )
        if self.jobs_started > 1:
            self.say(f"the MPI job was restarted {self.jobs_started - 1} time(s)")
        if job is not None and not self.stop.is_set() and job.proc.returncode not in (0, None):
            code = code or 1
        return code

    def sum_up_unaccounted(self, splitter) -> None:
        """The job ended without summing up every series (it died, or it was given up): the SERIES
        line of each series no Collector summed up, from the Splitter's accounts and the results
        the dead Collector journaled; frames forwarded to the dead job without a result count as
        failed. A raster series' RASTER line too, from the hits journaled (the Collector's code)."""
        from intxr.collector import SeriesAccount, final_raster_report, journal_path, read_journal
        from intxr.messages import SeriesEnd

        rasters = []
        for account in splitter.counters().get("series", []):
            name = self.name_of(account)
            if name in self.done_set or not isinstance(account.get("series"), int) or "timed_out" not in account:
                continue  # summed up already, or not ended (no series_end recorded)
            series = SeriesAccount(account["series"], name)
            journal = journal_path(self.state_dir, name)
            if os.path.exists(journal):
                try:
                    series, _, _ = read_journal(journal)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    self.say(f"journal of series {name} unreadable ({type(exc).__name__}: {exc}): its results "
                             f"count as failed")
                os.unlink(journal)
            try:
                series.take_end(SeriesEnd.from_wire(account))
            except (TypeError, ValueError):  # BadMessage is a ValueError
                continue
            series.written = account.get("frames_written")
            series.master_file = account.get("master_file")
            print(series.summary().line() + " (summed up by the daemon: no Collector was left)", flush=True)
            self.take_done(account)
            if series.raster is not None and series.raster.raster:
                try:
                    report = final_raster_report(series, series.raster, self.bl.raster_row_length,
                                                 self.bl.raster_snake)
                    rasters.append((report.line(), report.to_wire()))
                    print(rasters[-1][0], flush=True)
                except Exception as exc:  # a crystal map is never worth the daemon's end
                    self.say(f"series {name}: raster scan not summed up ({type(exc).__name__}: {exc}); its "
                             f"crystals are not reported")
        if rasters:
            self.send_rasters(rasters)

    def send_rasters(self, rasters: list[tuple[str, dict]]) -> None:
        """RASTER lines the daemon made (on stdout already) to the record and BluIce's socket, as the
        Collector's."""
        import zmq

        if self.args.record:
            try:
                with open(self.args.record, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps({"raster": wire}) + "\n" for _, wire in rasters)
            except OSError as exc:
                self.say(f"cannot write the RASTER lines to {self.args.record}: {exc.strerror or exc}")
        bl = self.bl
        if not bl.send_to_ui:
            return
        from intxr.collector import open_ui_socket

        try:
            # Queued until the listener (re)connects; closing waits up to 2 s for it, then drops.
            with open_ui_socket(zmq.Context.instance(), bl, linger_ms=2000, immediate=False) as ui:
                if bl.uistype == "pub":
                    time.sleep(0.5)  # subscribers reconnect (a PUB drops what it sends before)
                for line, _ in rasters:
                    ui.send_string(line, zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            self.say(f"cannot send the RASTER lines to {bl.ui_endpoint}: {exc}")


def run_daemon(args, prog: str, sources: list[str]) -> int:
    return Daemon(args, prog, sources).run()
