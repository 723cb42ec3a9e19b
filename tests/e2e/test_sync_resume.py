"""Resume: a client that was away gets exactly what it missed, then live events, no gap."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline.v1 import message_pb2, thread_pb2
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg


def edit_op(op_id: str, message: message_pb2.Message, text: str, base: int) -> rt.ClientFrame:
    return rt.ClientFrame(
        operation=rt.Operation(
            client_op_id=op_id,
            kind=rt.OPERATION_KIND_UPDATE,
            base_version=base,
            update_mask=field_mask_pb2.FieldMask(paths=["text"]),
            message=message_pb2.Message(id=message.id, thread_id=message.thread_id, text=text),
        )
    )


def delete_op(op_id: str, message: message_pb2.Message) -> rt.ClientFrame:
    return rt.ClientFrame(
        operation=rt.Operation(
            client_op_id=op_id,
            kind=rt.OPERATION_KIND_DELETE,
            message=message_pb2.Message(id=message.id, thread_id=message.thread_id),
        )
    )


async def op(stream: RawStream, frame: rt.ClientFrame) -> rt.OperationResult:
    return (await stream.reply_to(stream.send(frame))).operation_result


async def resume(
    stream: RawStream, state: rt.SyncState
) -> tuple[list[rt.ServerFrame], rt.ServerFrame]:
    """Sends Hello with a sync state; returns the frames up to and including SyncComplete."""
    rid = stream.send(rt.ClientFrame(hello=rt.Hello(sync_state=state)))
    welcome = await stream.reply_to(rid)
    assert welcome.welcome.resuming
    frames = []
    while True:
        frame = await stream.recv()
        frames.append(frame)
        if frame.WhichOneof("kind") == "sync_complete":
            return frames[:-1], frame


async def test_resume_replays_everything_missed_in_order_then_goes_live(channel, token):
    bob = RawStream(channel, token("bob"))
    welcome = await bob.hello()
    t1 = await create_thread(channel, token("alice"), "bob")
    [created] = await bob.events(1)
    cursor = created.change_seq
    bob.cancel()  # bob goes away

    alice = RawStream(channel, token("alice"))
    await alice.hello()
    sent = [(await alice.send_message(t1, f"m{i}", f"op-{i}")).confirmed.message for i in range(5)]
    assert (await op(alice, edit_op("e1", sent[1], "m1 edited", 1))).WhichOneof(
        "outcome"
    ) == "confirmed"
    assert (await op(alice, delete_op("d1", sent[2]))).WhichOneof("outcome") == "confirmed"
    threads = tsg.ThreadServiceStub(channel)
    await threads.UpdateThread(
        ts.UpdateThreadRequest(
            thread=thread_pb2.Thread(id=t1, title="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        metadata=bearer(token("alice")),
    )
    t2 = await create_thread(channel, token("alice"), "bob")  # bob was added meanwhile
    t3 = await create_thread(channel, token("alice"), "bob")
    await threads.RemoveParticipants(  # ... and removed from another
        ts.RemoveParticipantsRequest(thread_id=t3, user_ids=["bob"]),
        metadata=bearer(token("alice")),
    )
    await threads.MarkRead(
        ts.MarkReadRequest(thread_id=t1, read_seq=3), metadata=bearer(token("bob"))
    )

    bob = RawStream(channel, token("bob"))
    frames, done = await resume(bob, rt.SyncState(epoch=welcome.epoch, change_seq=cursor))
    assert done.sync_complete.recovered and done.sync_complete.was_recovering
    events = [e for f in frames for e in f.events.events]
    assert all(f.events.replay for f in frames)
    seqs = [e.change_seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > cursor
    kinds = [(e.kind, e.thread_id) for e in events]
    assert kinds.count((rt.EVENT_KIND_MESSAGE_CREATED, t1)) == 5
    assert (rt.EVENT_KIND_MESSAGE_UPDATED, t1) in kinds
    assert (rt.EVENT_KIND_MESSAGE_DELETED, t1) in kinds
    assert (rt.EVENT_KIND_THREAD_UPDATED, t1) in kinds
    assert (rt.EVENT_KIND_THREAD_CREATED, t2) in kinds
    assert (rt.EVENT_KIND_THREAD_REMOVED, t3) in kinds
    assert (rt.EVENT_KIND_READ_MARKER_UPDATED, t1) in kinds
    # Payloads are exact as of each change: the creation of m1 shows its original text.
    created_m1 = next(
        e for e in events if e.kind == rt.EVENT_KIND_MESSAGE_CREATED and e.message.seq == 2
    )
    assert created_m1.message.text == "m1" and created_m1.message.version == 1
    edited = next(e for e in events if e.kind == rt.EVENT_KIND_MESSAGE_UPDATED)
    assert edited.message.text == "m1 edited" and edited.version == 2
    assert done.sync_complete.change_seq == seqs[-1]
    marker = next(e for e in events if e.kind == rt.EVENT_KIND_READ_MARKER_UPDATED)
    assert (marker.read_marker.read_seq, marker.read_marker.unread_count) == (3, 2)

    # Live continues from there, with nothing missing and nothing repeated.
    await alice.send_message(t1, "live", "op-live")
    [live] = await bob.events(1)
    assert live.change_seq == done.sync_complete.change_seq + 1
    alice.cancel()
    bob.cancel()


async def test_replay_is_paged(settings_factory):
    from threadline_server.app import ThreadlineServer

    app = ThreadlineServer(settings_factory(realtime={"replay_batch_size": 7}))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as channel:  # type: ignore[union-attr]
            bob = RawStream(channel, app.mint("bob", 600))
            welcome = await bob.hello()
            bob.cancel()
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            alice = RawStream(channel, app.mint("alice", 600))
            await alice.hello()
            for i in range(30):
                await alice.send_message(thread, f"m{i}", f"p-{i}")
            bob = RawStream(channel, app.mint("bob", 600))
            frames, done = await resume(bob, rt.SyncState(epoch=welcome.epoch, change_seq=0))
            assert [len(f.events.events) for f in frames] == [7, 7, 7, 7, 3]
            assert done.sync_complete.event_count == 31
            alice.cancel()
            bob.cancel()
    finally:
        await app.stop(grace=0.5)


async def test_resume_refuses_other_epoch_ahead_cursor_and_pruned_cursor(channel, token, server):
    bob = RawStream(channel, token("bob"))
    welcome = await bob.hello()
    bob.cancel()
    await create_thread(channel, token("alice"), "bob")
    epoch, current, _ = await server.store.resume_point()
    cases = [
        (rt.SyncState(epoch="another-epoch", change_seq=1), rt.RESYNC_REASON_EPOCH_CHANGED),
        (rt.SyncState(epoch=welcome.epoch, change_seq=current + 10), rt.RESYNC_REASON_CURSOR_AHEAD),
    ]
    for state, reason in cases:
        stream = RawStream(channel, token("bob"))
        frames, done = await resume(stream, state)
        assert [f.resync_required.reason for f in frames] == [reason]
        assert not done.sync_complete.recovered and done.sync_complete.was_recovering
        stream.cancel()
    # Prune everything (retention 0): an old cursor can no longer be replayed exactly.
    removed, _ = await server.store.prune(retention_s=-1, idempotency_window_s=86_400)
    assert removed >= 1
    stream = RawStream(channel, token("bob"))
    frames, _ = await resume(stream, rt.SyncState(epoch=epoch, change_seq=0))
    assert [f.resync_required.reason for f in frames] == [rt.RESYNC_REASON_CURSOR_TOO_OLD]
    stream.cancel()


async def test_resume_answers_pending_operations_with_original_results(channel, token):
    alice = RawStream(channel, token("alice"))
    welcome = await alice.hello()
    thread = await create_thread(channel, token("alice"), "bob")
    first = await alice.send_message(thread, "did this land?", "maybe-1")
    cursor = first.change_seq
    alice.cancel()
    again = RawStream(channel, token("alice"))
    frames, done = await resume(
        again,
        rt.SyncState(
            epoch=welcome.epoch, change_seq=cursor, pending_op_ids=["maybe-1", "never-sent"]
        ),
    )
    results = [f.operation_result for f in frames if f.WhichOneof("kind") == "operation_result"]
    assert [(r.client_op_id, r.replayed) for r in results] == [("maybe-1", True)]
    assert results[0].confirmed.message.id == first.confirmed.message.id
    assert done.sync_complete.recovered
    again.cancel()


async def _replay_statements(server, channel, token, user: str, messages: int) -> tuple[int, int]:
    """Resumes `user` over a thread of `messages` messages (every other one edited); returns
    (events replayed, SELECTs the server ran while replaying), with the message cache empty."""
    from sqlalchemy import event

    reader = RawStream(channel, token(user))
    welcome = await reader.hello()
    reader.cancel()
    thread = await create_thread(channel, token(f"{user}-author"), user)
    author = RawStream(channel, token(f"{user}-author"))
    await author.hello()
    for i in range(messages):
        sent = (await author.send_message(thread, f"m{i}", f"{user}-{i}")).confirmed.message
        if i % 2:
            result = await op(author, edit_op(f"{user}-e{i}", sent, f"m{i} edited", 1))
            assert result.WhichOneof("outcome") == "confirmed"
    author.cancel()
    server.store.caches.messages.clear()
    selects: list[str] = []

    # Only the replay's reads: presence lookups (an author going offline after its grace) and
    # profile reads run on their own schedule, beside it.
    replay_tables = ("changes", "messages", "message_revisions", "uploads", "thread_revisions")

    def count(_conn, _cursor, statement: str, _params, _ctx, _many) -> None:
        words = statement.replace(",", " ").split()
        if statement.lstrip().upper().startswith("SELECT") and any(
            t in words for t in replay_tables
        ):
            selects.append(statement)

    event.listen(server.db.engine.sync_engine, "before_cursor_execute", count)
    try:
        reader = RawStream(channel, token(user))
        frames, done = await resume(reader, rt.SyncState(epoch=welcome.epoch, change_seq=0))
        reader.cancel()
    finally:
        event.remove(server.db.engine.sync_engine, "before_cursor_execute", count)
    events = [e for f in frames for e in f.events.events]
    edited = [e for e in events if e.kind == rt.EVENT_KIND_MESSAGE_UPDATED]
    created = [e for e in events if e.kind == rt.EVENT_KIND_MESSAGE_CREATED]
    # Exact as of each change: creations show the first text (from a revision when edited).
    assert [e.message.text for e in created] == [f"m{i}" for i in range(messages)]
    assert [e.message.text for e in edited] == [f"m{i} edited" for i in range(1, messages, 2)]
    assert done.sync_complete.event_count == len(events)
    return len(events), len(selects)


async def test_a_replay_page_costs_the_same_few_queries_however_many_changes_it_holds(
    server, channel, token
):
    few = await _replay_statements(server, channel, token, "rq-few", 4)
    many = await _replay_statements(server, channel, token, "rq-many", 60)
    assert many[0] > 8 * few[0] // 2  # 91 events against 7
    assert many[1] == few[1], (few, many)


async def test_replay_pages_stay_within_their_byte_bound_whatever_the_current_rows_say(
    server, channel, token
):
    """The bound is estimated before loading from the text each change refers to: a deleted
    message's row is empty while its creation replays the original, and 4-byte characters
    count four times. Pages still cover every change exactly once."""
    from threadline_server.storage.history import approx_bytes

    reader = RawStream(channel, token("rb-reader"))
    await reader.hello()
    reader.cancel()
    thread = await create_thread(channel, token("rb-author"), "rb-reader")
    author = RawStream(channel, token("rb-author"))
    await author.hello()
    big = 40_000  # bytes: 10,000 four-byte characters
    sent = []
    for i in range(12):
        text = f"{i:02d}" + "\U0001f600" * ((big - 2) // 4)
        sent.append((await author.send_message(thread, text, f"rb-{i}")).confirmed.message)
    for i, message in enumerate(sent):
        assert (await op(author, delete_op(f"rb-d{i}", message))).WhichOneof(
            "outcome"
        ) == "confirmed"
    author.cancel()
    server.store.caches.messages.clear()
    _, cursor, _ = await server.store.resume_point()
    room = 100_000
    after, seen, pages = 0, [], 0
    while after < cursor:
        events, last = await server.store.replay("rb-reader", after, cursor, 300, room)
        if last is None:
            break
        pages += 1
        loaded = sum(approx_bytes(e.payload) for e in events)
        assert loaded <= room + big + 1024, (pages, len(events), loaded)
        seen += [e.change_seq for e in events]
        after = last
    assert len(seen) == len(set(seen)) == 1 + 12 + 12  # joined, sent, deleted
    assert pages >= 4  # 12 originals of 40 KB cannot fit in fewer pages of 100 KB


async def test_streams_resuming_together_each_get_exactly_their_own_changes(server, channel, token):
    """Replay pages of streams resuming at once are read in one batch: nobody's changes leak
    into another's replay, and each gets all of its own."""
    import asyncio

    users = [f"rt-{i}" for i in range(6)]
    epoch = ""
    for user in users:
        stream = RawStream(channel, token(user))
        epoch = (await stream.hello()).epoch
        stream.cancel()
    threads = {}
    author = RawStream(channel, token("rt-author"))
    await author.hello()
    for i, user in enumerate(users):
        threads[user] = await create_thread(channel, token("rt-author"), user)
        for k in range(i + 1):  # a different number of messages each
            await author.send_message(threads[user], f"{user} #{k}", f"{user}-{k}")
    author.cancel()

    async def resume_one(user: str) -> list[rt.Event]:
        stream = RawStream(channel, token(user))
        frames, done = await resume(stream, rt.SyncState(epoch=epoch, change_seq=0))
        stream.cancel()
        events = [e for f in frames for e in f.events.events]
        assert done.sync_complete.event_count == len(events)
        return events

    results = await asyncio.gather(*(resume_one(u) for u in users))
    for i, (user, events) in enumerate(zip(users, results, strict=True)):
        assert {e.thread_id for e in events} == {threads[user]}
        texts = [e.message.text for e in events if e.kind == rt.EVENT_KIND_MESSAGE_CREATED]
        assert texts == [f"{user} #{k}" for k in range(i + 1)]
