"""The per-user connection cap across the cluster (realtime.max_connections_per_user): a user's
streams on every node are one sorted set in Redis, by connect time, so the newest connection
anywhere closes the oldest beyond the cap, wherever it is (REPLACED, as on one node).

A connect adds its stream and trims the set in one script, which returns the streams it
evicted; the node holding each closes it (the evicting node itself, or the owner when told on
`<prefix>:control`). Entries of a node that died are the oldest of their sets and so the first
evicted, and each set expires a day after its user's last connect. With Redis unreachable the
node's own cap (LocalBroker) still holds, per node, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from threadline_server.cluster.redis_client import redis_client

logger = logging.getLogger(__name__)

_CONNECT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if over <= 0 then
  return {}
end
local evicted = redis.call('ZRANGE', KEYS[1], 0, over - 1)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
return evicted
"""

_SET_TTL_S = 86_400


class ConnectionRegistry:
    def __init__(
        self,
        *,
        redis_url: str,
        key_prefix: str,
        node_id: str,
        cap: int,
        timeout_s: float,
        retry_s: float,
        replace_local: Callable[[str], None],
        on_fallback: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis = redis_client(redis_url, timeout_s)
        self._connect = self._redis.register_script(_CONNECT)
        self._prefix = key_prefix
        self._control = f"{key_prefix}:control"
        self.node_id = node_id
        self._cap = cap
        self._retry_s = retry_s
        self._replace_local = replace_local
        self._on_fallback = on_fallback
        self._pending: set[asyncio.Task[None]] = set()
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        """Lets the last removals reach Redis (streams closed just before), briefly."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=1.0)
        tasks = [*self._pending, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    def connected(self, user_id: str, session_id: str) -> None:
        self._connecting[session_id] = self._spawn(self._connected(user_id, session_id))

    def disconnected(self, user_id: str, session_id: str) -> None:
        # After its own connect's script: a removal that overtook its addition would leave
        # the stream in the set for good.
        added = self._connecting.pop(session_id, None)
        _ = self._spawn(self._disconnected(user_id, session_id, added))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def _key(self, user_id: str) -> str:
        return f"{self._prefix}:conns:{user_id}"

    async def _connected(self, user_id: str, session_id: str) -> None:
        try:
            evicted = await self._connect(
                keys=[self._key(user_id)],
                args=[f"{self.node_id}|{session_id}", self._cap, _SET_TTL_S],
            )
            for entry in evicted:
                node, _, sid = bytes(entry).decode().partition("|")
                if node == self.node_id:
                    self._replace_local(sid)
                else:
                    await self._redis.publish(self._control, f"{node}|{sid}")
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning(
                "redis unreachable (%s): the connection cap is per node", type(exc).__name__
            )
            self._on_fallback()

    async def _disconnected(
        self, user_id: str, session_id: str, added: asyncio.Task[None] | None
    ) -> None:
        if added is not None:
            await asyncio.wait([added])
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._redis.zrem(self._key(user_id), f"{self.node_id}|{session_id}")

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._control)
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    node, _, sid = bytes(message["data"]).decode().partition("|")
                    if node == self.node_id:
                        self._replace_local(sid)
            except (RedisError, OSError, TimeoutError):
                await asyncio.sleep(self._retry_s)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
