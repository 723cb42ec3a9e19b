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

    async def load(self, keys: Sequence[str]) -> Mapping[str, str | Exception]:
        self.batches.append(list(keys))
        gate = asyncio.Event()
        self.gates.append(gate)
        started = len(self.batches)
        await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database went away")
        out: dict[str, str | Exception] = {
            k: f"{k}@{started}" for k in keys if k not in ("unknown", "bad")
        }
        if "bad" in keys:
            out["bad"] = ValueError("this key alone")
        return out

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


async def test_one_bad_key_fails_alone():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    calls = [asyncio.ensure_future(get(k)) for k in ("a", "bad", "b")]
    await loader.until_batches(1)
    loader.gates[0].set()
    assert await calls[0] == "a@1" and await calls[2] == "b@1"
    with pytest.raises(ValueError, match="this key alone"):
        await calls[1]


async def test_a_key_whose_callers_all_left_is_not_loaded():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    first = asyncio.ensure_future(get("a"))
    await loader.until_batches(1)
    gone = asyncio.ensure_future(get("gone"))
    stays = asyncio.ensure_future(get("b"))
    await asyncio.sleep(0)
    gone.cancel()
    loader.gates[0].set()
    await first
    await loader.until_batches(2)
    assert loader.batches[1] == ["b"]
    loader.gates[1].set()
    assert await stays == "b@2"


async def test_close_lets_the_running_batch_finish_and_refuses_the_rest():
    from threadline_server.errors import Unavailable

    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    running = asyncio.ensure_future(get("a"))
    await loader.until_batches(1)
    queued = asyncio.ensure_future(get("b"))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(get.close())
    await asyncio.sleep(0)
    assert not closing.done()  # waits for the read in flight, never cuts it off
    loader.gates[0].set()
    await closing
    assert await running == "a@1"
    assert queued.cancelled()
    assert len(loader.batches) == 1
    with pytest.raises(Unavailable):
        await get("c")


async def test_close_before_the_first_batch_started_answers_everyone():
    loader = Loader()
    get = Coalescer(loader.load, missing=lambda k: "none")
    waiting = asyncio.ensure_future(get("a"))
    await asyncio.sleep(0)  # the caller is queued; its batch has not started yet
    await get.close()
    await asyncio.sleep(0)
    assert waiting.cancelled()
    assert loader.batches == []
