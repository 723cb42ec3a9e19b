"""Delivery across the nodes of a cluster: every node gives its own streams every committed
change, whichever node committed it, in change_seq order, once.

A node that commits delivers its own events at once (as a single node does) and publishes them
on `<prefix>:events` (cluster/envelope.py: each event encoded once, as clients get it). The
other nodes deliver what arrives in cursor order. Redis pub/sub is at most once, and a node can
die between COMMIT and PUBLISH, so a node that sees a gap (a cursor missing below one it has)
waits `cluster.gap_wait_s` for it, then reads it from the changes table, which holds every
change, gapless and durable (SyncStore.committed_after): loss is never silent, only late.

Ordering: change cursors are reserved last in every write transaction, under the one
server_state row lock, so when any node learns of cursor N, every cursor below N has committed
already and is in the table. Per-thread order follows from cursor order.

Redis down: nothing arrives; each node reads the table every `cluster.tail_interval_s` instead
(logged, threadline_redis_up 0) and returns to Redis when it answers. While Redis is up the node
also reads the latest cursor every `cluster.safety_poll_s`, for a last event that was dropped.

The receiving node addresses each event itself: a personal change to its one user, the others
to the thread's members as that node knows them (its own cache or database read), never from a
list in Redis. Typing signals (ephemeral, not in the table) go on `<prefix>:ephemeral`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from threadline_server.cluster.envelope import RemoteEvent, pack, unpack
from threadline_server.cluster.redis_client import redis_client
from threadline_server.domain.models import Event, TypingState

logger = logging.getLogger(__name__)

ReadAfter = Callable[[int, int], Awaitable[tuple[list[Event], int | None]]]
Deliver = Callable[[list[Event]], None]
DeliverRemote = Callable[[RemoteEvent], Awaitable[None]]
Encode = Callable[[Event], bytes]
OnTyping = Callable[[TypingState], Awaitable[None]]

# Bounds on what waits in memory: typing signals for Redis (advisory: past this the oldest are
# dropped), and other nodes' events waiting on an earlier cursor (past this, new ones are left
# to the table read that repairs the gap).
_MAX_OUTBOX = 1_000
_MAX_PENDING = 10_000


class ClusterDelivery:
    def __init__(
        self,
        *,
        redis_url: str,
        key_prefix: str,
        node_id: str,
        timeout_s: float,
        retry_s: float,
        gap_wait_s: float,
        tail_interval_s: float,
        safety_poll_s: float,
        encode: Encode,
        read_after: ReadAfter,
        latest: Callable[[], Awaitable[int]],
        deliver_local: Deliver,
        deliver_remote: DeliverRemote,
        deliver_repaired: Deliver,
        on_typing: OnTyping,
        on_redis_up: Callable[[bool], None] = lambda _up: None,
        on_repaired: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self._redis = redis_client(redis_url, timeout_s)
        self._events_channel = f"{key_prefix}:events"
        self._ephemeral_channel = f"{key_prefix}:ephemeral"
        self.node_id = node_id
        self._own_prefix = node_id.encode() + b"\n"
        self._retry_s = retry_s
        self._gap_wait_s = gap_wait_s
        self._tail_interval_s = tail_interval_s
        self._safety_poll_s = safety_poll_s
        self._encode = encode
        self._read_after = read_after
        self._latest = latest
        self._deliver_local = deliver_local
        self._deliver_remote = deliver_remote
        self._deliver_repaired = deliver_repaired
        self._on_typing = on_typing
        self._on_redis_up = on_redis_up
        self._on_repaired = on_repaired
        self._delivered = 0  # every change up to here is with this node's streams
        self._target = 0  # the highest change known to have committed
        self._held: dict[int, list[Event]] = {}  # this node's commits waiting on earlier ones
        self._remote: dict[int, RemoteEvent] = {}  # other nodes' events waiting their turn
        self._busy = False  # the worker is delivering (it may be awaiting a read)
        self._wake = asyncio.Event()
        self._outbox: deque[bytes | str] = deque()  # event batches, typing signals for Redis
        self._typing_queued = 0
        self._ring = asyncio.Event()
        self._redis_up = True
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Everything committed before this node started is history: its streams get it by
        resuming from the table."""
        self._delivered = self._target = await self._latest()
        for work in (self._deliver_loop(), self._listen(), self._publish_loop()):
            self._tasks.append(asyncio.create_task(work))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    # ---- this node's commits and typing ---------------------------------------------------

    def committed(self, events: list[Event]) -> None:
        """This node's commit, in commit order (under its write lock), caches already applied."""
        ephemeral = [e for e in events if not e.change_seq]
        if ephemeral:
            self._deliver_local(ephemeral)
        durable = [e for e in events if e.change_seq]
        if not durable:
            return
        self._queue(pack(self.node_id, [self._remote_event(e) for e in durable]))
        fresh = [e for e in durable if e.change_seq > self._delivered]
        if not fresh:
            return  # read from the table already (a later cursor arrived first)
        seqs = sorted({e.change_seq for e in fresh})
        idle = not self._busy and not self._held and self._target <= self._delivered
        if idle and seqs == list(range(self._delivered + 1, seqs[-1] + 1)):
            self._deliver_local(fresh)  # nothing earlier outstanding: as a single node does
            self._delivered = self._target = seqs[-1]
            return
        for event in fresh:
            self._held.setdefault(event.change_seq, []).append(event)
        self._target = max(self._target, seqs[-1])
        self._wake.set()

    def relay(self, events: list[Event]) -> None:
        """Ephemeral events of this node (typing: no cursor, not in the table): to its own
        streams at once, and to the other nodes through Redis, at most once. Each receiving
        node addresses them to the thread's members as it knows them."""
        self._deliver_local(events)
        for event in events:
            state = event.payload
            if isinstance(state, TypingState):
                if self._typing_queued >= _MAX_OUTBOX:
                    continue  # Redis is slow or away: typing is advisory and expires anyway
                self._typing_queued += 1
                self._queue(
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

    def _remote_event(self, event: Event) -> RemoteEvent:
        user = next(iter(event.recipients)) if event.personal and event.recipients else ""
        return RemoteEvent(
            event.change_seq,
            event.kind.value,
            event.thread_id,
            event.actor_id,
            event.client_op_id,
            user,
            self._encode(event),
            () if user else tuple(sorted(event.recipients)),
        )

    def _queue(self, message: bytes | str) -> None:
        if len(self._outbox) >= _MAX_OUTBOX:
            dropped = self._outbox.popleft()  # the others repair events from the table
            if isinstance(dropped, str):
                self._typing_queued -= 1
        self._outbox.append(message)
        self._ring.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._ring.wait()
            self._ring.clear()
            try:
                while self._outbox:
                    message = self._outbox[0]
                    if isinstance(message, str):
                        await self._redis.publish(self._ephemeral_channel, message)
                        self._typing_queued -= 1
                    else:
                        await self._redis.publish(self._events_channel, message)
                    self._outbox.popleft()
                    if not self._redis_up:  # a failed publish marked it down; it answers again
                        self._up()
            except (RedisError, OSError, TimeoutError) as exc:
                self._down(exc)  # the others read the table on their own meanwhile
                self._outbox.clear()
                self._typing_queued = 0

    # ---- delivering in cursor order -------------------------------------------------------

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
            try:
                if polled or not self._redis_up:  # no events to trust: ask the table itself
                    self._target = max(self._target, await self._latest())
                await self._catch_up()
            except Exception:  # the database is away: try again at the next wake-up or poll
                logger.exception("delivering other nodes' changes failed; retrying")
                await asyncio.sleep(self._tail_interval_s)

    async def _catch_up(self) -> None:
        self._busy = True
        try:
            gap_since: float | None = None
            while self._delivered < self._target:
                nxt = self._delivered + 1
                local = self._held.pop(nxt, None)
                if local is not None:
                    self._guarded(self._deliver_local, local)
                    self._delivered, gap_since = nxt, None
                    continue
                remote = self._remote.pop(nxt, None)
                if remote is not None:
                    try:
                        await self._deliver_remote(remote)
                    except Exception:  # (its members could not be read): from the table, then
                        logger.exception("delivering change %d failed; reading it again", nxt)
                        await self._repair(nxt)  # raises while the database is away: retried
                        continue
                    self._delivered, gap_since = nxt, None
                    continue
                # A gap: the change has committed (a later one is known) but its event has not
                # arrived. Wait briefly, then read it from the table.
                now = time.monotonic()
                gap_since = now if gap_since is None else gap_since
                wait = self._gap_wait_s - (now - gap_since)
                if wait > 0 and self._redis_up:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    continue
                if await self._repair(nxt):
                    gap_since = None  # closed; a long gap (pages of it) is read on at once
        finally:
            self._busy = False

    async def _repair(self, missing: int) -> bool:
        """Reads the gap from `missing` on from the table; True once the gap is closed."""
        known = [s for s in (*self._held, *self._remote) if s > missing]
        upto = min(known) - 1 if known else self._target
        events, last = await self._read_after(self._delivered, upto)
        if last is None:  # no rows left in the window (pruned): nothing to deliver there
            last = upto
        if events:
            self._guarded(self._deliver_repaired, events)
            self._on_repaired(len(events))
        self._delivered = last
        for pending in (self._held, self._remote):
            for seq in [s for s in pending if s <= last]:
                del pending[seq]  # committed here meanwhile, delivered with the read
        return last >= upto

    def _guarded(self, deliver: Deliver, events: list[Event]) -> None:
        try:
            deliver(events)
        except Exception:  # one bad delivery must not stop the node's feed
            logger.exception("delivering %d events failed", len(events))

    # ---- listening ------------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._events_channel, self._ephemeral_channel)
                self._up()
                # Commits made while this node was not listening: read them now.
                self._target = max(self._target, await self._latest())
                self._wake.set()
                while True:
                    message = await pubsub.get_message(timeout=self._safety_poll_s)
                    if message is None:
                        continue
                    data = bytes(message["data"])
                    if bytes(message["channel"]).decode() == self._ephemeral_channel:
                        await self._typing_from(data.decode())
                    else:
                        self._events_from(data)
            except (RedisError, OSError, TimeoutError) as exc:
                self._down(exc)
                await asyncio.sleep(self._retry_s)
            except Exception:  # the database, for the cursor: listen again shortly
                logger.exception("listening for other nodes' commits failed; retrying")
                await asyncio.sleep(self._retry_s)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    def _events_from(self, data: bytes) -> None:
        if data.startswith(self._own_prefix):
            return  # this node's own batch, echoed by Redis: delivered here already
        try:
            node, events = unpack(data)
        except ValueError:
            logger.warning("ignored a malformed event batch from Redis")
            return
        if node == self.node_id:
            return
        for event in events:
            seq = event.change_seq
            if seq > self._delivered and len(self._remote) < _MAX_PENDING:
                self._remote.setdefault(seq, event)
            self._target = max(self._target, seq)
        self._wake.set()

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
            logger.warning("redis reachable again: delivery across nodes through it")
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
