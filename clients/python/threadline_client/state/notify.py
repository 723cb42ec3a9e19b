"""Change notifications of a store: `subscribe` callbacks and `changes()` iterators."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from threadline_client.state.models import Change

logger = logging.getLogger("threadline_client.state")  # the name it had as one module


class _Notifier:
    """Delivers each `Change` to subscribers (synchronously, in order) and to `changes()`."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Change], None]] = []
        self._queues: set[asyncio.Queue[Change]] = set()

    # -- observing --------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Calls `callback(change)` after every change, synchronously; returns an unsubscriber.

        An exception in a callback is logged and does not stop the others.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def changes(self) -> AsyncIterator[Change]:
        """Yields every change from the first iteration on (buffered without bound).

        Each iterator has its own buffer, released when the iterator is closed.
        """
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)

    def _notify(self, change: Change) -> None:
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:
                logger.exception("state subscriber failed")
        for queue in self._queues:
            queue.put_nowait(change)
