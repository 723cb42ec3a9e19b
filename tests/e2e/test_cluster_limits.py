"""Rate budgets shared by the nodes of a cluster through Redis (cluster.redis_url): one user's
sends spread over two nodes get one budget, not one per node; with Redis down each node falls
back to its own budget (counted in /metrics), and the shared budget is back once Redis is.

Two real servers share the database and a real Redis (the machine's, under a key prefix of this
test's own; or a redis-server this test starts and kills). Both nodes' limits run on one fake
clock, so a token refills only when the test says.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.cluster import SHARED_REDIS, OwnRedis, metric, nodes
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details

LIMITS = {"operations_per_minute": 60}


async def send_many(stream: RawStream, thread: str, prefix: str, count: int) -> list[Any]:
    return [await stream.send_message(thread, f"{prefix}{i}", f"{prefix}{i}") for i in range(count)]


def accepted(results: list[Any]) -> int:
    return sum(1 for r in results if r.WhichOneof("outcome") == "confirmed")


async def test_one_budget_across_two_nodes(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS, limits=LIMITS) as (apps, channels, clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
        on_a = RawStream(channels[0], a.mint("alice", 600))
        on_b = RawStream(channels[1], b.mint("alice", 600))
        await on_a.hello()
        await on_b.hello()
        first = await send_many(on_a, thread, "a-", 40)
        second = await send_many(on_b, thread, "b-", 40)
        assert accepted(first) == 40
        assert accepted(second) == 20  # 60 a minute for alice, wherever her calls land
        refusal = second[-1].rejected
        assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        info = status_details(refusal)
        assert info["reason"] == "RATE_LIMITED"
        assert info["retry_after"] == pytest.approx(1.0)
        assert metric(b, "threadline_rate_limited_total", {"budget": "messages"}) == 20
        bob = RawStream(channels[1], b.mint("bob", 600))  # another user: a budget of his own
        await bob.hello()
        assert accepted(await send_many(bob, thread, "bob-", 1)) == 1
        clock.advance(1.0)  # one token back, spent on whichever node asks first
        assert accepted(await send_many(on_a, thread, "later-a-", 2)) == 1
        assert accepted(await send_many(on_b, thread, "later-b-", 1)) == 0
        assert metric(a, "threadline_redis_up", {"what": "rate_limit"}) == 1
        assert metric(a, "threadline_cluster_fallbacks_total", {"what": "rate_limit"}) == 0
        for stream in (on_a, on_b, bob):
            stream.cancel()


async def test_nodes_fall_back_to_their_own_budgets_while_redis_is_down(settings_factory):
    server = OwnRedis()
    await server.start()
    try:
        async with nodes(settings_factory, server.url, limits=LIMITS) as (apps, channels, _clock):
            a, b = apps
            thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
            on_a = RawStream(channels[0], a.mint("alice", 600))
            on_b = RawStream(channels[1], b.mint("alice", 600))
            await on_a.hello()
            await on_b.hello()
            assert accepted(await send_many(on_a, thread, "up-", 10)) == 10  # shared: 50 left
            await server.stop()
            # Each node decides alone now, from buckets of its own that were never spent.
            assert accepted(await send_many(on_a, thread, "down-a-", 61)) == 60
            assert accepted(await send_many(on_b, thread, "down-b-", 61)) == 60
            for app in apps:
                assert metric(app, "threadline_redis_up", {"what": "rate_limit"}) == 0
                assert metric(app, "threadline_cluster_fallbacks_total", {"what": "rate_limit"})
            await server.start()  # empty: every bucket starts full again
            await asyncio.sleep(0.05)  # past redis_retry_s (0.01 s): the nodes try Redis again
            back = await send_many(on_a, thread, "back-a-", 40)
            back += await send_many(on_b, thread, "back-b-", 40)
            assert accepted(back) == 60  # one budget again, across both nodes
            assert all(
                metric(app, "threadline_redis_up", {"what": "rate_limit"}) == 1 for app in apps
            )
            for stream in (on_a, on_b):
                stream.cancel()
    finally:
        await server.stop()
