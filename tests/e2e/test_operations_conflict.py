"""Stream operations: idempotent edits and deletes, three-way merges and conflicts, rollbacks."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import field_mask_pb2

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.e2e.test_sync_resume import delete_op, edit_op, op
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg


def thread_update(op_id: str, thread_id: str, base: int, **fields: object) -> rt.ClientFrame:
    return rt.ClientFrame(
        operation=rt.Operation(
            client_op_id=op_id,
            kind=rt.OPERATION_KIND_UPDATE,
            base_version=base,
            update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)),
            thread=thread_pb2.Thread(id=thread_id, **fields),  # type: ignore[arg-type]
        )
    )


async def test_same_op_id_three_times_applies_once(channel, token):
    thread = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    msg = (await alice.send_message(thread, "hello", "s-1")).confirmed.message
    results = [await op(alice, edit_op("edit-1", msg, "hello there", 1)) for _ in range(3)]
    assert [r.replayed for r in results] == [False, True, True]
    assert {r.confirmed.message.version for r in results} == {2}
    deletes = [await op(alice, delete_op("del-1", msg)) for _ in range(3)]
    assert [r.replayed for r in deletes] == [False, True, True]
    assert deletes[0].confirmed.message.deleted and deletes[0].confirmed.message.version == 3
    history = await tsg.ThreadServiceStub(channel).ListMessages(
        ts.ListMessagesRequest(thread_id=thread), metadata=bearer(token("alice"))
    )
    [only] = history.messages
    assert only.deleted and only.version == 3  # one edit and one delete, nothing more
    clash = await op(alice, edit_op("edit-1", msg, "something else", 1))
    assert status_details(clash.rejected)["reason"] == "IDEMPOTENCY_KEY_REUSED"
    alice.cancel()


async def test_two_connections_racing_with_one_op_id_get_one_effect(channel, token):
    thread = await create_thread(channel, token("alice"), "bob")
    phone, laptop = RawStream(channel, token("alice")), RawStream(channel, token("alice"))
    await phone.hello()
    await laptop.hello()
    for round_ in range(5):
        a, b = await asyncio.gather(
            phone.send_message(thread, f"race {round_}", f"race-{round_}"),
            laptop.send_message(thread, f"race {round_}", f"race-{round_}"),
        )
        assert a.confirmed.message.id == b.confirmed.message.id
        assert sorted([a.replayed, b.replayed]) == [False, True]
    history = await tsg.ThreadServiceStub(channel).ListMessages(
        ts.ListMessagesRequest(thread_id=thread), metadata=bearer(token("alice"))
    )
    assert len(history.messages) == 5
    phone.cancel()
    laptop.cancel()


async def test_concurrent_message_edits_merge_or_conflict(channel, token):
    thread = await create_thread(channel, token("alice"), "bob")
    phone, laptop = RawStream(channel, token("alice")), RawStream(channel, token("alice"))
    await phone.hello()
    await laptop.hello()
    msg = (await phone.send_message(thread, "meet at the old cafe at noon", "s")).confirmed.message
    first = await op(phone, edit_op("p1", msg, "meet at the new cafe at noon", 1))
    second = await op(laptop, edit_op("l1", msg, "meet at the old cafe at one", 1))  # base 1 too
    assert second.WhichOneof("outcome") == "confirmed"
    assert second.confirmed.message.text == "meet at the new cafe at one"  # both edits kept
    assert second.confirmed.message.version == 3 and first.confirmed.message.version == 2
    # From version 2, the laptop changes the same word the merge above changed: a true overlap.
    clash = await op(laptop, edit_op("l2", msg, "meet at the new cafe at two", 2))
    assert clash.WhichOneof("outcome") == "conflict"
    c = clash.conflict
    assert (c.base.message.text, c.server.message.text, c.client.message.text) == (
        "meet at the new cafe at noon",
        "meet at the new cafe at one",
        "meet at the new cafe at two",
    )
    assert c.server_version == 3 and list(c.fields) == ["text"]
    # Resolving on the server's version converges.
    resolved = await op(laptop, edit_op("l3", msg, "meet at the new cafe at two", 3))
    assert resolved.confirmed.message.text == "meet at the new cafe at two"
    phone.cancel()
    laptop.cancel()


async def test_concurrent_thread_field_edits_merge_and_conflict(channel, token):
    thread_id = await create_thread(channel, token("alice"), "bob")
    alice, bob = RawStream(channel, token("alice")), RawStream(channel, token("bob"))
    await alice.hello()
    await bob.hello()
    a = await op(alice, thread_update("a1", thread_id, 1, title="Trip", tags=["travel"]))
    b = await op(bob, thread_update("b1", thread_id, 1, description="Packing list", tags=["todo"]))
    assert a.WhichOneof("outcome") == b.WhichOneof("outcome") == "confirmed"
    merged = b.confirmed.thread
    assert (merged.title, merged.description, list(merged.tags)) == (
        "Trip",
        "Packing list",
        ["travel", "todo"],
    )
    clash = await op(bob, thread_update("b2", thread_id, 1, title="Holiday"))
    assert clash.WhichOneof("outcome") == "conflict"
    c = clash.conflict
    assert (c.base.thread.title, c.server.thread.title, c.client.thread.title) == (
        "t",
        "Trip",
        "Holiday",
    )
    assert list(c.fields) == ["title"] and c.server_version == 3
    fixed = await op(bob, thread_update("b3", thread_id, c.server_version, title="Holiday"))
    assert fixed.confirmed.thread.title == "Holiday"
    # Both clients converge on the same thread state through events.
    for stream in (alice, bob):
        events = await stream.events(3)
        assert events[-1].thread.title == "Holiday" and events[-1].thread.version == 4
    alice.cancel()
    bob.cancel()


async def test_rejected_operation_never_reaches_others(channel, token):
    thread = await create_thread(channel, token("alice"), "bob")
    alice, bob = RawStream(channel, token("alice")), RawStream(channel, token("bob"))
    await alice.hello()
    await bob.hello()
    msg = (await alice.send_message(thread, "mine", "s")).confirmed.message
    await bob.events(1)
    await alice.events(1)
    result = await op(bob, edit_op("hijack", msg, "bob was here", 1))
    assert result.rejected.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    gone = await op(bob, delete_op("hijack-2", msg))
    assert gone.rejected.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    await alice.no_event()
    alice.cancel()
    bob.cancel()
