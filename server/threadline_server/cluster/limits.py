"""Per-user rate budgets shared by every node: each bucket lives in Redis and is spent by one
atomic script, so a user gets one budget however many nodes their calls land on. If Redis is
unreachable or slow the node falls back to its own in-process buckets (RateLimits.check): the
limit is then per node, which is logged, counted in threadline_cluster_fallbacks and shown by
threadline_redis_up, and the node returns to Redis by itself once a call succeeds again.

The script reads Redis's own clock (TIME), so nodes whose clocks differ still agree on refills.
A test that injects a clock (`limits.clock = FakeClock()`) passes its time instead, so refills
happen only when the test says.

Every check goes over one connection (redis-py serializes it): the stream dispatcher relies on
pipelined sends reaching the group committer in the order they were read, and one connection
answers in order. At a Redis round trip of about 0.1 ms that is some 10,000 checks a second per
node, far above what one node writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from redis.exceptions import RedisError

from threadline_server.cluster.redis_client import redis_client
from threadline_server.domain.limits import Budget, Clock, Rate, RateLimits

logger = logging.getLogger(__name__)

# A token bucket (as domain.limits.TokenBucket): refill by elapsed time, take one token or
# return the wait until one is free. The bucket expires once it would be full again.
_SPEND = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(b[1])
local updated = tonumber(b[2])
if tokens == nil or updated == nil then
  tokens = capacity
  updated = now
end
tokens = math.min(capacity, tokens + math.max(0, now - updated) * rate)
updated = math.max(updated, now)
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) / rate
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'updated', string.format('%.17g', updated))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""


class ClusterRateLimits(RateLimits):
    """RateLimits whose buckets are in Redis; `check` (in process) is the fallback."""

    def __init__(
        self,
        rates: Mapping[Budget, Rate],
        *,
        redis_url: str,
        key_prefix: str,
        timeout_s: float,
        retry_s: float,
        on_refused: Callable[[str], None] = lambda _budget: None,
        on_fallback: Callable[[], None] = lambda: None,
        on_redis_up: Callable[[bool], None] = lambda _up: None,
        monotonic: Clock = time.monotonic,
    ) -> None:
        super().__init__(rates, on_refused=on_refused)
        self._redis = redis_client(redis_url, timeout_s, single_connection=True)
        self._script = self._redis.register_script(_SPEND)
        self._prefix = key_prefix
        self._retry_s = retry_s
        self._on_fallback = on_fallback
        self._on_redis_up = on_redis_up
        self._monotonic = monotonic  # when to try Redis again; never the injected test clock
        self._down_until: float | None = None

    async def spend(self, budget: Budget, user_id: str) -> None:
        limiter = self.limiter(budget)
        if limiter is None or limiter.lifted:
            return
        if self._down_until is not None and self._monotonic() < self._down_until:
            self._fallback(budget, user_id)
            return
        now = "" if self.clock is time.monotonic else repr(float(self.clock()))
        try:
            reply = await self._script(
                keys=[f"{self._prefix}:rate:{budget.value}:{user_id}"],
                args=[limiter.capacity, limiter.rate, now],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            if self._down_until is None:
                logger.warning(
                    "redis unreachable (%s): rate budgets are per node until it is back",
                    type(exc).__name__,
                )
                self._on_redis_up(False)
            self._down_until = self._monotonic() + self._retry_s
            self._fallback(budget, user_id)
            return
        if self._down_until is not None:
            logger.warning("redis reachable again: rate budgets are cluster-wide")
            self._down_until = None
        self._on_redis_up(True)
        wait = float(reply)
        if wait > 0:
            self.refused(budget)
            raise limiter.refusal(wait)

    def _fallback(self, budget: Budget, user_id: str) -> None:
        self._on_fallback()
        self.check(budget, user_id)

    async def close(self) -> None:
        await self._redis.aclose()
