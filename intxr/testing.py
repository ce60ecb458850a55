"""Helpers for tests and benchmarks: where the real data in ../shared lives; free loopback ports."""

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


def free_ports(n: int) -> list[int]:
    """`n` free loopback ports outside the kernel's ephemeral range. A port the kernel hands out
    (bound to port 0, then closed) is often handed out again at once as the source port of the next
    connect, and a later bind of it then fails; a connect to a port nobody has bound yet can even
    connect to itself (TCP self-connect) when the port is an ephemeral one."""
    import random
    import socket

    low, high = 32768, 60999
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        pass
    candidates = [*range(high + 1, 65536), *range(max(1024, low - 12_000), low)]
    ports: list[int] = []
    for port in random.SystemRandom().sample(candidates, min(len(candidates), 200)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError("no free ports outside the ephemeral range")
