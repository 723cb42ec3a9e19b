"""The per-user message budget: the 61st message in a minute is refused with RetryInfo, nothing
is written, and it is accepted once the wait has passed.

The server's limits run on a fake clock (`app.limits.clock`), so a token refills only when the
test advances it: however slowly the machine sends the first 60, the 61st is refused.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.fake_clock import FakeClock
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_client.session import ThreadlineSession
from threadline_client.state import OpStatus
from threadline_server.app import ThreadlineServer


def refused(app: ThreadlineServer, budget: str = "messages") -> float:
    value = app.metrics.registry.get_sample_value(
        "threadline_rate_limited_total", {"budget": budget}
    )
    return value or 0.0


async def test_sixty_first_message_waits_for_retry_info(settings_factory):
    app = ThreadlineServer(settings_factory(limits={"operations_per_minute": 60}))
    clock = app.limits.clock = FakeClock()
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            phone = RawStream(channel, app.mint("alice", 600))
            laptop = RawStream(channel, app.mint("alice", 600))  # same user: same budget
            await phone.hello()
            await laptop.hello()
            for i in range(60):
                stream = phone if i % 2 else laptop
                result = await stream.send_message(thread, f"m{i}", f"op-{i}")
                assert result.WhichOneof("outcome") == "confirmed"
            rejected = await phone.send_message(thread, "one too many", "op-60")
            assert rejected.rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            info = status_details(rejected.rejected)
            assert info["reason"] == "RATE_LIMITED"
            assert info["metadata"] == {"budget": "messages"}
            assert info["retry_after"] == pytest.approx(1.0)  # 60 a minute: one a second
            bob = RawStream(channel, app.mint("bob", 600))  # bob has a budget of his own
            await bob.hello()
            assert (await bob.send_message(thread, "hi", "b-1")).WhichOneof(
                "outcome"
            ) == "confirmed"
            history = await tsg.ThreadServiceStub(channel).ListMessages(
                ts.ListMessagesRequest(thread_id=thread, page_size=200),
                metadata=bearer(app.mint("alice", 600)),
            )
            assert "one too many" not in [m.text for m in history.messages]
            assert len(history.messages) == 61  # alice's 60 and bob's one
            clock.advance(0.5)  # half the wait: still refused, with the rest of it to wait
            early = await phone.send_message(thread, "one too many", "op-60")
            assert status_details(early.rejected)["retry_after"] == pytest.approx(0.5)
            clock.advance(0.5)
            accepted = await phone.send_message(thread, "one too many", "op-60")
            assert accepted.WhichOneof("outcome") == "confirmed"
            assert refused(app) == 2
            for s in (phone, laptop, bob):
                s.cancel()
    finally:
        await app.stop(grace=0.5)


async def test_sdk_session_waits_out_the_rate_limit_and_loses_nothing(settings_factory):
    """A burst beyond the budget through the SDK: every message is delivered, in order, none
    failed; the server refused some (RetryInfo) and the session resent them after the wait."""
    app = ThreadlineServer(settings_factory(limits={"operations_per_minute": 60}))
    clock = app.limits.clock = FakeClock()
    endpoints = await app.start()
    target = f"127.0.0.1:{endpoints.grpc_port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
        session = await ThreadlineSession.connect(target, lambda: app.mint("alice", 600))
        try:
            await session.wait_until(lambda s: thread in s.threads.by_id)
            ops = [session.send(thread, f"burst {i}") for i in range(64)]
            # The clock stands still until the server has refused one: the burst really goes
            # past the budget, whatever the machine's speed. Then a minute passes.
            async with asyncio.timeout(30):
                while not refused(app):
                    await asyncio.sleep(0.01)
            clock.advance(60)
            outcomes = [await session.wait_op(op, timeout=30) for op in ops]
            assert {o.status for o in outcomes} == {OpStatus.CONFIRMED}
            seqs = [o.resource.message.seq for o in outcomes if o.resource is not None]
            assert seqs == list(range(1, 65))  # in order, each once
        finally:
            await session.close()
        assert refused(app) >= 1
    finally:
        await app.stop(grace=0.5)
