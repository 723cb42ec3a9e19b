"""Presence: online/offline announced to the users who share a thread with someone.

Announcements are state, not edges: after looking up who to tell, the tracker publishes the
user's *current* state, and only if it differs from what was last announced. Two lookups that
finish out of order therefore never leave peers with the wrong state.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from threadline_server.domain.models import Event, EventKind, PresenceState, Thread

logger = logging.getLogger(__name__)

Peers = Callable[[str], Awaitable[frozenset[str]]]


class PresenceTracker:
    """Per node. Going offline waits `grace_s`, so a reconnect (a network blip, a replaced
    connection) is not announced as offline-then-online."""

    def __init__(
        self,
        publish: Callable[[list[Event]], None],
        peers: Peers,
        is_online: Callable[[str], bool],
        grace_s: float,
    ) -> None:
        self._publish = publish
        self._peers = peers
        self._is_online = is_online
        self._grace = grace_s
        self._online: set[str] = set()
        self._announced: set[str] = set()  # told peers they are online
        self._due: set[str] = set()  # came online; announced by their stream's snapshot
        self._last_active: dict[str, float] = {}
        self._offline_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lookups: set[asyncio.Task[frozenset[str]]] = set()
        self._closed = False

    def connected(self, user_id: str) -> None:
        """A stream of the user opened."""
        self._last_active[user_id] = time.time()
        timer = self._offline_timers.pop(user_id, None)
        if timer is not None:
            timer.cancel()  # back within the grace period: peers never saw them leave
        if user_id not in self._online:
            self._online.add(user_id)
            # Announced once this stream has caught up, by its snapshot, which looks up the
            # same peers: one query per connect rather than two (reconnect storms).
            self._due.add(user_id)

    def disconnected(self, user_id: str, last_active_at: float) -> None:
        """A stream of the user closed; offline once the last one has been gone `grace_s`."""
        self._last_active[user_id] = max(self._last_active.get(user_id, 0.0), last_active_at)
        if self._closed or self._is_online(user_id) or user_id in self._offline_timers:
            return
        loop = asyncio.get_running_loop()
        self._offline_timers[user_id] = loop.call_later(self._grace, self._went_offline, user_id)

    def online_now(self, user_ids: frozenset[str]) -> list[PresenceState]:
        """Who among `user_ids` is online now (announced or not yet)."""
        return [
            PresenceState(u, True, self._last_active.get(u, time.time()))
            for u in sorted(user_ids & self._online)
        ]

    async def snapshot(self, user_id: str) -> list[PresenceState]:
        """The online peers of a user whose stream has caught up, and the user's own online
        announcement if due. None if they cannot be looked up: presence is advisory and must
        never end a stream (the announcement then goes on its own, with retries)."""
        try:
            peers = await self._lookup(user_id)
        except Exception as exc:
            logger.warning("presence snapshot failed for %s: %s", user_id, type(exc).__name__)
            if user_id in self._due:
                self._due.discard(user_id)
                self._spawn(user_id)
            return []
        if user_id in self._due:
            self._due.discard(user_id)
            self._settle(user_id, peers, None)
        return self.online_now(peers)

    def introduce(self, events: list[Event]) -> None:
        """Someone was added to a thread (its THREAD_CREATED event, addressed to them): they and
        the thread's other members may share a thread for the first time, so each side that is
        online learns the other's presence now rather than at its next reconnect. Repeating a
        state a client already has is harmless: presence is a state, not an edge."""
        if self._closed:
            return
        tell: dict[str, set[str]] = {}  # whose presence -> who learns it (each pair once)
        for event in events:
            if event.kind is not EventKind.THREAD_CREATED or not isinstance(event.payload, Thread):
                continue
            # Only users whose online state is already announced: one still catching up is
            # announced by its own snapshot, which looks its peers up afresh (this thread too).
            online = frozenset(
                u
                for u in event.payload.participant_ids
                if u in self._online and u in self._announced
            )
            for newcomer in event.recipients & online:
                for other in online - {newcomer}:
                    tell.setdefault(newcomer, set()).add(other)
                    tell.setdefault(other, set()).add(newcomer)
        if tell:
            now = datetime.now(UTC)
            self._publish(
                [self._presence_event(u, frozenset(to), now) for u, to in sorted(tell.items())]
            )

    def _presence_event(self, user_id: str, recipients: frozenset[str], now: datetime) -> Event:
        state = PresenceState(user_id, True, self._last_active.get(user_id, time.time()))
        return Event(0, EventKind.PRESENCE, "", 0, 0, user_id, now, state, recipients)

    def _went_offline(self, user_id: str) -> None:
        self._offline_timers.pop(user_id, None)
        if self._is_online(user_id):
            return
        self._online.discard(user_id)
        self._due.discard(user_id)  # never announced online: nothing to take back
        self._spawn(user_id, self._last_active.pop(user_id, time.time()))

    def _spawn(self, user_id: str, last_active_at: float | None = None) -> None:
        if self._closed:
            return
        # A fresh context: the stream that triggered this is gone; its request ids must not
        # label the announcement's log lines.
        task = asyncio.create_task(
            self._announce(user_id, last_active_at), context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, user_id: str) -> frozenset[str]:
        """The peer query, run to completion even if its caller is cancelled (a client hanging
        up mid-snapshot): a database read cut off half-way leaves its connection to be torn
        down later, possibly after the engine is gone. `close` waits for these."""
        task = asyncio.ensure_future(self._peers(user_id))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        return await asyncio.shield(task)

    async def _announce(self, user_id: str, last_active_at: float | None) -> None:
        try:
            peers = await self._lookup(user_id)
        except Exception as exc:  # presence is advisory: a failed lookup must not end anything
            logger.warning("presence lookup failed for %s: %s", user_id, type(exc).__name__)
            if not self._closed:  # try again later, so peers are not left with a wrong state
                loop = asyncio.get_running_loop()
                loop.call_later(self._grace or 1.0, self._spawn, user_id, last_active_at)
            return
        self._settle(user_id, peers, last_active_at)

    def _settle(self, user_id: str, peers: frozenset[str], last_active_at: float | None) -> None:
        """Publishes the user's current state to its online peers, unless already announced."""
        if self._closed:
            return
        online = user_id in self._online
        if (user_id in self._announced) == online:
            return  # this state is already announced (or, offline, never needed announcing)
        if online:
            self._announced.add(user_id)
            last_active_at = self._last_active.get(user_id, time.time())
        else:
            self._announced.discard(user_id)
        recipients = frozenset(p for p in peers if p in self._online)
        if not recipients:
            return
        state = PresenceState(user_id, online, last_active_at or time.time())
        now = datetime.now(UTC)
        self._publish([Event(0, EventKind.PRESENCE, "", 0, 0, user_id, now, state, recipients)])

    async def close(self) -> None:
        """Stops announcing (before the database closes); lets lookups in flight finish."""
        self._closed = True
        for timer in self._offline_timers.values():
            timer.cancel()
        self._offline_timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._lookups, return_exceptions=True)
