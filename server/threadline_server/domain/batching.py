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
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

from threadline_server.errors import Unavailable

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`await coalescer(key)` -> the value `load` gave for `key` in the batch that took it.

    `load(keys)` receives distinct keys (at most `max_batch`) and returns, for each, a value or
    the exception that key's callers get (one bad key need not fail its neighbours); a key it
    leaves out gets `missing`. If `load` raises, every caller of that batch gets the exception.
    A caller that is cancelled leaves the batch running for the others, and a key whose callers
    have all gone is not loaded.
    """

    def __init__(
        self,
        load: Callable[[Sequence[K]], Awaitable[Mapping[K, V | Exception]]],
        *,
        missing: Callable[[K], V],
        max_batch: int = 500,
    ) -> None:
        self._load = load
        self._missing = missing
        self._max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # how many batches have run (for tests and operators)

    async def __call__(self, key: K) -> V:
        if self._closed:
            raise Unavailable("SERVER_DRAINING", "server is shutting down")
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._runner is None or self._runner.done():
            # In a context of its own: the batch's log lines must not carry the request, user
            # and session of whichever caller happened to start it.
            self._runner = asyncio.create_task(
                self._run(), name="coalescer", context=contextvars.Context()
            )
        return await future

    async def close(self) -> None:
        """Before the database it reads is closed: nothing more is taken, keys not yet in a
        batch are refused (their callers are gone by then), and the running batch finishes (a
        read cut off half-way would leave its connection to be torn down after the engine)."""
        self._closed = True
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()
        self._waiting.clear()
        runner = self._runner
        if runner is not None and not runner.done():
            await asyncio.wait((runner,))

    async def _run(self) -> None:
        while self._waiting and not self._closed:
            taken: dict[K, list[asyncio.Future[V]]] = {}
            for key in list(self._waiting)[: self._max_batch]:
                futures = self._waiting.pop(key)
                if not all(f.done() for f in futures):  # someone still waits for it
                    taken[key] = futures
            if not taken:
                continue
            self.batches += 1
            try:
                found = await self._load(list(taken))
            except Exception as exc:
                found = dict.fromkeys(taken, exc)
            for key, futures in taken.items():
                value: V | Exception
                try:
                    value = found[key] if key in found else self._missing(key)
                except Exception as exc:  # every caller gets an answer, whatever happens
                    value = exc
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(value, Exception):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
