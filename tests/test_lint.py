"""Lint and the Rust unit tests are part of the test suite (ruff, cargo clippy, cargo test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from intxr.testing import ROOT


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_clean():
    result = run([sys.executable, "-m", "ruff", "check", "."])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("cargo") is None and os.environ.get("CI") != "true", reason="no cargo on PATH")
def test_cargo_clippy_clean():
    result = run(["cargo", "clippy", "--all-targets", "--", "-D", "warnings"])
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(shutil.which("cargo") is None and os.environ.get("CI") != "true", reason="no cargo on PATH")
def test_cargo_unit_tests():
    result = run(["cargo", "test", "--quiet"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
