"""Helpers for tests and benchmarks: where the real data in ../shared lives."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("INTXR_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared. In CI (CI=true) a missing path fails the test; elsewhere (a user's
    clone without ../shared) the test is skipped with the reason."""
    import pytest

    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"real data not found: {path} (expected ../shared beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
