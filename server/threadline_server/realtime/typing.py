"""Typing indicators: ephemeral, expired by the server, cleared when a stream closes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from threadline_server.domain.models import Event, EventKind, TypingState


class TypingTracker:
    """Remembers who is typing where; publishes start, stop and expiry as ephemeral events."""

    def __init__(self, publish: Callable[[list[Event]], None], ttl_s: float) -> None:
        self._publish = publish
        self._ttl = ttl_s
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._members: dict[tuple[str, str], frozenset[str]] = {}

    def signal(self, thread_id: str, user_id: str, active: bool, members: Iterable[str]) -> None:
        key = (thread_id, user_id)
        recipients = frozenset(members)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if active:
            self._members[key] = recipients
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._ttl, self._expire, key)
        elif self._members.pop(key, None) is None and timer is None:
            return  # was not typing: nothing to announce
        self._emit(thread_id, user_id, active, recipients)

    def clear_user(self, user_id: str) -> None:
        """A stream of this user closed: nobody should see them typing any more."""
        for key in [k for k in self._timers if k[1] == user_id]:
            self._timers.pop(key).cancel()
            self._emit(key[0], user_id, False, self._members.pop(key, frozenset()))

    def _expire(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        self._emit(key[0], key[1], False, self._members.pop(key, frozenset()))

    def _emit(self, thread_id: str, user_id: str, active: bool, recipients: frozenset[str]) -> None:
        expires = time.time() + (self._ttl if active else 0)
        state = TypingState(thread_id, user_id, active, expires)
        self._publish([typing_event(state, recipients)])


def typing_event(state: TypingState, recipients: frozenset[str]) -> Event:
    """The ephemeral event of a typing signal (no cursor: it is never stored or replayed)."""
    return Event(
        0,
        EventKind.TYPING,
        state.thread_id,
        0,
        0,
        state.user_id,
        datetime.now(UTC),
        state,
        recipients,
    )
