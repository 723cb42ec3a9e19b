"""The 100 KB payload limit: a message over it is rejected in-band and the stream goes on; a frame
over the transport cap ends only its own call (RESOURCE_EXHAUSTED); nothing is written either
way."""

from __future__ import annotations

import secrets

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg

LIMIT = 102_400  # limits.max_message_bytes


async def texts(channel: grpc.aio.Channel, tok: str, thread_id: str) -> list[int]:
    resp = await tsg.ThreadServiceStub(channel).ListMessages(
        ts.ListMessagesRequest(thread_id=thread_id, page_size=50), metadata=bearer(tok)
    )
    return [len(m.text.encode()) for m in resp.messages]


async def test_message_over_100_kb_is_rejected_and_the_stream_stays_usable(channel, token):
    thread_id = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    welcome = await alice.hello()
    assert welcome.limits.max_message_bytes == LIMIT
    assert welcome.limits.max_frame_bytes > LIMIT  # room for the frame around a full message

    over = await alice.send_message(thread_id, "é" * (LIMIT // 2) + "x", "big-1")  # UTF-8 bytes
    assert over.rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status_details(over.rejected)["fields"] == ["send_message.text"]

    exact = await alice.send_message(thread_id, "x" * LIMIT, "big-2")
    assert exact.WhichOneof("outcome") == "confirmed"
    assert (await alice.send_message(thread_id, "small", "s-1")).WhichOneof(
        "outcome"
    ) == "confirmed"
    assert await texts(channel, token("alice"), thread_id) == [5, LIMIT]
    alice.cancel()


async def test_frame_over_the_transport_cap_ends_only_its_call(channel, token, server):
    thread_id = await create_thread(channel, token("alice"), "bob")
    cap = server.settings.server.max_receive_message_bytes
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    # Random text: the cap applies after decompression, but keep the wire size honest too.
    huge = secrets.token_hex(cap // 2 + 1024)
    alice.send(
        rt.ClientFrame(
            send_message=rt.SendMessage(client_op_id="huge-1", thread_id=thread_id, text=huge)
        )
    )
    assert await alice.status() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The channel and the user's other calls are unaffected; the client reconnects and resumes.
    again = RawStream(channel, token("alice"))
    await again.hello()
    assert (await again.send_message(thread_id, "after", "a-1")).WhichOneof(
        "outcome"
    ) == "confirmed"
    assert await texts(channel, token("alice"), thread_id) == [5]
    again.cancel()


async def test_oversized_unary_and_submit_requests_are_refused_before_any_write(
    channel, token, server
):
    cap = server.settings.server.max_receive_message_bytes
    stub = tsg.ThreadServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await stub.CreateThread(
            ts.CreateThreadRequest(thread=thread_pb2.Thread(title="t", description="d" * cap)),
            metadata=bearer(token("alice")),
        )
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = await stub.ListThreads(ts.ListThreadsRequest(), metadata=bearer(token("alice")))
    assert list(listed.threads) == []

    thread_id = await create_thread(channel, token("alice"), "bob")
    reply = await rsg.RealtimeServiceStub(channel).Submit(
        rs.SubmitRequest(
            frame=rt.ClientFrame(
                send_message=rt.SendMessage(
                    client_op_id="web-big", thread_id=thread_id, text="x" * (LIMIT + 1)
                )
            )
        ),
        metadata=bearer(token("alice")),
    )
    assert reply.frame.operation_result.rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert await texts(channel, token("alice"), thread_id) == []
