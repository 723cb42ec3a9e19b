"""The browser's protocol (Subscribe + Submit) behaves exactly as Connect: every scenario runs on
both transports (`tests/support/realtime_transports.py`) and asserts the same frames and
statuses. A Submit's own answer is the reply a Connect client would read off its stream: the
answer frame, nothing (empty response) where Connect gets nothing, and for a frame that ends the
session, the status the session ends with.

Timeouts run on clocks the test moves (`app.limits.clock`, `app.realtime.clock` for idle time,
`app.realtime.wall_clock` for token expiry) and the watchdog is run by hand
(`app.realtime.sweep()`), so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_operations_conflict import thread_update
from tests.e2e.test_realtime_delivery import create_thread
from tests.e2e.test_sync_resume import delete_op, edit_op
from tests.support.fake_clock import FakeClock
from tests.support.realtime_transports import (
    SUBSCRIBE,
    TRANSPORTS,
    Realm,
    RealtimeClient,
    Start,
    SubscribeSubmitClient,
    alive,
    assert_ended,
    assert_session_gone,
    kinds,
    ping,
    refresh,
    send,
    ts_,
    until,
)
from tests.support.rpc import status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(params=TRANSPORTS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def realm(kind: str, settings_factory: Callable[..., Any]) -> AsyncIterator[Start]:
    made: list[Realm] = []

    async def start(**sections: dict[str, Any]) -> Realm:
        # Pings uncapped unless a test caps them: they are this suite's "still alive" probe.
        sections.setdefault("realtime", {}).setdefault("max_pings_per_second", 0)
        app = ThreadlineServer(settings_factory(**sections))
        limits = app.limits.clock = FakeClock()
        endpoints = await app.start()
        assert app.realtime is not None
        idle = FakeClock()
        wall = FakeClock(time.time())
        app.realtime.clock, app.realtime.wall_clock = idle, wall
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}")
        realm = Realm(kind, app, channel, limits, idle, wall)
        made.append(realm)
        return realm

    yield start
    for realm in made:
        for opened in realm.opened:
            opened.close() if isinstance(opened, RealtimeClient) else opened.cancel()
        if not realm.stopped:
            await realm.app.stop(grace=0.5)
        await realm.channel.close()


# ---- hello: fresh, resume, resync ------------------------------------------------------------


async def test_fresh_hello_then_live_events_with_own_op_ids(realm: Start) -> None:
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    bob = r.client("bob")
    frames = await bob.open()
    assert kinds(frames) == ["welcome", "sync_complete"]
    welcome, done = frames[0].welcome, frames[1].sync_complete
    assert (welcome.user_id, welcome.resuming, welcome.idle_timeout.seconds) == ("bob", False, 120)
    assert welcome.session_id == bob.session_id and welcome.epoch == done.epoch
    assert not done.was_recovering and not done.recovered and done.change_seq > 0

    alice = r.raw("alice")
    await alice.hello()
    await alice.send_message(thread, "from alice", "a-1")
    [event] = await bob.events(1)
    assert (event.message.text, event.client_op_id, event.change_seq > done.change_seq) == (
        "from alice",
        "",
        True,
    )
    result = (await bob.ask(send(thread, "b-1", "from bob"))).operation_result
    assert result.WhichOneof("outcome") == "confirmed" and result.confirmed.message.seq == 2
    [own] = await bob.events(1)
    assert (own.client_op_id, own.change_seq) == ("b-1", result.change_seq)


async def test_resume_replays_answers_pending_ops_then_recovers(realm: Start) -> None:
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    bob = r.client("bob")
    start = (await bob.open())[-1].sync_complete
    known = (await bob.ask(send(thread, "b-1", "before"))).operation_result
    await bob.events(1)
    bob.close()

    alice = r.raw("alice")
    await alice.hello()
    sent = [(await alice.send_message(thread, f"m{i}", f"a-{i}")).confirmed.message for i in (1, 2)]
    edited = await alice.reply_to(alice.send(edit_op("a-edit", sent[0], "m1 edited", 1)))
    assert edited.operation_result.WhichOneof("outcome") == "confirmed"

    again = r.client("bob")
    state = rt.SyncState(
        epoch=start.epoch, change_seq=start.change_seq, pending_op_ids=["b-1", "b-unknown"]
    )
    frames = await again.open(state)
    assert kinds(frames) == ["welcome", "events", "operation_result", "sync_complete"]
    assert frames[0].welcome.resuming
    replay = frames[1].events
    assert replay.replay
    assert [(e.kind, e.message.text, e.client_op_id) for e in replay.events] == [
        (rt.EVENT_KIND_MESSAGE_CREATED, "before", "b-1"),
        (rt.EVENT_KIND_MESSAGE_CREATED, "m1", ""),  # as it was then: the edit comes later
        (rt.EVENT_KIND_MESSAGE_CREATED, "m2", ""),
        (rt.EVENT_KIND_MESSAGE_UPDATED, "m1 edited", ""),
    ]
    stored = frames[2].operation_result
    assert (stored.client_op_id, stored.replayed, stored.change_seq) == (
        "b-1",
        True,
        known.change_seq,
    )
    assert stored.confirmed.message.id == known.confirmed.message.id  # b-unknown: absent
    done = frames[3].sync_complete
    assert done.was_recovering and done.recovered and done.event_count == 4
    assert done.change_seq == replay.events[-1].change_seq
    await alice.send_message(thread, "live", "a-3")
    [live] = await again.events(1)
    assert live.message.text == "live" and live.change_seq == done.change_seq + 1


@pytest.mark.parametrize(
    ("shift", "reason"),
    [("epoch", rt.RESYNC_REASON_EPOCH_CHANGED), ("ahead", rt.RESYNC_REASON_CURSOR_AHEAD)],
)
async def test_resume_that_cannot_be_exact_gets_resync_required(
    realm: Start, shift: str, reason: int
) -> None:
    r = await realm()
    await create_thread(r.channel, r.mint("alice"), "bob")
    first = r.client("bob")
    start = (await first.open())[-1].sync_complete
    epoch = "another-epoch" if shift == "epoch" else start.epoch
    cursor = start.change_seq + (100 if shift == "ahead" else 0)
    frames = await r.client("bob").open(rt.SyncState(epoch=epoch, change_seq=cursor))
    assert kinds(frames) == ["welcome", "resync_required", "sync_complete"]
    assert frames[1].resync_required.reason == reason
    done = frames[2].sync_complete
    assert (done.was_recovering, done.recovered, done.change_seq) == (
        True,
        False,
        start.change_seq,
    )


# ---- heartbeats and idle time ----------------------------------------------------------------


async def test_ping_gets_pong_and_pings_past_the_cap_get_nothing(realm: Start) -> None:
    r = await realm(realtime={"max_pings_per_second": 2})
    bob = r.client("bob")
    await bob.open()
    first = await bob.ask(rt.ClientFrame(request_id="p1", ping=rt.Ping(client_time=ts_(42))))
    assert (first.request_id, first.pong.client_time.seconds) == ("p1", 42)
    assert first.pong.server_time.seconds > 0
    await alive(bob)
    await bob.tell(ping())  # a burst of one second's worth, then nothing
    dropped = r.app.metrics.registry.get_sample_value
    await until(lambda: dropped("threadline_pings_dropped_total") == 1)
    r.limits.advance(0.5)  # one more ping's worth
    await alive(bob)  # (and on Connect: no Pong came for the dropped one before this one)
    assert dropped("threadline_pings_dropped_total") == 1


async def test_frames_are_activity_and_a_silent_session_ends_on_idle_timeout(realm: Start) -> None:
    r = await realm()
    bob = r.client("bob")
    await bob.open()
    r.idle.advance(100)
    await alive(bob)  # activity at 100
    r.idle.advance(100)
    r.sweep()  # 200 s since the start, 100 since the ping: alive
    await alive(bob)  # activity at 200
    r.idle.advance(121)
    r.sweep()
    assert_ended(await bob.ending(), UNAVAILABLE, "IDLE_TIMEOUT", can_resume=True)
    await assert_session_gone(bob)


# ---- tokens ---------------------------------------------------------------------------------


async def test_refresh_auth_extends_the_session_and_without_it_the_session_ends(
    realm: Start,
) -> None:
    r = await realm()
    refreshed, unrefreshed = r.client("bob", ttl_s=60), r.client("bob", ttl_s=60)
    welcome = (await refreshed.open())[0].welcome
    await unrefreshed.open()
    fresh = r.mint("bob", 600)
    reply = await refreshed.ask(refresh(fresh))
    assert reply.WhichOneof("kind") == "auth_refreshed"
    assert reply.auth_refreshed.token_expire_time.seconds >= welcome.token_expire_time.seconds + 500
    refreshed.token = fresh  # a browser sends its newest token with each call
    r.wall.advance(100)  # past the first token's expiry and the 20 s grace
    r.sweep()
    assert_ended(await unrefreshed.ending(), UNAUTHENTICATED, "TOKEN_EXPIRED", can_resume=False)
    await alive(refreshed)
    r.wall.advance(600)
    r.sweep()
    assert_ended(await refreshed.ending(), UNAUTHENTICATED, "TOKEN_EXPIRED", can_resume=False)


@pytest.mark.parametrize("bad", ["another-user", "garbage", "expired"])
async def test_bad_refresh_auth_ends_the_session(realm: Start, bad: str) -> None:
    r = await realm()
    bob = r.client("bob")
    await bob.open()
    assert r.app.issuer is not None
    token, reason = {
        "another-user": (r.mint("mallory"), "TOKEN_INVALID"),
        "garbage": ("a.b.c", "TOKEN_INVALID"),
        "expired": (r.app.issuer.mint("bob", ttl_s=60, now=time.time() - 3600), "TOKEN_EXPIRED"),
    }[bad]
    answered = await bob.fatal(refresh(token))
    assert answered == ((UNAUTHENTICATED, reason) if bob.kind == SUBSCRIBE else None)
    assert_ended(await bob.ending(), UNAUTHENTICATED, reason, can_resume=False)
    await assert_session_gone(bob)


async def test_refresh_auth_over_its_budget_is_refused_in_band_and_the_session_goes_on(
    realm: Start,
) -> None:
    r = await realm(limits={"refresh_auth_per_minute": 1, "refresh_auth_burst": 1})
    bob = r.client("bob")
    await bob.open()
    assert (await bob.ask(refresh(r.mint("bob")))).WhichOneof("kind") == "auth_refreshed"
    refused = (await bob.ask(refresh(r.mint("bob")))).operation_result
    assert refused.rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status_details(refused.rejected)["retry_after"] == pytest.approx(60)
    await alive(bob)
    r.limits.advance(60)
    assert (await bob.ask(refresh(r.mint("bob")))).WhichOneof("kind") == "auth_refreshed"


@pytest.mark.parametrize("frame", ["hello", "empty"])
async def test_protocol_violation_ends_the_session(realm: Start, frame: str) -> None:
    r = await realm()
    bob = r.client("bob")
    await bob.open()
    bad = rt.ClientFrame(hello=rt.Hello()) if frame == "hello" else rt.ClientFrame()
    answered = await bob.fatal(bad)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert answered == ((invalid, "PROTOCOL_VIOLATION") if bob.kind == SUBSCRIBE else None)
    assert_ended(await bob.ending(), invalid, "PROTOCOL_VIOLATION", can_resume=False)
    await assert_session_gone(bob)


# ---- operations -----------------------------------------------------------------------------


async def test_operations_with_op_ids_versions_merges_and_conflicts(realm: Start) -> None:
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    alice = r.client("alice")
    await alice.open()

    async def result(frame: rt.ClientFrame) -> rt.OperationResult:
        answer: rt.OperationResult = (await alice.ask(frame)).operation_result
        return answer

    sent = await result(send(thread, "s-1", "meet at the old cafe at noon"))
    msg = sent.confirmed.message
    assert (msg.seq, msg.version, sent.replayed) == (1, 1, False)
    again = await result(send(thread, "s-1", "meet at the old cafe at noon"))
    assert (again.replayed, again.confirmed.message.id, again.change_seq) == (
        True,
        msg.id,
        sent.change_seq,
    )
    clash = await result(send(thread, "s-1", "something else"))
    assert clash.rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert status_details(clash.rejected)["reason"] == "IDEMPOTENCY_KEY_REUSED"

    edit = await result(edit_op("e-1", msg, "meet at the new cafe at noon", 1))
    assert edit.confirmed.message.version == 2
    merged = await result(edit_op("e-2", msg, "meet at the old cafe at one", 1))  # from v1
    assert merged.confirmed.message.text == "meet at the new cafe at one"
    conflict = (await result(edit_op("e-3", msg, "meet at the new cafe at two", 2))).conflict
    assert (conflict.server_version, list(conflict.fields)) == (3, ["text"])
    assert conflict.server.message.text == "meet at the new cafe at one"

    renamed = await result(thread_update("t-1", thread, 1, title="Trip"))
    assert renamed.confirmed.thread.version == 2
    title_clash = await result(thread_update("t-2", thread, 1, title="Holiday"))
    assert list(title_clash.conflict.fields) == ["title"]

    deleted = await result(delete_op("d-1", msg))
    assert deleted.confirmed.message.deleted and deleted.confirmed.message.version == 4
    assert (await result(delete_op("d-1", msg))).replayed
    outsider = r.client("carol")
    await outsider.open()
    refused = (await outsider.ask(send(thread, "c-1", "let me in"))).operation_result
    assert refused.rejected.code == grpc.StatusCode.NOT_FOUND.value[0]

    # The author's session saw each applied change once, with its op id, in order.
    events = await alice.events(5)
    assert [(e.kind, e.client_op_id) for e in events] == [
        (rt.EVENT_KIND_MESSAGE_CREATED, "s-1"),
        (rt.EVENT_KIND_MESSAGE_UPDATED, "e-1"),
        (rt.EVENT_KIND_MESSAGE_UPDATED, "e-2"),
        (rt.EVENT_KIND_THREAD_UPDATED, "t-1"),
        (rt.EVENT_KIND_MESSAGE_DELETED, "d-1"),
    ]


async def test_an_operation_resent_on_the_other_transport_is_replayed(realm: Start) -> None:
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    here = r.client("alice")
    there = r.client("alice", kind=TRANSPORTS[1 - TRANSPORTS.index(r.kind)])
    await here.open()
    await there.open()
    first = (await here.ask(send(thread, "x-1", "once"))).operation_result
    second = (await there.ask(send(thread, "x-1", "once"))).operation_result
    assert (second.replayed, second.confirmed.message.id) == (True, first.confirmed.message.id)


async def test_operations_over_the_budget_are_refused_in_band_and_the_session_goes_on(
    realm: Start,
) -> None:
    r = await realm(limits={"operations_per_minute": 2})
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    alice = r.client("alice")
    await alice.open()
    for i in (1, 2):
        ok = (await alice.ask(send(thread, f"s-{i}", "hi"))).operation_result
        assert ok.WhichOneof("outcome") == "confirmed"
    refused = (await alice.ask(send(thread, "s-3", "hi"))).operation_result
    assert refused.rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = status_details(refused.rejected)
    assert (info["reason"], info["retry_after"]) == ("RATE_LIMITED", pytest.approx(30))
    await alive(alice)
    r.limits.advance(30)
    later = (await alice.ask(send(thread, "s-3", "hi"))).operation_result
    assert later.WhichOneof("outcome") == "confirmed" and later.confirmed.message.seq == 3


async def test_operations_sent_back_to_back_keep_their_order(realm: Start) -> None:
    """Pipelined: on Connect frames written at once; on Submit one call per frame, each started
    as soon as the previous one has reached the server. A call whose authentication waits (it writes
    the user) must still not be overtaken by the next one, whose token is known."""
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    alice = r.client("alice")
    await alice.open()
    frames = [send(thread, f"p-{i}", f"#{i}") for i in range(12)]
    # Every other token is new to the users cache (its call writes the user), the rest known.
    tokens = [r.mint("alice", name=f"Alice {i}") if i % 2 == 0 else alice.token for i in range(12)]
    answers = await alice.ask_all(frames, tokens)
    seqs = [a.operation_result.confirmed.message.seq for a in answers]
    assert seqs == list(range(1, 13))


# ---- typing, presence -----------------------------------------------------------------------


async def test_typing_reaches_the_thread_and_invalid_typing_is_dropped(realm: Start) -> None:
    r = await realm(realtime={"typing_ttl_s": 600.0})
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    hidden = await create_thread(r.channel, r.mint("carol"), "dave")
    bob = r.raw("bob")
    await bob.hello()
    alice = r.client("alice")
    await alice.open()
    await alice.tell(rt.ClientFrame(typing=rt.Typing(thread_id=thread, active=True)))
    [typing] = await bob.events(1)
    assert typing.kind == rt.EVENT_KIND_TYPING and typing.typing.user_id == "alice"
    assert typing.typing.active and typing.change_seq == 0
    # A thread alice cannot see: dropped, the session goes on, nothing leaks to anyone.
    await alice.tell(rt.ClientFrame(typing=rt.Typing(thread_id=hidden, active=True)))
    await alice.tell(rt.ClientFrame(ack=rt.Ack(change_seq=1)))
    await alive(alice)
    alice.close()  # her last session closes while typing: cleared at once
    [cleared] = await bob.events(1)
    assert cleared.kind == rt.EVENT_KIND_TYPING and not cleared.typing.active


async def test_presence_of_co_participants_after_sync_complete_and_to_them(realm: Start) -> None:
    r = await realm()
    await create_thread(r.channel, r.mint("alice"), "bob")
    bob = r.raw("bob")
    await bob.hello()
    alice = r.client("alice")
    await alice.open()
    [online] = await alice.events(1, presence=True)
    assert (online.kind, online.presence.user_id, online.presence.online) == (
        rt.EVENT_KIND_PRESENCE,
        "bob",
        True,
    )
    [announced] = await bob.events(1, presence=True)
    assert (announced.presence.user_id, announced.presence.online) == ("alice", True)


# ---- how sessions end -----------------------------------------------------------------------


async def test_slow_consumer_gets_resync_required_then_resource_exhausted(realm: Start) -> None:
    r = await realm(realtime={"queue_max_frames": 20, "typing_ttl_s": 600.0})
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    bob = r.client("bob")
    await bob.open()
    # More events for bob than his queue holds, all in one turn of the server's loop: no write
    # can drain the queue in between, whatever the machine's speed.
    for i in range(30):
        r.app.typing.signal(thread, "alice", i % 2 == 0, ["alice", "bob"])
    ending = await bob.ending()
    assert ending.last is not None and ending.last.WhichOneof("kind") == "resync_required"
    assert ending.last.resync_required.reason == rt.RESYNC_REASON_SLOW_CONSUMER
    assert (ending.code, ending.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SLOW_CONSUMER")
    await assert_session_gone(bob)


async def test_drain_tells_the_session_to_resume_elsewhere(realm: Start) -> None:
    r = await realm()
    bob = r.client("bob")
    await bob.open()
    stopping = asyncio.create_task(r.stop(grace=5.0))
    error = assert_ended(await bob.ending(), UNAVAILABLE, "SERVER_DRAINING", can_resume=True)
    assert error.retry_after.seconds == 1
    await stopping


async def test_a_newer_session_replaces_the_oldest(realm: Start) -> None:
    r = await realm(realtime={"max_connections_per_user": 2})
    oldest = r.client("bob")
    await oldest.open()
    newer = [r.raw("bob"), r.raw("bob")]
    for stream in newer:
        await stream.hello()
    assert_ended(await oldest.ending(), UNAVAILABLE, "REPLACED", can_resume=True)
    await assert_session_gone(oldest)


async def test_frames_after_one_that_ended_the_session_are_not_acted_on(realm: Start) -> None:
    """On Connect a frame written right after a fatal one is read and ignored; on Submit a
    call that arrived after the fatal one (and waited its turn) is NOT_FOUND. Either way the
    operation is not applied: the client resends it by op id after resuming."""
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    alice = r.client("alice")
    await alice.open()
    bad = refresh(r.mint("mallory"))
    if isinstance(alice, SubscribeSubmitClient):
        session = r.app.broker.session(alice.session_id)
        assert session is not None
        fatal = asyncio.create_task(alice.fatal(bad))
        await until(lambda: session.submits.arrived == 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alice.submit(send(thread, "late-1", "late"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert await fatal == (UNAUTHENTICATED, "TOKEN_INVALID")
    else:
        await alice.fatal(bad)
        await alice.fatal(send(thread, "late-1", "late"))
    ending = await alice.ending()
    assert_ended(ending, UNAUTHENTICATED, "TOKEN_INVALID", can_resume=False)
    assert "operation_result" not in kinds(ending.frames)
    assert await _texts(r, thread) == []


# ---- Submit's own cases ---------------------------------------------------------------------


SUBMIT_ONLY = pytest.mark.parametrize("kind", [SUBSCRIBE])


async def _sub(r: Realm, user: str) -> SubscribeSubmitClient:
    session = r.client(user, kind=SUBSCRIBE)
    assert isinstance(session, SubscribeSubmitClient)
    await session.open()
    return session


async def _texts(r: Realm, thread: str) -> list[str]:
    listed = await tsg.ThreadServiceStub(r.channel).ListMessages(
        ts.ListMessagesRequest(thread_id=thread), metadata=bearer(r.mint("alice"))
    )
    return [m.text for m in listed.messages]


@SUBMIT_ONLY
async def test_submit_for_another_users_or_an_unknown_or_ended_session_is_not_found(
    realm: Start,
) -> None:
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    bob = await _sub(r, "bob")
    stub = rsg.RealtimeServiceStub(r.channel)
    for user, session_id in (("alice", bob.session_id), ("bob", "f" * 32)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Submit(
                rs.SubmitRequest(frame=send(thread, "x-1", "not mine"), session_id=session_id),
                metadata=bearer(r.mint(user)),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await alive(bob)  # bob's session is untouched by alice's attempt
    bob.close()
    await until(lambda: r.app.broker.session(bob.session_id) is None)
    await assert_session_gone(bob)
    assert await _texts(r, thread) == []


@SUBMIT_ONLY
async def test_submit_over_the_frame_cap_is_refused_and_the_session_goes_on(realm: Start) -> None:
    """The one difference grpc imposes: an over-size frame ends its own call. On Connect that
    is the stream (test_payload_limits); a Submit is its own call, so the session goes on."""
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    alice = await _sub(r, "alice")
    cap = r.app.settings.server.max_receive_message_bytes
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alice.submit(send(thread, "huge-1", "x" * cap))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await alive(alice)
    assert await _texts(r, thread) == []


@SUBMIT_ONLY
async def test_submit_without_a_session_is_stateless(realm: Start) -> None:
    """Operations and pings need no session; RefreshAuth does (INVALID_ARGUMENT, and nothing
    else ends)."""
    r = await realm()
    thread = await create_thread(r.channel, r.mint("alice"), "bob")
    stub = rsg.RealtimeServiceStub(r.channel)
    meta = bearer(r.mint("alice"))
    sent = await stub.Submit(
        rs.SubmitRequest(frame=send(thread, "n-1", "no session")), metadata=meta
    )
    assert sent.frame.operation_result.confirmed.message.seq == 1
    pong = await stub.Submit(rs.SubmitRequest(frame=ping()), metadata=meta)
    assert pong.frame.WhichOneof("kind") == "pong"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Submit(rs.SubmitRequest(frame=refresh(r.mint("alice"))), metadata=meta)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
