"""Operators see the server's state on /metrics (Prometheus text format) on the side listener."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


async def test_metrics_count_streams_messages_and_errors(server, channel, token):
    assert server.endpoints is not None
    url = f"http://127.0.0.1:{server.endpoints.http_port}/metrics"
    thread = await create_thread(channel, token("alice"), "bob")
    alice, bob = RawStream(channel, token("alice")), RawStream(channel, token("bob"))
    await alice.hello()
    await bob.hello()
    # Let presence settle first (bob coming online, shown to alice), so that only the messages
    # are counted below.
    assert [e.presence.user_id for e in await alice.events(1, presence=True)] == ["bob"]
    await asyncio.sleep(0.2)
    async with httpx.AsyncClient() as http:
        before = sample((await http.get(url)).text, "threadline_event_deliveries_total")
    for i in range(3):
        await alice.send_message(thread, f"m{i}", f"op-{i}")
    await alice.send_message(thread, "", "bad")  # INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError):  # NOT_FOUND
        await tsg.ThreadServiceStub(channel).GetThread(
            ts.GetThreadRequest(thread_id="missing"),
            metadata=(("authorization", f"Bearer {token('alice')}"),),
        )
    async with httpx.AsyncClient() as http:
        text = (await http.get(url)).text
    assert sample(text, "threadline_streams") == 2
    assert sample(text, "threadline_users_online") == 2
    assert sample(text, "threadline_messages_submitted_total") == 3
    assert sample(text, "threadline_event_deliveries_total") - before == 6  # 3 messages x 2
    assert before >= 1
    assert 'threadline_cache_lookups_total{cache="users",result="hit"}' in text
    assert 'threadline_cache_hit_ratio{cache="users"}' in text
    assert sample(text, "threadline_db_pool_in_use") >= 0
    if server.db.dialect == "postgresql":  # index use from pg_stat_user_indexes
        assert 'threadline_index_scans{index="ix_thread_members_user",table="thread_members"}' in (
            text
        )
    assert 'threadline_errors_total{code="INVALID_ARGUMENT"} 1.0' in text
    assert 'threadline_errors_total{code="NOT_FOUND"} 1.0' in text
    assert "threadline_fanout_seconds_bucket" in text
    alice.cancel()
    bob.cancel()
