"""Caches never serve data older than an acknowledged write: access checks right after a removal,
replayed message versions right after edits and deletes, and under concurrent reads."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from tests.conftest import bearer, make_settings
from tests.e2e.test_realtime_delivery import create_thread
from tests.e2e.test_sync_resume import delete_op, edit_op, op, resume
from tests.e2e.test_uploads_attach import upload_as
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer


def lookups(app: ThreadlineServer, cache: str, result: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "threadline_cache_lookups_total", {"cache": cache, "result": result}
    )
    return value or 0.0


async def history(stub: tsg.ThreadServiceStub, tok: str, thread_id: str) -> list[str]:
    resp = await stub.ListMessages(
        ts.ListMessagesRequest(thread_id=thread_id, page_size=50), metadata=bearer(tok)
    )
    return [m.text for m in resp.messages]


async def test_removed_member_loses_access_at_once_despite_cached_membership(
    server, channel, token
):
    stub = tsg.ThreadServiceStub(channel)
    thread_id = await create_thread(channel, token("alice"), "bob")
    for _ in range(3):  # the membership is cached now
        assert await history(stub, token("bob"), thread_id) == []
    assert lookups(server, "threads", "hit") >= 2

    alice = RawStream(channel, token("alice"))
    await alice.hello()
    await stub.RemoveParticipants(
        ts.RemoveParticipantsRequest(thread_id=thread_id, user_ids=["bob"]),
        metadata=bearer(token("alice")),
    )
    [update] = await alice.events(1)
    assert list(update.thread.participant_ids) == ["alice"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await history(stub, token("bob"), thread_id)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    # Typing goes through the same cache: bob's signal no longer reaches alice.
    bob = RawStream(channel, token("bob"))
    await bob.hello()
    bob.send(rt.ClientFrame(typing=rt.Typing(thread_id=thread_id, active=True)))
    await alice.no_event(0.5)

    await stub.AddParticipants(
        ts.AddParticipantsRequest(thread_id=thread_id, user_ids=["bob"]),
        metadata=bearer(token("alice")),
    )
    assert await history(stub, token("bob"), thread_id) == []  # back in at once
    assert await history(stub, token("bob"), thread_id) == []  # cached again

    await stub.DeleteThread(
        ts.DeleteThreadRequest(thread_id=thread_id), metadata=bearer(token("alice"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await history(stub, token("bob"), thread_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    for s in (alice, bob):
        s.cancel()


async def test_reads_racing_a_removal_never_restore_access(server, channel, token):
    stub = tsg.ThreadServiceStub(channel)
    thread_id = await create_thread(channel, token("alice"), "bob")
    bob_tok = token("bob")
    removed = asyncio.Event()
    after_removal: list[grpc.StatusCode] = []

    async def reader() -> None:
        while True:
            was_removed = removed.is_set()
            try:
                await history(stub, bob_tok, thread_id)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                code = err.code()
            if was_removed:  # started after the removal was acknowledged
                after_removal.append(code)
                if len(after_removal) >= 20:
                    return

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    await asyncio.sleep(0.2)  # reads (and cache fills) in full swing
    await stub.RemoveParticipants(
        ts.RemoveParticipantsRequest(thread_id=thread_id, user_ids=["bob"]),
        metadata=bearer(token("alice")),
    )
    removed.set()
    await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert set(after_removal) == {grpc.StatusCode.NOT_FOUND}


async def test_replay_through_the_message_cache_equals_replay_from_the_database(tmp_path, db_url):
    """Two nodes on one database, one with caches and one without: every resume after each
    write replays byte-identical events."""
    cached = ThreadlineServer(make_settings(tmp_path / "cached", db_url))
    plain = ThreadlineServer(
        make_settings(
            tmp_path / "plain",
            db_url,
            caches={
                "messages": {"max_size": 0, "ttl_s": 0},
                "threads": {"max_size": 0, "ttl_s": 0},
                "users": {"max_size": 0, "ttl_s": 0},
            },
        )
    )
    await cached.start()
    await plain.start()
    try:
        ports = [n.endpoints.grpc_port for n in (cached, plain)]  # type: ignore[union-attr]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as ch_cached,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as ch_plain,
        ):
            alice = RawStream(ch_cached, cached.mint("alice", 600))
            probe = RawStream(ch_cached, cached.mint("bob", 600))
            welcome = await alice.hello()
            start = (await probe.hello()).epoch
            thread_id = await create_thread(ch_cached, cached.mint("alice", 600), "bob")
            state = rt.SyncState(epoch=start, change_seq=0)
            async with httpx.AsyncClient() as http:
                file_id = await upload_as(
                    ch_cached, http, bearer(cached.mint("alice", 600)), b"\x89PNG" + b"0" * 64
                )
            sent = await op(
                alice,
                rt.ClientFrame(
                    send_message=rt.SendMessage(
                        client_op_id="s-1",
                        thread_id=thread_id,
                        text="first",
                        attachment_ids=[file_id],
                    )
                ),
            )
            m = sent.confirmed.message
            assert len(m.attachments) == 1
            writes = [
                edit_op("e-1", m, "first, edited", 1),
                edit_op("e-2", m, "first, edited twice", 2),
                delete_op("d-1", m),
            ]
            for step in range(len(writes) + 1):
                replays = []
                for ch, node in ((ch_cached, cached), (ch_plain, plain)):
                    bob = RawStream(ch, node.mint("bob", 600))
                    frames, done = await resume(bob, state)
                    assert done.sync_complete.recovered
                    replays.append([f.events.SerializeToString() for f in frames])
                    bob.cancel()
                assert replays[0] == replays[1], f"after write {step}"
                assert replays[0], "something was replayed"
                if step < len(writes):
                    result = await op(alice, writes[step])
                    assert result.WhichOneof("outcome") == "confirmed", result
                    # An edit keeps the files; a delete releases them.
                    kept = 0 if writes[step].operation.kind == rt.OPERATION_KIND_DELETE else 1
                    assert len(result.confirmed.message.attachments) == kept
            assert lookups(cached, "messages", "hit") > 0
            assert lookups(plain, "messages", "hit") == 0
            assert welcome.user_id == "alice"
            for s in (alice, probe):
                s.cancel()
    finally:
        await cached.stop(grace=0.5)
        await plain.stop(grace=0.5)
