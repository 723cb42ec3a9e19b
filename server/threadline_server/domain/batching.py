"""Coalescing of lookups that many callers make at once (a reconnect storm after a restart).

A `Coalescer` runs at most one batch at a time. Keys that arrive while a batch runs wait for the
next one, which takes all of them: a thousand connects arriving together cost a handful of
queries, and a quiet server answers each key at once, in a batch of one.

Every batch *starts after* each of its keys arrived. That is what makes it safe for reads whose
answer must be at least as new as the moment the caller asked (the resume cursor: a stream
subscribes, then reads the cursor, and an event committed in between must be at or below it).
A tick-based loader (the DataLoader pattern) would give the same guarantee but gather only what
arrives within one loop iteration; this gathers everything that arrives while the database
answers the previous batch, which is what grows with load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`await coalescer(key)` -> the value `load` gave for `key` in the batch that took it.

    `load(keys)` receives distinct keys (at most `max_batch`) and returns a value for each; a
    key it leaves out gets `missing`. If `load` raises, every caller of that batch gets the
    exception. A caller that is cancelled leaves the batch running for the others.
    """

    def __init__(
        self,
        load: Callable[[Sequence[K]], Awaitable[Mapping[K, V]]],
        *,
        missing: Callable[[K], V],
        max_batch: int = 500,
    ) -> None:
        self._load = load
        self._missing = missing
        self._max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # how many batches have run (for tests and operators)

    async def __call__(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="coalescer")
        return await future

    async def close(self) -> None:
        """Stops the running batch (its callers are cancelled) before the database it reads is
        closed: a batch outliving the server would leave a connection open."""
        runner = self._runner
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def _run(self) -> None:
        taken: dict[K, list[asyncio.Future[V]]] = {}
        try:
            while self._waiting:
                keys = list(self._waiting)[: self._max_batch]
                taken = {key: self._waiting.pop(key) for key in keys}
                self.batches += 1
                try:
                    found = await self._load(keys)
                except Exception as exc:
                    for futures in taken.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, futures in taken.items():
                    value = found[key] if key in found else self._missing(key)
                    for future in futures:
                        if not future.done():
                            future.set_result(value)
        finally:
            self._runner = None
            # Cancelled (the server is stopping): nobody must wait forever for a batch, neither
            # the callers of the batch that was running nor those waiting for the next.
            for futures in (*taken.values(), *self._waiting.values()):
                for future in futures:
                    future.cancel()
            self._waiting.clear()
