"""Rate limits: token buckets per user, one set per named budget (pure; the clock is injected)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from threadline_server.errors import RateLimited

Clock = Callable[[], float]

_MAX_KEYS = 10_000  # past this many users in one budget, refilled buckets are forgotten


class Budget(StrEnum):
    """The per-user budgets. Each covers the writes named here and nothing else, so a burst of
    one kind (say, thread creation) never starves another (say, sending messages)."""

    MESSAGES = "messages"  # stream sends, edits, deletes and other message operations
    THREAD_WRITES = "thread_writes"  # create, update, archive, unarchive, delete a thread
    PARTICIPANT_CHANGES = "participant_changes"  # AddParticipants, RemoveParticipants
    UPLOADS = "uploads"  # CreateUpload, CompleteUpload
    READ_MARKERS = "read_markers"  # MarkRead and the stream's read_marker operation
    TYPING = "typing"  # typing frames (over budget: dropped, never answered)
    REFRESH_AUTH = "refresh_auth"  # RefreshAuth frames
    PREFERENCES = "preferences"  # UpdatePreferences


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_minute` tokens a minute, refilled evenly, held up to `burst` at once; a
    `per_minute` of 0 lifts the budget."""

    per_minute: int
    burst: int


@dataclass(slots=True)
class TokenBucket:
    """One bucket: `capacity` tokens at most, `rate` tokens a second."""

    capacity: float
    rate: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, capacity: float, rate: float, now: float) -> TokenBucket:
        return cls(capacity, rate, capacity, now)

    def take(self, now: float) -> float:
        """Takes one token and returns 0.0; or takes nothing and returns the seconds until one
        is free (a refused call costs nothing, so waiting that long always succeeds)."""
        # max(): a clock that steps back (an injected one) must never mint tokens.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)
        if self.tokens < 1.0:
            return (1.0 - self.tokens) / self.rate
        self.tokens -= 1.0
        return 0.0


class RateLimiter:
    """`per_minute` operations per key, in bursts of up to `burst` (default: `per_minute`).

    Keyed by user, not by connection: a user with five streams still gets one budget, so opening
    more connections never multiplies it. In process: a cluster keeps the buckets in Redis
    (cluster.limits) and uses these only while Redis is unreachable.
    """

    def __init__(
        self,
        per_minute: int,
        clock: Clock = time.monotonic,
        *,
        burst: int | None = None,
        name: str = "operations",
    ) -> None:
        self.name = name
        self.per_minute = per_minute
        self._capacity = float(per_minute if burst is None else burst)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def lifted(self) -> bool:
        return self._rate <= 0 or self._capacity <= 0

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def rate(self) -> float:
        """Tokens a second."""
        return self._rate

    def refusal(self, wait: float) -> RateLimited:
        refused = RateLimited(
            wait, f"rate limit exceeded: {self.name} allows {self.per_minute} per minute"
        )
        refused.metadata["budget"] = self.name
        return refused

    def check(self, key: str) -> None:
        """Takes one token for `key`, or raises RateLimited with the wait until one is free."""
        if self.lifted:
            return
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket.full(self._capacity, self._rate, now)
        wait = bucket.take(now)
        if wait > 0:
            raise self.refusal(wait)
        if len(self._buckets) > _MAX_KEYS:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Buckets that have refilled completely carry no state worth keeping."""
        horizon = self._capacity / self._rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= horizon]:
            del self._buckets[key]


class RateLimits:
    """Every budget of the server: one bucket set per `Budget`, each with its own rate and burst.

    `clock` is the seam for tests (and the one clock of every rate decision, the per-stream ping
    cap included): assign a function returning seconds before the first call is checked, and
    the buckets refill only when it says time has passed. `on_refused(budget)` is told of each
    refusal (the server counts them in /metrics).
    """

    def __init__(
        self,
        rates: Mapping[Budget, Rate],
        clock: Clock = time.monotonic,
        on_refused: Callable[[str], None] = lambda _budget: None,
    ) -> None:
        self.clock = clock
        self._on_refused = on_refused
        self._limiters = {
            budget: RateLimiter(rate.per_minute, self._now, burst=rate.burst, name=budget.value)
            for budget, rate in rates.items()
        }

    def _now(self) -> float:
        return self.clock()  # read at each check, so a clock assigned later takes effect

    def check(self, budget: Budget, user_id: str) -> None:
        """Spends one token of `budget` for the user from this node's buckets, or raises
        RateLimited (RetryInfo: the wait until one is free). A budget without a configured rate
        is unlimited."""
        limiter = self._limiters.get(budget)
        if limiter is None:
            return
        try:
            limiter.check(user_id)
        except RateLimited:
            self._on_refused(budget.value)
            raise

    async def spend(self, budget: Budget, user_id: str) -> None:
        """As `check`, where the budget is kept: here in process; a cluster's limits
        (cluster.limits) keep it in Redis, shared by every node. Callers use this one."""
        self.check(budget, user_id)

    def limiter(self, budget: Budget) -> RateLimiter | None:
        return self._limiters.get(budget)

    def refused(self, budget: Budget) -> None:
        self._on_refused(budget.value)
