"""One stderr line for the first of a kind of trouble, then at most one every `interval` seconds
with how many more came: garbage on a socket, or a reader failing every frame, must not flood the
terminal. Used by the readers, the Collector and the GUI alike."""

from __future__ import annotations

import sys
import time

REPORT_INTERVAL = 10.0  # seconds between two lines of one reporter


class Reporter:
    """`reporter(reason)` counts one and says it: the first at once as
    `<prefix>: <what>[ on <where>]: <reason><note>`, later ones as
    `<prefix>: <n> more <what>(s)[ on <where>] (<count> in all; last: <reason>)` at most once
    every `interval` seconds (`tick()` says what is pending once the interval has passed)."""

    def __init__(self, prefix: str, what: str, where: str = "", *, note: str = "; counted and ignored",
                 interval: float = REPORT_INTERVAL, log=None):
        self.prefix, self.what, self.note, self.interval = prefix, what, note, interval
        self.where = f" on {where}" if where else ""
        self.log = log
        self.count = 0
        self.unreported = 0
        self.last_reason = ""
        self.reported_at: float | None = None

    def __call__(self, reason: str) -> None:
        self.count += 1
        self.unreported += 1
        self.last_reason = reason
        self.tick()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if not self.unreported or (self.reported_at is not None and now - self.reported_at < self.interval):
            return
        if self.count == 1:
            line = f"{self.prefix}: {self.what}{self.where}: {self.last_reason}{self.note}"
        else:
            line = (f"{self.prefix}: {self.unreported} more {self.what}(s){self.where} "
                    f"({self.count} in all; last: {self.last_reason})")
        print(line, file=self.log or sys.stderr, flush=True)
        self.unreported = 0
        self.reported_at = now

    def flush(self) -> None:
        """Say what is pending now (at the end of a run)."""
        self.reported_at = None
        self.tick()
