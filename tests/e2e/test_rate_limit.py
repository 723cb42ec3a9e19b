"""The per-user rate limit: the 61st message in a minute is refused with RetryInfo, nothing is
written, and it is accepted once the wait has passed."""

from __future__ import annotations

import asyncio

import grpc

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer


async def test_sixty_first_message_waits_for_retry_info(settings_factory):
    app = ThreadlineServer(settings_factory(limits={"operations_per_minute": 60}))
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
            refused = await phone.send_message(thread, "one too many", "op-60")
            assert refused.rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            info = status_details(refused.rejected)
            assert info["reason"] == "RATE_LIMITED" and 0 < info["retry_after"] <= 1.5
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
            await asyncio.sleep(info["retry_after"])  # type: ignore[arg-type]
            accepted = await phone.send_message(thread, "one too many", "op-60")
            assert accepted.WhichOneof("outcome") == "confirmed"
            for s in (phone, laptop, bob):
                s.cancel()
    finally:
        await app.stop(grace=0.5)
