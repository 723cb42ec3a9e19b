"""The client state reducer (threadline_client.state) without a server: pure, deterministic."""

from __future__ import annotations

import asyncio

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from threadline.v1 import errors_pb2, message_pb2, realtime_pb2, thread_pb2
from threadline_client.state import (
    Change,
    ChangeKind,
    ClientStore,
    MessageStatus,
    OpKind,
    OpStatus,
    Snapshot,
    snapshot_view,
)

ME = "alice"
T1 = "t1"


def thread(version: int = 1, *, last_seq: int = 0, title: str = "Lunch", thread_id: str = T1):
    return thread_pb2.Thread(
        id=thread_id,
        title=title,
        participant_ids=["alice", "bob"],
        creator_id=ME,
        last_seq=last_seq,
        version=version,
    )


def message(seq: int, text: str, *, version: int = 1, author: str = "bob", deleted: bool = False):
    return message_pb2.Message(
        id=f"m{seq}",
        thread_id=T1,
        seq=seq,
        author_id=author,
        text=text,
        version=version,
        deleted=deleted,
    )


def summary(t: thread_pb2.Thread, read_seq: int = 0, unread: int = 0):
    return thread_pb2.ThreadSummary(thread=t, read_seq=read_seq, unread_count=unread)


def msg_event(change_seq: int, m: message_pb2.Message, kind=None, op_id: str = ""):
    return realtime_pb2.Event(
        change_seq=change_seq,
        kind=kind or realtime_pb2.EVENT_KIND_MESSAGE_CREATED,
        thread_id=m.thread_id,
        thread_seq=m.seq,
        version=m.version,
        client_op_id=op_id,
        message=m,
    )


def thread_event(change_seq: int, t: thread_pb2.Thread, kind=None):
    return realtime_pb2.Event(
        change_seq=change_seq,
        kind=kind or realtime_pb2.EVENT_KIND_THREAD_UPDATED,
        thread_id=t.id,
        version=t.version,
        thread=t,
    )


def marker_event(change_seq: int, read_seq: int, unread: int):
    return realtime_pb2.Event(
        change_seq=change_seq,
        kind=realtime_pb2.EVENT_KIND_READ_MARKER_UPDATED,
        thread_id=T1,
        read_marker=thread_pb2.ReadMarker(
            thread_id=T1, user_id=ME, read_seq=read_seq, unread_count=unread
        ),
    )


def rejected(op_id: str, code: int, reason: str, text: str = "no") -> realtime_pb2.OperationResult:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="threadline.dev"))
    return realtime_pb2.OperationResult(
        client_op_id=op_id,
        rejected=status_pb2.Status(code=code, message=text, details=[detail]),
    )


def confirmed_message(op_id: str, m: message_pb2.Message) -> realtime_pb2.OperationResult:
    return realtime_pb2.OperationResult(
        client_op_id=op_id, confirmed=errors_pb2.ResourceSnapshot(message=m)
    )


def loaded(*messages: message_pb2.Message, t: thread_pb2.Thread | None = None, **kw) -> ClientStore:
    t = t or thread(last_seq=max((m.seq for m in messages), default=0))
    store = ClientStore(ME)
    store.apply_snapshot(
        Snapshot([summary(t, **kw)], {T1: list(messages)}), epoch="e1", change_seq=10
    )
    return store


def texts(store: ClientStore) -> list[str]:
    return [m.text for m in store.state.messages.by_thread.get(T1, [])]


def test_version_rule_ignores_stale_and_equal_copies():
    store = loaded(message(1, "v2 text", version=2))
    store.apply_events([msg_event(11, message(1, "v1 text", version=1))])
    store.apply_events([msg_event(12, message(1, "other v2", version=2))])
    assert texts(store) == ["v2 text"]
    store.apply_events(
        [msg_event(13, message(1, "v3 text", version=3), realtime_pb2.EVENT_KIND_MESSAGE_UPDATED)]
    )
    assert texts(store) == ["v3 text"]
    assert store.state.sync.change_seq == 13

    store.apply_events([thread_event(14, thread(version=1, title="stale"))])
    assert store.thread(T1).title == "Lunch"
    store.apply_events([thread_event(15, thread(version=2, title="Dinner"))])
    assert store.thread(T1).title == "Dinner"


def test_events_at_or_below_the_cursor_are_skipped():
    store = loaded()
    seen: list[Change] = []
    store.subscribe(seen.append)
    store.apply_events([msg_event(10, message(1, "old"))])  # cursor is 10 after the snapshot
    assert texts(store) == []
    assert seen == []
    store.apply_events([msg_event(11, message(1, "new"))])
    assert texts(store) == ["new"]


def test_optimistic_send_is_confirmed_in_place_without_duplicate():
    store = loaded(message(1, "hi"))
    snapshots: list[list[str]] = []
    store.subscribe(
        lambda _: snapshots.append([m.local_id for m in store.state.messages.by_thread[T1]])
    )

    pending = store.queue_send(T1, "hello")
    assert pending.status is MessageStatus.PENDING and pending.seq == 0
    assert store.state.messages.pending == [pending]
    assert texts(store) == ["hi", "hello"]
    op_id = pending.local_id

    server_copy = message(2, "hello", author=ME)
    # The author's own event carries the op id: it replaces the pending item in place.
    store.apply_events([msg_event(11, server_copy, op_id=op_id)])
    [_, second] = store.state.messages.by_thread[T1]
    assert second is pending
    assert (pending.local_id, pending.id, pending.seq) == (op_id, "m2", 2)
    assert pending.status is MessageStatus.SENT
    assert store.state.messages.pending == []
    # The result arriving afterwards is a duplicate: nothing changes.
    store.apply_result(confirmed_message(op_id, server_copy))
    assert len(store.state.messages.by_thread[T1]) == 2
    assert all(len(ids) == len(set(ids)) for ids in snapshots)
    assert [ids.count(op_id) for ids in snapshots] == [1, 1]


def test_result_before_event_also_confirms_in_place():
    store = loaded()
    pending = store.queue_send(T1, "first")
    server_copy = message(1, "first", author=ME)
    change = store.apply_result(confirmed_message(pending.local_id, server_copy))
    assert change is not None
    assert [o.status for o in change.outcomes] == [OpStatus.CONFIRMED]
    store.apply_events([msg_event(11, server_copy, op_id=pending.local_id)])
    assert store.state.messages.by_thread[T1] == [pending]
    assert pending.status is MessageStatus.SENT and pending.seq == 1


def test_reload_while_send_outcome_unknown_keeps_one_identity():
    store = loaded()
    pending = store.queue_send(T1, "hello")
    store.mark_sent(pending.local_id)
    server_copy = message(1, "hello", author=ME)
    # A reload shows the committed message (no op id in snapshots) next to the pending one...
    store.apply_snapshot(
        Snapshot([summary(thread(last_seq=1))], {T1: [server_copy]}), epoch="e1", change_seq=12
    )
    assert len(store.state.messages.by_thread[T1]) == 2
    # ...until the resent op's replayed result names it: the pending identity wins.
    change = store.apply_result(confirmed_message(pending.local_id, server_copy))
    assert store.state.messages.by_thread[T1] == [pending]
    assert change is not None and len(change.removed) == 1
    # A later reload reuses the same local id for this message.
    store.apply_snapshot(
        Snapshot([summary(thread(last_seq=1))], {T1: [server_copy]}), epoch="e1", change_seq=13
    )
    assert [m.local_id for m in store.state.messages.by_thread[T1]] == [pending.local_id]


def test_rejected_send_rolls_back_to_failed_and_retry_reuses_op_id():
    store = loaded(message(1, "hi"))
    pending = store.queue_send(T1, "x" * 10)
    op_id = pending.local_id
    change = store.apply_result(rejected(op_id, 3, "FIELD_INVALID", "text too long"))
    assert change is not None and change.removed == (pending,)
    assert texts(store) == ["hi"]
    assert store.state.messages.pending == []
    assert store.state.messages.failed == [pending]
    assert pending.status is MessageStatus.FAILED
    assert pending.error is not None
    assert (pending.error.code, pending.error.reason) == ("INVALID_ARGUMENT", "FIELD_INVALID")
    assert store.state.ui.errors[-1].source == f"op:{op_id}"
    assert store.state.ops.pending == [] and op_id in store.state.ops.failed

    op = store.retry(op_id)
    assert op.op_id == op_id and op.kind is OpKind.SEND_MESSAGE
    assert store.state.messages.failed == []
    assert store.state.messages.by_thread[T1][-1] is pending
    assert pending.status is MessageStatus.PENDING and pending.error is None
    assert store.next_op() is op


def test_rejected_edit_restores_server_text_and_records_failure():
    store = loaded(message(1, "hi", author=ME))
    msg = store.message("m1")
    assert msg is not None
    op = store.queue_edit("m1", "hello")
    assert (msg.text, msg.status, op.base_version) == ("hello", MessageStatus.PENDING, 1)
    store.apply_result(rejected(op.op_id, 7, "NOT_ALLOWED"))
    assert (msg.text, msg.status) == ("hi", MessageStatus.SENT)
    [record] = store.state.messages.failed
    assert (record.local_id, record.id, record.text, record.op) == (
        op.op_id,
        "m1",
        "hello",
        OpKind.EDIT_MESSAGE,
    )
    assert record.error is not None and record.error.code == "PERMISSION_DENIED"


def test_delete_shows_tombstone_then_server_tombstone():
    store = loaded(message(1, "hi", author=ME))
    msg = store.message("m1")
    assert msg is not None
    op = store.queue_delete("m1")
    assert msg.deleted and msg.text == "" and msg.pending
    tombstone = message(1, "", version=2, author=ME, deleted=True)
    store.apply_events(
        [msg_event(11, tombstone, realtime_pb2.EVENT_KIND_MESSAGE_DELETED, op_id=op.op_id)]
    )
    assert msg.deleted and not msg.pending and msg.version == 2
    assert store.pending_op(op.op_id) is None


def test_later_edits_are_rebased_on_the_confirmed_version():
    store = loaded(message(1, "a", author=ME))
    first = store.queue_edit("m1", "b")
    second = store.queue_edit("m1", "c")
    assert store.message("m1").text == "c"
    assert first.base_version == second.base_version == 1
    store.apply_result(confirmed_message(first.op_id, message(1, "b", version=2, author=ME)))
    assert second.base_version == 2
    assert store.message("m1").text == "c"


def test_read_markers_merge_by_maximum():
    store = loaded(message(1, "a"), message(2, "b"), message(3, "c"), read_seq=1, unread=2)
    view = store.thread(T1)
    assert view is not None and (view.read_seq, view.unread_count) == (1, 2)
    store.apply_events([marker_event(11, 3, 0)])
    assert (view.read_seq, view.unread_count) == (3, 0)
    store.apply_events([marker_event(12, 2, 1)])  # stale: another device, older marker
    assert (view.read_seq, view.unread_count) == (3, 0)
    # New messages from others count; the user's own do not.
    store.apply_events([msg_event(13, message(4, "d")), msg_event(14, message(5, "e", author=ME))])
    assert view.unread_count == 1 and store.state.threads.unread == 1
    # An optimistic mark-read shows at once; a lower one is not even queued.
    op = store.queue_mark_read(T1, 5)
    assert op is not None and (view.read_seq, view.unread_count) == (5, 0)
    assert store.queue_mark_read(T1, 4) is None
    store.apply_result(
        realtime_pb2.OperationResult(
            client_op_id=op.op_id,
            confirmed=errors_pb2.ResourceSnapshot(
                read_marker=thread_pb2.ReadMarker(thread_id=T1, read_seq=5, unread_count=0)
            ),
            change_seq=15,
        )
    )
    assert (view.read_seq, view.unread_count, view.pending) == (5, 0, False)


def test_sync_state_reports_cursor_thread_seqs_and_unanswered_ops():
    store = loaded(message(1, "a"), message(2, "b"))
    store.apply_events([msg_event(11, message(3, "c"))])
    sent = store.queue_send(T1, "sent")
    store.mark_sent(sent.local_id)
    store.queue_send(T1, "not sent yet")
    state = store.sync_state()
    assert (state.epoch, state.change_seq) == ("e1", 11)
    assert dict(state.thread_seqs) == {T1: 3}
    assert list(state.pending_op_ids) == [sent.local_id]
    assert state.HasField("last_synced_at")
    assert store.resume_state() is not None
    store.note_resync(realtime_pb2.ResyncRequired(reason=realtime_pb2.RESYNC_REASON_CURSOR_TOO_OLD))
    assert store.resume_state() is None


def test_conflict_applies_server_value_and_reports_it():
    store = loaded()
    op = store.queue_thread_update(T1, {"title": "Mine"})
    assert store.thread(T1).title == "Mine"
    conflict = errors_pb2.Conflict(
        base=errors_pb2.ResourceSnapshot(thread=thread(1)),
        server=errors_pb2.ResourceSnapshot(thread=thread(2, title="Theirs")),
        client=errors_pb2.ResourceSnapshot(thread=thread(1, title="Mine")),
        server_version=2,
        fields=["title"],
    )
    change = store.apply_result(
        realtime_pb2.OperationResult(client_op_id=op.op_id, conflict=conflict)
    )
    assert change is not None
    [outcome] = change.outcomes
    assert outcome.status is OpStatus.CONFLICT and outcome.conflict is not None
    info = outcome.conflict
    assert (info.resource, info.fields, info.server_version) == ("thread", ("title",), 2)
    assert info.server.title == "Theirs" and info.client.title == "Mine"
    view = store.thread(T1)
    assert view is not None and (view.title, view.version, view.pending) == ("Theirs", 2, False)


def test_thread_removal_drops_messages_and_ignores_stale_updates():
    store = loaded(message(1, "a"), t=thread(version=3, last_seq=1))
    pending = store.queue_send(T1, "queued")
    store.apply_events(
        [
            realtime_pb2.Event(
                change_seq=11,
                kind=realtime_pb2.EVENT_KIND_THREAD_REMOVED,
                thread_id=T1,
                version=4,
                thread=thread_pb2.Thread(id=T1),
            )
        ]
    )
    assert store.thread(T1) is None and store.state.threads.active == []
    assert store.state.messages.by_thread[T1] == [pending]  # the server will answer it
    store.apply_events([thread_event(12, thread(version=4, title="stale"))])
    assert store.thread(T1) is None
    store.apply_events(
        [thread_event(13, thread(version=5), realtime_pb2.EVENT_KIND_THREAD_CREATED)]
    )
    assert store.thread(T1) is not None


def test_archive_moves_thread_between_lists():
    store = loaded()
    op = store.queue_thread_update(T1, {"archived": True})
    assert store.state.threads.active == [] and len(store.state.threads.archived) == 1
    store.apply_result(rejected(op.op_id, 7, "NOT_ALLOWED"))
    assert len(store.state.threads.active) == 1 and store.state.threads.archived == []


def test_snapshot_view_matches_a_fresh_snapshot_after_events():
    store = loaded(message(1, "a"))
    store.apply_events(
        [
            msg_event(11, message(2, "b")),
            msg_event(12, message(1, "", version=2, deleted=True)),
            thread_event(13, thread(version=2, last_seq=2, title="Renamed")),
        ]
    )
    store.queue_send(T1, "pending only")  # overlays are not part of the view
    fresh = Snapshot(
        [summary(thread(version=2, last_seq=2, title="Renamed"))],
        {T1: [message(1, "", version=2, deleted=True), message(2, "b")]},
    )
    assert snapshot_view(store.state) == snapshot_view(fresh)
    assert snapshot_view(fresh).messages[T1] == (("m1", 1, "", True, 2), ("m2", 2, "b", False, 1))


async def test_changes_iterator_and_subscribers_see_each_change():
    store = ClientStore(ME)
    changes = store.changes()
    first = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)  # let the iterator register its buffer
    store.apply_snapshot(Snapshot([summary(thread())], {}), epoch="e", change_seq=1)
    change = await asyncio.wait_for(first, 1)
    assert change.kind is ChangeKind.SNAPSHOT and change.thread_ids == {T1}
    await changes.aclose()
    assert store._queues == set()  # released
