"""A clock that moves only when the test says so, for the server's rate limits.

Assign it to `ThreadlineServer.limits.clock` before the first call: every budget and the
per-stream ping cap then refill only on `advance`, so no assertion depends on how fast the
machine runs the calls in between.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
