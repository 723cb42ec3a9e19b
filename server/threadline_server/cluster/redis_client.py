"""The Redis client every cluster part opens, with the same bounds: `timeout_s` on each call
and connect, and one retry at once, so that a connection Redis dropped (a restart) is replaced
on the next call, while with Redis down one failed reconnect and the caller falls back."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def redis_client(url: str, timeout_s: float, *, single_connection: bool = False) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        single_connection_client=single_connection,
        retry=Retry(NoBackoff(), 1),
    )
