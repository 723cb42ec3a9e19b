"""Reconnect and retry delays: capped exponential backoff with full jitter.

Full jitter (a uniformly random delay between 0 and the capped exponential) is what spreads a
crowd of clients out after a server restart; plain exponential backoff makes them all return in
lockstep (AWS Architecture Blog, "Exponential Backoff and Jitter").
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Backoff"]

# Past this many doublings every realistic cap is reached; stopping here keeps `multiplier **
# attempt` from overflowing a float on a client that has been retrying for days.
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay policy for retry or reconnect attempt `n` (0-based).

    Attributes:
        initial: Cap of the first delay, in seconds.
        maximum: Cap of every delay, in seconds.
        multiplier: Growth of the cap per attempt.
        rng: Random source; pass a seeded `random.Random` for reproducible tests.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError("need 0 < initial <= maximum and multiplier >= 1")

    def cap(self, attempt: int) -> float:
        """The upper bound of the delay for an attempt: `min(maximum, initial * multiplier**n)`."""
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        """The delay before attempt `attempt`, in seconds.

        Args:
            attempt: How many attempts have failed so far (0 for the first retry).
            retry_after: A server-given minimum delay (RetryInfo or StreamError.retry_after).
                The result is then at least that, plus up to 20% so clients told the same delay
                do not all return at the same instant.

        Returns:
            A uniformly random delay in `[0, cap(attempt)]`, or the spread server delay.
        """
        if retry_after is not None and retry_after > 0:
            return retry_after * (1.0 + 0.2 * self.rng.random())
        return self.rng.uniform(0.0, self.cap(attempt))

    def delays(self) -> Iterator[float]:
        """An endless iterator of delays for attempts 0, 1, 2, …"""
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1
