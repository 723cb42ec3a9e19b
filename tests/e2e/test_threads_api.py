"""ThreadService and UserService through real channels: behaviour, validation, authorization."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tests.conftest import bearer
from tests.support.raw_stream import RawStream
from tests.support.rpc import details
from threadline.v1 import thread_pb2, user_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline.v1 import user_service_pb2 as us
from threadline.v1 import user_service_pb2_grpc as usg


@pytest.fixture
def threads(channel):
    return tsg.ThreadServiceStub(channel)


async def _create(threads, tok, title="Plans", participants=("bob",), **extra):
    resp = await threads.CreateThread(
        ts.CreateThreadRequest(
            thread=thread_pb2.Thread(title=title, participant_ids=participants, **extra)
        ),
        metadata=bearer(tok),
    )
    return resp.thread


async def _send(channel, tok, thread_id, *texts):
    stream = RawStream(channel, tok)
    await stream.hello()
    for i, text in enumerate(texts):
        result = await stream.send_message(thread_id, text, f"op-{thread_id[:6]}-{i}")
        assert result.WhichOneof("outcome") == "confirmed", result
    stream.cancel()


async def test_create_thread_includes_creator_and_notifies_participants(channel, threads, token):
    bob = RawStream(channel, token("bob"))
    await bob.hello()
    thread = await _create(threads, token("alice"), tags=["x"])
    assert list(thread.participant_ids) == ["alice", "bob"]
    assert thread.creator_id == "alice" and thread.version == 1
    [event] = await bob.events(1)
    assert event.thread.id == thread.id
    bob.cancel()


async def test_list_threads_with_unread_counts_last_message_and_paging(channel, threads, token):
    ids = [(await _create(threads, token("alice"), title=f"t{i}")).id for i in range(5)]
    await _send(channel, token("bob"), ids[0], "one", "two", "three")
    page = await threads.ListThreads(
        ts.ListThreadsRequest(page_size=2), metadata=bearer(token("alice"))
    )
    assert len(page.threads) == 2 and page.next_page_token
    assert page.threads[0].thread.id == ids[0]  # most recently active first
    assert page.threads[0].unread_count == 3
    assert page.threads[0].last_message.text == "three"
    seen = [s.thread.id for s in page.threads]
    while page.next_page_token:
        page = await threads.ListThreads(
            ts.ListThreadsRequest(page_size=2, page_token=page.next_page_token),
            metadata=bearer(token("alice")),
        )
        seen += [s.thread.id for s in page.threads]
    assert sorted(seen) == sorted(ids) and len(seen) == 5

    marker = await threads.MarkRead(
        ts.MarkReadRequest(thread_id=ids[0], read_seq=2), metadata=bearer(token("alice"))
    )
    assert marker.read_marker.read_seq == 2 and marker.read_marker.unread_count == 1
    back = await threads.MarkRead(
        ts.MarkReadRequest(thread_id=ids[0], read_seq=1), metadata=bearer(token("alice"))
    )
    assert back.read_marker.read_seq == 2  # markers never move back


async def test_archive_filters_and_update_with_versions(threads, token):
    alice = bearer(token("alice"))
    t = await _create(threads, token("alice"))
    archived = await threads.ArchiveThread(ts.ArchiveThreadRequest(thread_id=t.id), metadata=alice)
    assert archived.thread.archived and archived.thread.version == 2
    active = await threads.ListThreads(ts.ListThreadsRequest(), metadata=alice)
    assert [s.thread.id for s in active.threads] == []
    arch = await threads.ListThreads(
        ts.ListThreadsRequest(filter=ts.THREAD_FILTER_ARCHIVED), metadata=alice
    )
    assert [s.thread.id for s in arch.threads] == [t.id]
    await threads.UnarchiveThread(ts.UnarchiveThreadRequest(thread_id=t.id), metadata=alice)

    updated = await threads.UpdateThread(
        ts.UpdateThreadRequest(
            thread=thread_pb2.Thread(id=t.id, title="New title", description="ignored"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            expected_version=3,
        ),
        metadata=alice,
    )
    assert updated.thread.title == "New title" and updated.thread.description == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.UpdateThread(
            ts.UpdateThreadRequest(
                thread=thread_pb2.Thread(id=t.id, title="Stale"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
                expected_version=3,
            ),
            metadata=alice,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert details(err.value)["metadata"] == {"current_version": "4"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.UpdateThread(
            ts.UpdateThreadRequest(
                thread=thread_pb2.Thread(id=t.id),
                update_mask=field_mask_pb2.FieldMask(paths=["creator_id"]),
            ),
            metadata=alice,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in details(err.value)["fields"]


async def test_participants_add_remove_and_delete_cascades(channel, threads, token):
    alice = bearer(token("alice"))
    t = await _create(threads, token("alice"))
    carol = RawStream(channel, token("carol"))
    await carol.hello()
    added = await threads.AddParticipants(
        ts.AddParticipantsRequest(thread_id=t.id, user_ids=["carol"]), metadata=alice
    )
    assert list(added.thread.participant_ids) == ["alice", "bob", "carol"]
    [joined] = await carol.events(1)
    assert joined.thread.id == t.id
    await _send(channel, token("carol"), t.id, "hi all")
    removed = await threads.RemoveParticipants(
        ts.RemoveParticipantsRequest(thread_id=t.id, user_ids=["carol"]), metadata=alice
    )
    assert list(removed.thread.participant_ids) == ["alice", "bob"]
    events = await carol.events(2)
    assert events[-1].thread.id == t.id and events[-1].kind == 6  # THREAD_REMOVED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.GetThread(
            ts.GetThreadRequest(thread_id=t.id), metadata=bearer(token("carol"))
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as err:  # only the creator removes others
        await threads.RemoveParticipants(
            ts.RemoveParticipantsRequest(thread_id=t.id, user_ids=["alice"]),
            metadata=bearer(token("bob")),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.DeleteThread(
            ts.DeleteThreadRequest(thread_id=t.id), metadata=bearer(token("bob"))
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await threads.DeleteThread(ts.DeleteThreadRequest(thread_id=t.id), metadata=alice)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.ListMessages(ts.ListMessagesRequest(thread_id=t.id), metadata=alice)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    carol.cancel()


async def test_list_messages_pages_both_directions(channel, threads, token):
    t = await _create(threads, token("alice"))
    await _send(channel, token("alice"), t.id, *[f"m{i}" for i in range(7)])
    alice = bearer(token("alice"))
    back = await threads.ListMessages(
        ts.ListMessagesRequest(thread_id=t.id, page_size=3), metadata=alice
    )
    assert [m.seq for m in back.messages] == [7, 6, 5]
    back2 = await threads.ListMessages(
        ts.ListMessagesRequest(thread_id=t.id, page_size=3, page_token=back.next_page_token),
        metadata=alice,
    )
    assert [m.seq for m in back2.messages] == [4, 3, 2]
    fwd = await threads.ListMessages(
        ts.ListMessagesRequest(
            thread_id=t.id,
            direction=ts.ListMessagesRequest.DIRECTION_FORWARD,
            start_seq=4,
            page_size=10,
        ),
        metadata=alice,
    )
    assert [m.seq for m in fwd.messages] == [5, 6, 7] and fwd.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a token from other parameters
        await threads.ListMessages(
            ts.ListMessagesRequest(
                thread_id=t.id,
                direction=ts.ListMessagesRequest.DIRECTION_FORWARD,
                page_token=back.next_page_token,
            ),
            metadata=alice,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.ListMessages(
            ts.ListMessagesRequest(thread_id=t.id, page_size=-1), metadata=alice
        )
    assert "page_size" in details(err.value)["fields"]


async def test_non_participant_learns_nothing_on_any_path(channel, threads, token):
    t = await _create(threads, token("alice"))
    carol = bearer(token("carol"))
    calls = [
        threads.GetThread(ts.GetThreadRequest(thread_id=t.id), metadata=carol),
        threads.ListMessages(ts.ListMessagesRequest(thread_id=t.id), metadata=carol),
        threads.MarkRead(ts.MarkReadRequest(thread_id=t.id, read_seq=1), metadata=carol),
        threads.ArchiveThread(ts.ArchiveThreadRequest(thread_id=t.id), metadata=carol),
        threads.UnarchiveThread(ts.UnarchiveThreadRequest(thread_id=t.id), metadata=carol),
        threads.AddParticipants(
            ts.AddParticipantsRequest(thread_id=t.id, user_ids=["carol"]), metadata=carol
        ),
        threads.RemoveParticipants(
            ts.RemoveParticipantsRequest(thread_id=t.id, user_ids=["bob"]), metadata=carol
        ),
        threads.DeleteThread(ts.DeleteThreadRequest(thread_id=t.id), metadata=carol),
        threads.UpdateThread(
            ts.UpdateThreadRequest(
                thread=thread_pb2.Thread(id=t.id, title="pwned"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=carol,
        ),
    ]
    unknown = threads.GetThread(ts.GetThreadRequest(thread_id="doesnotexist"), metadata=carol)
    for call in [*calls, unknown]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(err.value)["reason"] == "RESOURCE_NOT_FOUND"
    listed = await threads.ListThreads(
        ts.ListThreadsRequest(filter=ts.THREAD_FILTER_ALL), metadata=carol
    )
    assert list(listed.threads) == []
    still = await threads.GetThread(
        ts.GetThreadRequest(thread_id=t.id), metadata=bearer(token("alice"))
    )
    assert still.thread.thread.title == "Plans" and not still.thread.thread.archived
    assert list(still.thread.thread.participant_ids) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("thread", "fields"),
    [
        (thread_pb2.Thread(title=""), ["thread.title"]),
        (thread_pb2.Thread(title="x" * 201), ["thread.title"]),
        (thread_pb2.Thread(title="ok", participant_ids=["bad id!"]), ["thread.participant_ids[0]"]),
        (thread_pb2.Thread(title="ok", tags=["a", "a"]), ["thread.tags"]),
        (
            thread_pb2.Thread(title="", tags=[f"t{i}" for i in range(21)]),
            ["thread.title", "thread.tags"],
        ),
    ],
)
async def test_create_thread_validation_writes_nothing(threads, token, thread, fields):
    alice = bearer(token("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.CreateThread(ts.CreateThreadRequest(thread=thread), metadata=alice)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)["fields"] == fields
    listed = await threads.ListThreads(
        ts.ListThreadsRequest(filter=ts.THREAD_FILTER_ALL), metadata=alice
    )
    assert list(listed.threads) == []


async def test_create_thread_is_idempotent_on_client_op_id(threads, token):
    alice = bearer(token("alice"))
    req = ts.CreateThreadRequest(thread=thread_pb2.Thread(title="once"), client_op_id="create-1")
    first = await threads.CreateThread(req, metadata=alice)
    again = await threads.CreateThread(req, metadata=alice)
    assert first.thread.id == again.thread.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await threads.CreateThread(
            ts.CreateThreadRequest(
                thread=thread_pb2.Thread(title="other"), client_op_id="create-1"
            ),
            metadata=alice,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await threads.ListThreads(ts.ListThreadsRequest(), metadata=alice)
    assert len(listed.threads) == 1


async def test_get_me_and_preferences(channel, token):
    users = usg.UserServiceStub(channel)
    me = await users.GetMe(us.GetMeRequest(), metadata=bearer(token("alice", name="Alice A")))
    assert me.user.id == "alice" and me.user.display_name == "Alice A" and not me.online
    stream = RawStream(channel, token("alice", name="Alice A"))
    await stream.hello()
    me = await users.GetMe(us.GetMeRequest(), metadata=bearer(token("alice", name="Alice A")))
    assert me.online
    stream.cancel()
    updated = await users.UpdatePreferences(
        us.UpdatePreferencesRequest(
            preferences=user_pb2.UserPreferences(theme=user_pb2.THEME_DARK, locale="en-GB"),
            update_mask=field_mask_pb2.FieldMask(paths=["theme"]),
        ),
        metadata=bearer(token("alice")),
    )
    assert updated.preferences.theme == user_pb2.THEME_DARK
    assert updated.preferences.locale == "" and updated.preferences.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await users.UpdatePreferences(
            us.UpdatePreferencesRequest(
                preferences=user_pb2.UserPreferences(locale="de"),
                update_mask=field_mask_pb2.FieldMask(paths=["locale"]),
                expected_version=7,
            ),
            metadata=bearer(token("alice")),
        )
    assert err.value.code() == grpc.StatusCode.ABORTED


async def test_every_change_cursor_a_membership_change_takes_has_its_change(
    server, channel, threads, token
):
    """The last member leaving (the thread goes with them) and every member being replaced
    emit no THREAD_UPDATED: they take no cursor for it either. A cursor without its change row
    is a hole each node of a cluster would wait out before reading past it."""
    from sqlalchemy import func, select

    from threadline_server.storage.tables import changes

    _, before = await server.store.current_change_seq()
    alone = await _create(threads, token("alice"), participants=())
    await threads.RemoveParticipants(  # alice leaves her own thread: it is deleted
        ts.RemoveParticipantsRequest(thread_id=alone.id, user_ids=["alice"]),
        metadata=bearer(token("alice")),
    )
    _, after = await server.store.current_change_seq()
    async with server.db.read() as conn:
        rows = (
            await conn.execute(
                select(func.count()).where(
                    changes.c.change_seq > before, changes.c.change_seq <= after
                )
            )
        ).scalar_one()
    assert after > before and rows == after - before
