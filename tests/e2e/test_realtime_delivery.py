"""Messages sent on one stream reach every participant's streams, in order, once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import bearer
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg


async def create_thread(channel: grpc.aio.Channel, tok: str, *participants: str) -> str:
    stub = tsg.ThreadServiceStub(channel)
    resp = await stub.CreateThread(
        ts.CreateThreadRequest(thread=thread_pb2.Thread(title="t", participant_ids=participants)),
        metadata=bearer(tok),
    )
    return resp.thread.id


async def test_message_reaches_participant_not_outsider(channel, token):
    thread_id = await create_thread(channel, token("alice"), "bob")
    alice, bob, carol = (RawStream(channel, token(u)) for u in ("alice", "bob", "carol"))
    for s in (alice, bob, carol):
        await s.hello()

    result = await alice.send_message(thread_id, "hello bob", "op-1")
    assert result.WhichOneof("outcome") == "confirmed"
    assert result.confirmed.message.seq == 1
    assert result.change_seq > 0

    [event] = await bob.events(1)
    assert event.kind == rt.EVENT_KIND_MESSAGE_CREATED
    assert event.message.text == "hello bob"
    assert event.message.seq == 1
    assert event.thread_seq == 1
    assert event.client_op_id == ""  # only the author's streams see the op id
    [own] = await alice.events(1)
    assert own.client_op_id == "op-1"
    await carol.no_event()

    second = await alice.send_message(thread_id, "again", "op-2")
    assert second.confirmed.message.seq == 2
    [event2] = await bob.events(1)
    assert event2.message.seq == 2
    for s in (alice, bob, carol):
        s.cancel()


async def test_outsider_send_is_rejected_not_found_and_stream_survives(channel, token):
    thread_id = await create_thread(channel, token("alice"), "bob")
    carol = RawStream(channel, token("carol"))
    await carol.hello()
    result = await carol.send_message(thread_id, "let me in", "op-x")
    assert result.WhichOneof("outcome") == "rejected"
    assert result.rejected.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status_details(result.rejected)["reason"] == "RESOURCE_NOT_FOUND"
    pong = carol.send(rt.ClientFrame(ping=rt.Ping()))
    assert (await carol.reply_to(pong)).WhichOneof("kind") == "pong"
    carol.cancel()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "send_message.text"),
        ("x" * 102_401, "send_message.text"),
        ("a\x00b", "send_message.text"),
    ],
)
async def test_invalid_text_is_rejected_with_field_violation(channel, token, text, field):
    thread_id = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    result = await alice.send_message(thread_id, text, "op-bad")
    assert result.rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field in status_details(result.rejected)["fields"]
    stub = tsg.ThreadServiceStub(channel)
    history = await stub.ListMessages(
        ts.ListMessagesRequest(thread_id=thread_id), metadata=bearer(token("alice"))
    )
    assert list(history.messages) == []  # nothing written
    alice.cancel()


async def test_concurrent_senders_get_gapless_sequence(channel, token):
    users = [f"user{i}" for i in range(6)]
    thread_id = await create_thread(channel, token(users[0]), *users[1:])
    streams = [RawStream(channel, token(u)) for u in users]
    for s in streams:
        await s.hello()
    per_user = 15

    async def blast(i: int, s: RawStream) -> list[int]:
        results = await asyncio.gather(
            *(s.send_message(thread_id, f"{i}-{n}", f"op-{i}-{n}") for n in range(per_user))
        )
        return [r.confirmed.message.seq for r in results]

    seqs = await asyncio.gather(*(blast(i, s) for i, s in enumerate(streams)))
    flat = sorted(x for chunk in seqs for x in chunk)
    assert flat == list(range(1, len(users) * per_user + 1))
    for chunk in seqs:  # each sender's own messages keep their send order
        assert chunk == sorted(chunk)
    # Every stream sees every message once, in increasing seq.
    for s in streams:
        events = await s.events(len(users) * per_user)
        assert [e.message.seq for e in events] == list(range(1, len(users) * per_user + 1))
        s.cancel()


async def test_same_op_id_applies_once(channel, token):
    thread_id = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    first = await alice.send_message(thread_id, "once", "dup-1")
    again = await alice.send_message(thread_id, "once", "dup-1")
    assert again.replayed and not first.replayed
    assert again.confirmed.message.id == first.confirmed.message.id
    clash = await alice.send_message(thread_id, "different", "dup-1")
    assert clash.rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert status_details(clash.rejected)["reason"] == "IDEMPOTENCY_KEY_REUSED"
    stub = tsg.ThreadServiceStub(channel)
    history = await stub.ListMessages(
        ts.ListMessagesRequest(thread_id=thread_id), metadata=bearer(token("alice"))
    )
    assert [m.text for m in history.messages] == ["once"]
    alice.cancel()
