"""Rate limits: a token bucket per user (pure; the clock is injected)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from threadline_server.errors import RateLimited


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`per_minute` operations per key, in bursts of up to `per_minute`, refilled evenly.

    Keyed by user, not by connection: a user with five streams still gets one budget, so opening
    more connections never multiplies it. In-process: each node enforces its own budget.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key: str) -> None:
        """Takes one token for `key`, or raises RateLimited with the wait until one is free."""
        if self._capacity <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._capacity, now)
        else:
            bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens < 1.0:
            raise RateLimited((1.0 - bucket.tokens) / self._rate)
        bucket.tokens -= 1.0
        if len(self._buckets) > 10_000:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Buckets that have refilled completely carry no state worth keeping."""
        horizon = self._capacity / self._rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= horizon]:
            del self._buckets[key]
