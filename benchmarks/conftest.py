"""Benchmarks: each group times intxr and a baseline in the same run; the summary prints the ratio.

Mark the roles with `benchmark.extra_info["role"] = "intxr"` or `"baseline:<name>"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from intxr.testing import shared_path

# The default test run (`--benchmark-disable`, from pyproject's addopts) does one smoke round of
# each benchmark so none rots: on the small inputs only. The 16M frames and the paced pipeline
# runs add minutes and prove nothing the 6M and burst runs do not; `--benchmark-enable` runs all.
SMOKE_LEFT_OUT = ("16M", "15Hz")


def _benchmarks_disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


def pytest_collection_modifyitems(config, items):
    if not _benchmarks_disabled(config):
        return
    here = Path(__file__).parent
    large = [item for item in items
             if here in Path(str(item.fspath)).parents and any(word in item.name for word in SMOKE_LEFT_OUT)]
    if large:
        config.hook.pytest_deselected(items=large)
        items[:] = [item for item in items if item not in large]


@pytest.fixture(scope="session")
def thaumatin_frame_path() -> Path:
    return shared_path("data", "cbf", "thaumatin_grid", "thau_3_2_0005.cbf.bz2")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        if not bench.stats or not bench.stats.rounds:
            continue
        role = bench.extra_info.get("role", bench.name)
        groups.setdefault(bench.group or bench.name, {})[role] = bench.stats.median
    lines = []
    for group, roles in sorted(groups.items()):
        ours = roles.get("intxr")
        for role, median in sorted(roles.items()):
            if role != "intxr" and ours:
                lines.append(
                    f"{group}: intxr {ours * 1e3:.2f} ms, {role} {median * 1e3:.2f} ms, speed-up x{median / ours:.2f}"
                )
    if lines:
        terminalreporter.section("intxr vs baselines (median)")
        for line in lines:
            terminalreporter.write_line(line)
