"""Shared fixtures: the real data in ../shared (required in CI, skipped with a reason elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from intxr.testing import shared_path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path("data")


@pytest.fixture(scope="session")
def thaumatin_cbfs(shared_data) -> list[str]:
    files = sorted(str(p) for p in (shared_data / "cbf" / "thaumatin_grid").glob("thau_3_2_*.cbf.bz2"))
    assert len(files) == 12, files
    return files
