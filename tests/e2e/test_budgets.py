"""Every write RPC and stream operation spends a per-user budget: past it the call is refused
RESOURCE_EXHAUSTED (RATE_LIMITED, RetryInfo with the exact wait, ErrorInfo metadata `budget`)
and nothing is written; another user's budget is untouched; advancing the clock by the wait
lets the call through.

The server runs on a fake clock (`app.limits.clock`): a token refills only when a test advances
it, so no assertion depends on the machine's speed. Budgets are tiny, so the RetryInfo waits
are whole seconds (20 s for 3 a minute, 30 s for 2, 60 s for 1).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select

from tests.conftest import bearer
from tests.support.fake_clock import FakeClock
from tests.support.raw_stream import RawStream
from tests.support.rpc import details, status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_pb2, user_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline.v1 import upload_service_pb2 as up
from threadline.v1 import upload_service_pb2_grpc as upg
from threadline.v1 import user_service_pb2 as us
from threadline.v1 import user_service_pb2_grpc as usg
from threadline_server.app import ThreadlineServer
from threadline_server.storage.uploads import uploads as uploads_table

LIMITS = {
    "operations_per_minute": 0,  # messages are free here: they only set the scene
    "thread_writes_per_minute": 3,
    "thread_writes_burst": 3,
    "participant_changes_per_minute": 2,
    "participant_changes_burst": 2,
    "uploads_per_minute": 2,
    "uploads_burst": 2,
    "read_markers_per_minute": 2,
    "read_markers_burst": 2,
    "typing_per_minute": 2,
    "typing_burst": 2,
    "refresh_auth_per_minute": 1,
    "refresh_auth_burst": 1,
    "preferences_per_minute": 1,
    "preferences_burst": 1,
}


@dataclass
class Budgeted:
    app: ThreadlineServer
    channel: grpc.aio.Channel
    clock: FakeClock

    def meta(self, user: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.app.mint(user, 600))

    def stream(self, user: str, ttl_s: int = 600) -> RawStream:
        return RawStream(self.channel, self.app.mint(user, ttl_s))

    @property
    def threads(self) -> tsg.ThreadServiceStub:
        return tsg.ThreadServiceStub(self.channel)

    def refused(self, budget: str) -> float:
        value = self.app.metrics.registry.get_sample_value(
            "threadline_rate_limited_total", {"budget": budget}
        )
        return value or 0.0


@pytest.fixture
async def budgeted(settings_factory) -> AsyncIterator[Budgeted]:
    # Typing signals outlive any test (no expiry event can arrive mid-test); pings are uncapped.
    settings = settings_factory(
        limits=LIMITS, realtime={"typing_ttl_s": 600.0, "max_pings_per_second": 0}
    )
    app = ThreadlineServer(settings)
    clock = app.limits.clock = FakeClock()
    endpoints = await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
        yield Budgeted(app, channel, clock)
    await app.stop(grace=0.5)


def assert_limited(err: grpc.aio.AioRpcError, budget: str, wait: float) -> None:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    info = details(err)
    assert info["reason"] == "RATE_LIMITED"
    assert info["metadata"] == {"budget": budget}
    assert info["retry_after"] == pytest.approx(wait)


def assert_rejected(result: rt.OperationResult, budget: str, wait: float) -> None:
    assert result.WhichOneof("outcome") == "rejected", result
    assert result.rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = status_details(result.rejected)
    assert info["reason"] == "RATE_LIMITED"
    assert info["metadata"] == {"budget": budget}
    assert info["retry_after"] == pytest.approx(wait)


async def op(stream: RawStream, operation: rt.Operation) -> rt.OperationResult:
    return (
        await stream.reply_to(stream.send(rt.ClientFrame(operation=operation)))
    ).operation_result


async def event_where(stream: RawStream, wanted: Callable[[rt.Event], bool]) -> rt.Event:
    while True:
        [event] = await stream.events(1)
        if wanted(event):
            return event


async def create(b: Budgeted, user: str, title: str, *invited: str) -> thread_pb2.Thread:
    response = await b.threads.CreateThread(
        ts.CreateThreadRequest(thread=thread_pb2.Thread(title=title, participant_ids=invited)),
        metadata=b.meta(user),
    )
    return response.thread


async def test_thread_writes_past_the_budget_write_nothing_and_notify_nobody(budgeted):
    b = budgeted
    bob = b.stream("bob")
    await bob.hello()
    made = [await create(b, "alice", f"t{i}", "bob") for i in range(3)]
    assert [e.thread.id for e in await bob.events(3)] == [t.id for t in made]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(b, "alice", "one too many", "bob")
    assert_limited(err.value, "thread_writes", 20.0)
    # Every other thread write shares the budget, and is refused with it.
    t = made[0]
    refusals = [
        b.threads.UpdateThread(
            ts.UpdateThreadRequest(
                thread=thread_pb2.Thread(id=t.id, title="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=b.meta("alice"),
        ),
        b.threads.ArchiveThread(ts.ArchiveThreadRequest(thread_id=t.id), metadata=b.meta("alice")),
        b.threads.UnarchiveThread(
            ts.UnarchiveThreadRequest(thread_id=t.id), metadata=b.meta("alice")
        ),
        b.threads.DeleteThread(ts.DeleteThreadRequest(thread_id=t.id), metadata=b.meta("alice")),
    ]
    for call in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert_limited(err.value, "thread_writes", 20.0)
    # ...and so does the stream's thread operation: an in-band rejection, the stream goes on.
    alice = b.stream("alice")
    await alice.hello()
    on_stream = await op(
        alice,
        rt.Operation(
            client_op_id="stream-create",
            kind=rt.OPERATION_KIND_CREATE,
            thread=thread_pb2.Thread(title="from the stream", participant_ids=["bob"]),
        ),
    )
    assert_rejected(on_stream, "thread_writes", 20.0)
    assert (await alice.send_message(t.id, "still here", "m-1")).WhichOneof(
        "outcome"
    ) == "confirmed"

    # Nothing was written: bob is in exactly the three threads, the first one untouched.
    listed = await b.threads.ListThreads(ts.ListThreadsRequest(), metadata=b.meta("bob"))
    assert sorted(s.thread.id for s in listed.threads) == sorted(x.id for x in made)
    got = await b.threads.GetThread(ts.GetThreadRequest(thread_id=t.id), metadata=b.meta("bob"))
    assert (got.thread.thread.title, got.thread.thread.archived, got.thread.thread.version) == (
        "t0",
        False,
        1,
    )
    # Carol's budget is her own. Her thread is the next thing bob hears of after alice's
    # message: no event for any refused write came in between.
    carols = await create(b, "carol", "carol's", "bob")
    kinds = [(e.kind, e.thread.id or e.message.text) for e in await bob.events(2)]
    assert kinds == [
        (rt.EVENT_KIND_MESSAGE_CREATED, "still here"),
        (rt.EVENT_KIND_THREAD_CREATED, carols.id),
    ]
    assert b.refused("thread_writes") == 6

    b.clock.advance(20.0)  # one token back: one write, then refused again
    archived = await b.threads.ArchiveThread(
        ts.ArchiveThreadRequest(thread_id=t.id), metadata=b.meta("alice")
    )
    assert archived.thread.archived
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(b, "alice", "one too many", "bob")
    assert_limited(err.value, "thread_writes", 20.0)
    for s in (alice, bob):
        s.cancel()


async def test_participant_changes_past_the_budget_write_nothing(budgeted):
    b = budgeted
    t = await create(b, "alice", "team", "bob")
    dave = b.stream("dave")
    await dave.hello()
    add = ts.AddParticipantsRequest(thread_id=t.id, user_ids=["carol"])
    await b.threads.AddParticipants(add, metadata=b.meta("alice"))
    remove = ts.RemoveParticipantsRequest(thread_id=t.id, user_ids=["carol"])
    await b.threads.RemoveParticipants(remove, metadata=b.meta("alice"))

    add_dave = ts.AddParticipantsRequest(thread_id=t.id, user_ids=["dave"], client_op_id="a-d")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await b.threads.AddParticipants(add_dave, metadata=b.meta("alice"))
    assert_limited(err.value, "participant_changes", 30.0)
    remove_bob = ts.RemoveParticipantsRequest(thread_id=t.id, user_ids=["bob"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await b.threads.RemoveParticipants(remove_bob, metadata=b.meta("alice"))
    assert_limited(err.value, "participant_changes", 30.0)
    got = await b.threads.GetThread(ts.GetThreadRequest(thread_id=t.id), metadata=b.meta("bob"))
    assert list(got.thread.thread.participant_ids) == ["alice", "bob"]

    # Bob, a participant too, spends his own budget: dave's first event is bob's invitation.
    by_bob = ts.AddParticipantsRequest(thread_id=t.id, user_ids=["dave"], client_op_id="b-d")
    await b.threads.AddParticipants(by_bob, metadata=b.meta("bob"))
    [joined] = await dave.events(1)
    assert joined.kind == rt.EVENT_KIND_THREAD_CREATED and joined.thread.id == t.id
    assert list(joined.thread.participant_ids) == ["alice", "bob", "dave"]
    assert b.refused("participant_changes") == 2

    b.clock.advance(30.0)
    await b.threads.RemoveParticipants(remove_bob, metadata=b.meta("alice"))
    dave.cancel()


async def test_uploads_past_the_budget_write_nothing(budgeted):
    b = budgeted
    stub = upg.UploadServiceStub(b.channel)
    data = b"plain text file"

    def declare(name: str) -> up.CreateUploadRequest:
        return up.CreateUploadRequest(
            file_name=name, content_type="text/plain", size_bytes=len(data)
        )

    async def rows(user: str) -> dict[str, str]:
        async with b.app.db.engine.connect() as conn:
            result = await conn.execute(
                select(uploads_table.c.file_name, uploads_table.c.state).where(
                    uploads_table.c.uploader_id == user
                )
            )
            return {row.file_name: row.state for row in result}

    first = await stub.CreateUpload(declare("a.txt"), metadata=b.meta("alice"))
    async with httpx.AsyncClient(timeout=30) as http:
        put = await http.request(
            first.upload_method,
            first.upload_url,
            content=data,
            headers=dict(first.upload_headers),
        )
        assert put.status_code in (200, 201), put.text
    done = await stub.CompleteUpload(
        up.CompleteUploadRequest(upload_id=first.upload.id), metadata=b.meta("alice")
    )
    assert done.upload.state == 2  # ready

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateUpload(declare("b.txt"), metadata=b.meta("alice"))
    assert_limited(err.value, "uploads", 30.0)
    assert await rows("alice") == {"a.txt": "ready"}  # no row for b.txt
    await stub.CreateUpload(declare("bob.txt"), metadata=b.meta("bob"))  # bob's own budget

    b.clock.advance(30.0)
    second = await stub.CreateUpload(declare("b.txt"), metadata=b.meta("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CompleteUpload(
            up.CompleteUploadRequest(upload_id=second.upload.id), metadata=b.meta("alice")
        )
    assert_limited(err.value, "uploads", 30.0)
    assert await rows("alice") == {"a.txt": "ready", "b.txt": "pending"}  # not completed
    assert b.refused("uploads") == 2
    async with b.app.db.engine.connect() as conn:
        total = await conn.scalar(select(func.count()).select_from(uploads_table))
    assert total == 3


async def test_read_markers_past_the_budget_write_nothing(budgeted):
    b = budgeted
    t = await create(b, "alice", "reading", "bob")
    bob = b.stream("bob")
    await bob.hello()
    for i in range(3):
        assert (await bob.send_message(t.id, f"m{i}", f"m-{i}")).WhichOneof(
            "outcome"
        ) == "confirmed"
    alice = b.stream("alice")
    await alice.hello()

    def marker(op_id: str, seq: int) -> rt.Operation:
        return rt.Operation(
            client_op_id=op_id,
            kind=rt.OPERATION_KIND_UPDATE,
            read_marker=thread_pb2.ReadMarker(thread_id=t.id, read_seq=seq),
        )

    await b.threads.MarkRead(
        ts.MarkReadRequest(thread_id=t.id, read_seq=1), metadata=b.meta("alice")
    )
    assert (await op(alice, marker("r-2", 2))).WhichOneof("outcome") == "confirmed"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await b.threads.MarkRead(
            ts.MarkReadRequest(thread_id=t.id, read_seq=3), metadata=b.meta("alice")
        )
    assert_limited(err.value, "read_markers", 30.0)
    assert_rejected(await op(alice, marker("r-3", 3)), "read_markers", 30.0)
    got = await b.threads.GetThread(ts.GetThreadRequest(thread_id=t.id), metadata=b.meta("alice"))
    assert (got.thread.read_seq, got.thread.unread_count) == (2, 1)
    # Bob's markers are his own budget.
    await b.threads.MarkRead(ts.MarkReadRequest(thread_id=t.id, read_seq=3), metadata=b.meta("bob"))
    assert b.refused("read_markers") == 2

    b.clock.advance(30.0)
    assert (await op(alice, marker("r-3", 3))).WhichOneof("outcome") == "confirmed"
    for s in (alice, bob):
        s.cancel()


async def test_typing_past_the_budget_is_dropped_silently_and_counted(budgeted):
    b = budgeted
    t = await create(b, "alice", "chat", "bob")
    alice, bob = b.stream("alice"), b.stream("bob")
    await alice.hello()
    await bob.hello()
    for _ in range(5):
        alice.send(rt.ClientFrame(typing=rt.Typing(thread_id=t.id, active=True)))
    # The message is read after the five typing frames: when its result is back, all five
    # have been handled (two signalled, three dropped) and the stream is alive.
    assert (await alice.send_message(t.id, "typed", "m-1")).WhichOneof("outcome") == "confirmed"
    events = await bob.events(3)
    assert [e.kind for e in events] == [rt.EVENT_KIND_TYPING] * 2 + [rt.EVENT_KIND_MESSAGE_CREATED]
    assert b.refused("typing") == 3
    # Bob types on his own budget.
    bob.send(rt.ClientFrame(typing=rt.Typing(thread_id=t.id, active=True)))
    seen = await event_where(alice, lambda e: e.kind == rt.EVENT_KIND_TYPING)
    while seen.typing.user_id != "bob":  # alice may be shown her own signals first
        seen = await event_where(alice, lambda e: e.kind == rt.EVENT_KIND_TYPING)
    assert seen.typing.active

    b.clock.advance(30.0)
    alice.send(rt.ClientFrame(typing=rt.Typing(thread_id=t.id, active=False)))
    stopped = await event_where(bob, lambda e: e.typing.user_id == "alice")  # not his own
    assert stopped.kind == rt.EVENT_KIND_TYPING and not stopped.typing.active
    for s in (alice, bob):
        s.cancel()


async def test_refresh_auth_past_the_budget_is_answered_in_band(budgeted):
    b = budgeted
    alice = b.stream("alice", ttl_s=300)
    welcome = await alice.hello()
    session = b.app.broker.session(welcome.session_id)
    assert session is not None

    def refresh(ttl_s: int) -> str:
        return alice.send(
            rt.ClientFrame(refresh_auth=rt.RefreshAuth(token=b.app.mint("alice", ttl_s)))
        )

    first = await alice.reply_to(refresh(400))
    assert first.WhichOneof("kind") == "auth_refreshed"
    expiry = session.principal.expires_at
    second = await alice.reply_to(refresh(500))
    assert second.WhichOneof("kind") == "operation_result"  # not a StreamError
    assert_rejected(second.operation_result, "refresh_auth", 60.0)
    assert session.principal.expires_at == expiry  # the stream keeps the token it had
    t = await create(b, "alice", "still open")
    assert (await alice.send_message(t.id, "alive", "m-1")).WhichOneof("outcome") == "confirmed"
    bob = b.stream("bob")
    await bob.hello()
    theirs = bob.send(rt.ClientFrame(refresh_auth=rt.RefreshAuth(token=b.app.mint("bob", 400))))
    assert (await bob.reply_to(theirs)).WhichOneof("kind") == "auth_refreshed"
    assert b.refused("refresh_auth") == 1

    b.clock.advance(60.0)
    third = await alice.reply_to(refresh(500))
    assert third.WhichOneof("kind") == "auth_refreshed"
    assert session.principal.expires_at > expiry
    for s in (alice, bob):
        s.cancel()


async def test_update_preferences_past_the_budget_writes_nothing(budgeted):
    b = budgeted
    users = usg.UserServiceStub(b.channel)

    def update(**fields: object) -> us.UpdatePreferencesRequest:
        return us.UpdatePreferencesRequest(
            preferences=user_pb2.UserPreferences(**fields),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        )

    await users.UpdatePreferences(update(theme=user_pb2.THEME_DARK), metadata=b.meta("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await users.UpdatePreferences(update(locale="de"), metadata=b.meta("alice"))
    assert_limited(err.value, "preferences", 60.0)
    me = await users.GetMe(us.GetMeRequest(), metadata=b.meta("alice"))
    assert (me.preferences.theme, me.preferences.locale) == (user_pb2.THEME_DARK, "")
    assert me.preferences.version == 1
    await users.UpdatePreferences(update(locale="fr"), metadata=b.meta("bob"))

    b.clock.advance(60.0)
    again = await users.UpdatePreferences(update(locale="de"), metadata=b.meta("alice"))
    assert again.preferences.locale == "de"
    assert b.refused("preferences") == 1
