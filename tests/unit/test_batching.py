"""The Coalescer: callers arriving together share a batch, and no batch answers a caller who
arrived after it started."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from threadline_server.domain.batching import Coalescer


class Loader:
    """A load whose batches finish only when the test lets them (no timing involved)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_next = False

    async def load(self, keys: Sequence[str]) -> Mapping[str, str]:
        self.batches.append(list(keys))
        gate = asyncio.Event()
        self.gates.append(gate)
        started = len(self.batches)
        await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database went away")
        return {k: f"{k}@{started}" for k in keys if k != "unknown"}

    async def until_batches(self, n: int) -> None:
        while len(self.batches) < n:
            await asyncio.sleep(0)


async def test_callers_arriving_while_a_batch_runs_share_the_next_one():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    first = asyncio.ensure_future(get("a"))
    await loader.until_batches(1)
    later = [asyncio.ensure_future(get(k)) for k in ("b", "c", "b", "unknown")]
    await asyncio.sleep(0)
    assert loader.batches == [["a"]]  # the later ones wait: the running batch began before them
    loader.gates[0].set()
    assert await first == "a@1"
    await loader.until_batches(2)
    assert loader.batches[1] == ["b", "c", "unknown"]  # distinct keys, one batch
    loader.gates[1].set()
    assert [await f for f in later] == ["b@2", "c@2", "b@2", "none"]
    assert get.batches == 2


async def test_a_failed_batch_fails_its_callers_and_the_next_batch_still_runs():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    loader.fail_next = True
    doomed = [asyncio.ensure_future(get(k)) for k in ("a", "b")]
    await loader.until_batches(1)
    after = asyncio.ensure_future(get("c"))
    loader.gates[0].set()
    for f in doomed:
        with pytest.raises(RuntimeError):
            await f
    await loader.until_batches(2)
    loader.gates[1].set()
    assert await after == "c@2"


async def test_a_cancelled_caller_leaves_the_batch_to_the_others():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    quitter = asyncio.ensure_future(get("a"))
    stayer = asyncio.ensure_future(get("a"))
    await loader.until_batches(1)
    quitter.cancel()
    loader.gates[0].set()
    assert await stayer == "a@1"
    assert quitter.cancelled()


async def test_batches_are_bounded():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none", max_batch=2)
    calls = [asyncio.ensure_future(get(k)) for k in "abcde"]
    for n in range(1, 4):
        await loader.until_batches(n)
        loader.gates[n - 1].set()
    assert [await f for f in calls] == ["a@1", "b@1", "c@2", "d@2", "e@3"]
    assert [len(b) for b in loader.batches] == [2, 2, 1]
