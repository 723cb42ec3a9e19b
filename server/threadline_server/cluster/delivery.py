"""Delivery across the nodes of a cluster: every node gives its own streams every committed
change, whichever node committed it, in change_seq order.

The changes table is the log; Redis pub/sub is its doorbell. A node that commits delivers its
own events at once (as a single node does) and publishes "node, last change_seq" on
`<prefix>:commits`. The other nodes read what they have not delivered yet, up to that cursor,
from the changes table (SyncStore.committed_after, a page per read) and deliver it. Why not the
events themselves in Redis: the table already holds each change, gapless and durable, so a
doorbell lost by pub/sub (it is at most once), a node that died between COMMIT and PUBLISH, or
Redis down altogether all end the same way, by reading the table, with no second copy of the
events to keep consistent. The price is one read per node per wake-up (many commits share it).

Ordering: change cursors are reserved last in every write transaction, under the one
server_state row lock, so when any node learns of cursor N (its own commit or a doorbell), every
cursor below N has committed already and the table has no holes to wait for. A node therefore
holds back its own commit only while earlier cursors (other nodes') are still being read, and
per-thread order follows from cursor order.

Redis down: doorbells stop; each node reads the table every `cluster.tail_interval_s` instead
(logged, counted, threadline_redis_up 0) and goes back to doorbells when Redis answers. While
Redis is up the node also reads every `cluster.safety_poll_s`, for doorbells pub/sub dropped.

Recipients of a change read from the table are its thread's members as this node reads them now
(or the one user a personal change is for): the delivering node checks membership itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from threadline_server.domain.models import Event, TypingState

logger = logging.getLogger(__name__)

ReadAfter = Callable[[int, int], Awaitable[tuple[list[Event], int | None]]]
Deliver = Callable[[list[Event]], None]
OnTyping = Callable[[TypingState], Awaitable[None]]

# Typing signals waiting for Redis: past this many (Redis slow or down) the oldest are dropped;
# they are advisory and expire on their own.
_MAX_OUTBOX = 1_000


class ClusterDelivery:
    def __init__(
        self,
        *,
        redis_url: str,
        key_prefix: str,
        node_id: str,
        timeout_s: float,
        retry_s: float,
        tail_interval_s: float,
        safety_poll_s: float,
        read_after: ReadAfter,
        latest: Callable[[], Awaitable[int]],
        deliver_local: Deliver,
        deliver_remote: Deliver,
        on_typing: OnTyping,
        on_redis_up: Callable[[bool], None] = lambda _up: None,
        on_tailed: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self._channel = f"{key_prefix}:commits"
        self._ephemeral_channel = f"{key_prefix}:ephemeral"
        self._on_typing = on_typing
        self._outbox: deque[str] = deque(maxlen=_MAX_OUTBOX)
        self.node_id = node_id
        self._retry_s = retry_s
        self._tail_interval_s = tail_interval_s
        self._safety_poll_s = safety_poll_s
        self._read_after = read_after
        self._latest = latest
        self._deliver_local = deliver_local
        self._deliver_remote = deliver_remote
        self._on_redis_up = on_redis_up
        self._on_tailed = on_tailed
        self._delivered = 0  # every change up to here is with this node's streams
        self._target = 0  # the highest change known to have committed
        self._held: dict[int, list[Event]] = {}  # this node's commits waiting on earlier ones
        self._reading = False
        self._wake = asyncio.Event()
        self._announce = 0  # the highest own change not yet announced
        self._ring = asyncio.Event()
        self._redis_up = True
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Everything committed before this node started is history: its streams get it by
        resuming from the table."""
        self._delivered = self._target = await self._latest()
        for work in (self._deliver_loop(), self._listen(), self._announce_loop()):
            self._tasks.append(asyncio.create_task(work))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    def committed(self, events: list[Event]) -> None:
        """This node's commit, in commit order (under its write lock), caches already applied."""
        ephemeral = [e for e in events if not e.change_seq]
        if ephemeral:
            self._deliver_local(ephemeral)
        fresh = [e for e in events if e.change_seq > self._delivered]
        if not fresh:
            return
        seqs = sorted({e.change_seq for e in fresh})
        last = seqs[-1]
        idle = not self._reading and not self._held and self._target <= self._delivered
        if idle and seqs == list(range(self._delivered + 1, last + 1)):
            self._deliver_local(fresh)  # nothing earlier outstanding: as a single node does
            self._delivered = self._target = last
        else:
            for event in fresh:
                self._held.setdefault(event.change_seq, []).append(event)
            self._target = max(self._target, last)
            self._wake.set()
        self._announce = max(self._announce, last)
        self._ring.set()

    def relay(self, events: list[Event]) -> None:
        """Ephemeral events of this node (typing: no cursor, not in the table): to its own
        streams at once, and to the other nodes through Redis, at most once. Each receiving
        node addresses them to the thread's members as it knows them."""
        self._deliver_local(events)
        for event in events:
            state = event.payload
            if isinstance(state, TypingState):
                self._outbox.append(
                    json.dumps(
                        {
                            "node": self.node_id,
                            "thread": state.thread_id,
                            "user": state.user_id,
                            "active": state.active,
                            "expires": state.expires_at,
                        }
                    )
                )
        self._ring.set()

    # ---- reading what other nodes committed -----------------------------------------------

    async def _deliver_loop(self) -> None:
        while True:
            interval = self._safety_poll_s if self._redis_up else self._tail_interval_s
            polled = False
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                polled = True
            self._wake.clear()
            if polled or not self._redis_up:  # no doorbells to trust: ask the table itself
                try:
                    self._target = max(self._target, await self._latest())
                except Exception:
                    logger.exception("reading the latest change cursor failed")
                    continue
            try:
                await self._catch_up()
            except Exception:  # the database is away: try again at the next wake-up or poll
                logger.exception("delivering other nodes' changes failed; retrying")
                await asyncio.sleep(self._tail_interval_s)
                self._wake.set()

    async def _catch_up(self) -> None:
        while self._delivered < self._target:
            self._reading = True
            try:
                read, last = await self._read_after(self._delivered, self._target)
            finally:
                self._reading = False
            if last is None:  # no rows left in the window (pruned): nothing to deliver there
                last = self._target
            by_seq: dict[int, list[Event]] = {}
            for event in read:
                by_seq.setdefault(event.change_seq, []).append(event)
            run: list[Event] = []
            run_is_local = False
            tailed = 0
            for seq in range(self._delivered + 1, last + 1):
                local = self._held.pop(seq, None)
                events = local if local is not None else by_seq.get(seq, [])
                if not events:
                    continue
                is_local = local is not None
                if run and is_local != run_is_local:
                    self._flush(run, run_is_local)
                    run = []
                run.extend(events)
                run_is_local = is_local
                tailed += 0 if is_local else len(events)
            if run:
                self._flush(run, run_is_local)
            self._delivered = last
            if tailed:
                self._on_tailed(tailed)

    def _flush(self, events: list[Event], local: bool) -> None:
        try:
            (self._deliver_local if local else self._deliver_remote)(events)
        except Exception:  # one bad delivery must not stop the node's feed
            logger.exception("delivering %d events failed", len(events))

    # ---- the doorbell ---------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        announced = 0
        while True:
            await self._ring.wait()
            self._ring.clear()
            upto = self._announce
            try:
                if upto > announced:
                    await self._redis.publish(self._channel, f"{self.node_id} {upto}")
                    announced = upto
                while self._outbox:
                    await self._redis.publish(self._ephemeral_channel, self._outbox[0])
                    self._outbox.popleft()
            except (RedisError, OSError, TimeoutError) as exc:
                self._down(exc)  # the others read the table on their own meanwhile

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel, self._ephemeral_channel)
                self._up()
                # Commits made while this node was not listening: read them now.
                self._target = max(self._target, await self._latest())
                self._wake.set()
                while True:
                    message = await pubsub.get_message(timeout=self._safety_poll_s)
                    if message is None:
                        continue
                    data = bytes(message["data"]).decode()
                    if bytes(message["channel"]).decode() == self._ephemeral_channel:
                        await self._typing_from(data)
                        continue
                    node, _, upto = data.partition(" ")
                    if node != self.node_id and int(upto) > self._target:
                        self._target = int(upto)
                        self._wake.set()
            except (RedisError, OSError, TimeoutError) as exc:
                self._down(exc)
                await asyncio.sleep(self._retry_s)
            except Exception:  # the database, for the cursor: listen again shortly
                logger.exception("listening for other nodes' commits failed; retrying")
                await asyncio.sleep(self._retry_s)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    async def _typing_from(self, data: str) -> None:
        try:
            signal = json.loads(data)
            if signal["node"] == self.node_id:
                return
            state = TypingState(
                str(signal["thread"]),
                str(signal["user"]),
                bool(signal["active"]),
                float(signal["expires"]),
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed typing signal from Redis")
            return
        try:
            await self._on_typing(state)
        except Exception:  # advisory: never stop listening for one
            logger.exception("relaying a typing signal failed")

    def _up(self) -> None:
        if not self._redis_up:
            logger.warning("redis reachable again: delivery across nodes by doorbell")
        self._redis_up = True
        self._on_redis_up(True)

    def _down(self, exc: BaseException) -> None:
        if self._redis_up:
            logger.warning(
                "redis unreachable (%s): reading other nodes' changes every %.2f s",
                type(exc).__name__,
                self._tail_interval_s,
            )
            self._wake.set()
        self._redis_up = False
        self._on_redis_up(False)
