"""Presence goes to thread co-participants only, with a grace period against reconnect flicker;
operators list live connections and index use through AdminService (admins only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from tests.support.rpc import details
from threadline.v1 import admin_service_pb2 as adm
from threadline.v1 import admin_service_pb2_grpc as admg
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as ts_grpc
from threadline_client.session import ThreadlineSession
from threadline_server.app import ThreadlineServer
from threadline_server.domain import paging

GRACE = 0.3


@pytest.fixture
async def app(settings_factory) -> AsyncIterator[ThreadlineServer]:
    server = ThreadlineServer(
        settings_factory(realtime={"presence_grace_s": GRACE}, auth={"admin_users": ["ops"]})
    )
    await server.start()
    yield server
    await server.stop(grace=0.5)


@pytest.fixture
async def chan(app: ThreadlineServer) -> AsyncIterator[grpc.aio.Channel]:
    assert app.endpoints is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as channel:
        yield channel


async def presence(stream: RawStream, timeout: float = 5.0) -> list[tuple[str, bool]]:
    """The next frame's presence events as (user, online)."""
    events = await stream.events(1, timeout, presence=True)
    assert all(e.kind == rt.EVENT_KIND_PRESENCE and e.change_seq == 0 for e in events), events
    return [(e.presence.user_id, e.presence.online) for e in events]


async def presence_of(stream: RawStream, count: int = 1) -> list[tuple[str, bool]]:
    """The next `count` presence events as (user, online), past the thread events beside them."""
    found: list[tuple[str, bool]] = []
    while len(found) < count:
        events = await stream.events(1, 5.0, presence=True)
        found.extend(
            (e.presence.user_id, e.presence.online)
            for e in events
            if e.kind == rt.EVENT_KIND_PRESENCE
        )
    return found


async def test_presence_reaches_co_participants_only_and_survives_quick_reconnects(app, chan):
    await create_thread(chan, app.mint("alice", 600), "bob")
    alice = RawStream(chan, app.mint("alice", 600))
    await alice.hello()

    bob = RawStream(chan, app.mint("bob", 600))
    await bob.hello()
    assert await presence(alice) == [("bob", True)]
    assert await presence(bob) == [("alice", True)]  # the snapshot after SyncComplete

    carol = RawStream(chan, app.mint("carol", 600))  # shares no thread with anyone
    await carol.hello()
    await carol.no_event(0.3, presence=True)
    await alice.no_event(0.3, presence=True)

    # A reconnect within the grace period (a blip, or a new connection replacing the old one)
    # shows nothing to alice.
    bob.cancel()
    bob = RawStream(chan, app.mint("bob", 600))
    await bob.hello()
    assert await presence(bob) == [("alice", True)]
    await alice.no_event(GRACE + 0.3, presence=True)

    bob.cancel()
    [event] = await alice.events(1, timeout=GRACE + 3, presence=True)
    assert (event.presence.user_id, event.presence.online) == ("bob", False)
    assert event.presence.last_active_time.seconds > 0
    for s in (alice, carol):
        s.cancel()


async def test_people_who_come_to_share_a_thread_learn_each_others_presence_at_once(app, chan):
    alice = RawStream(chan, app.mint("alice", 600))
    await alice.hello()
    bob = RawStream(chan, app.mint("bob", 600))
    await bob.hello()
    carol = RawStream(chan, app.mint("carol", 600))
    await carol.hello()
    await alice.no_event(0.3, presence=True)  # no shared thread yet: nothing to tell

    # Created with bob: both learn the other is online (not at their next reconnect).
    thread_id = await create_thread(chan, app.mint("alice", 600), "bob")
    assert await presence_of(alice) == [("bob", True)]
    assert await presence_of(bob) == [("alice", True)]

    # carol added later: she learns both, and both learn her.
    add = ts.AddParticipantsRequest(thread_id=thread_id, user_ids=["carol"])
    await ts_grpc.ThreadServiceStub(chan).AddParticipants(
        add, metadata=bearer(app.mint("alice", 600))
    )
    assert sorted(await presence_of(carol, 2)) == [("alice", True), ("bob", True)]
    assert await presence_of(alice) == [("carol", True)]
    assert await presence_of(bob) == [("carol", True)]
    for s in (alice, bob, carol):
        s.cancel()


async def test_sdk_state_tracks_who_is_online(app, chan):
    await create_thread(chan, app.mint("alice", 600), "bob")
    target = f"127.0.0.1:{app.endpoints.grpc_port}"
    session = await ThreadlineSession.connect(target, lambda: app.mint("alice", 600))
    try:
        bob = RawStream(chan, app.mint("bob", 600))
        await bob.hello()
        await session.wait_until(lambda s: s.ui.online == {"bob"})
        bob.cancel()
        await session.wait_until(lambda s: not s.ui.online, timeout=GRACE + 5)
    finally:
        await session.close()


async def test_operators_list_connections_and_index_use(app, chan, db_url):
    alice = RawStream(chan, app.mint("alice", 600))
    await alice.hello()
    bob_phone = RawStream(chan, app.mint("bob", 600))
    await bob_phone.hello()
    admin = admg.AdminServiceStub(chan)

    listed = await admin.ListConnections(
        adm.ListConnectionsRequest(), metadata=bearer(app.mint("ops", 600))
    )
    assert sorted(c.user_id for c in listed.connections) == ["alice", "bob"]
    assert listed.users_online == 2
    conn = next(c for c in listed.connections if c.user_id == "alice")
    assert conn.kind == adm.STREAM_KIND_CONNECT and conn.client_name == "tests"
    assert conn.peer and conn.session_id and conn.open_time.seconds > 0
    assert conn.last_activity_time.ToDatetime() >= conn.open_time.ToDatetime()
    only_bob = await admin.ListConnections(
        adm.ListConnectionsRequest(user_id="bob"), metadata=bearer(app.mint("ops", 600))
    )
    assert [c.user_id for c in only_bob.connections] == ["bob"]

    for caller in ("alice", None):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.ListConnections(
                adm.ListConnectionsRequest(),
                metadata=bearer(app.mint(caller, 600)) if caller else (),
            )
        expected = grpc.StatusCode.PERMISSION_DENIED if caller else grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.code() == expected

    await create_thread(chan, app.mint("alice", 600), "bob")  # some index use
    usage = await admin.GetIndexUsage(
        adm.GetIndexUsageRequest(), metadata=bearer(app.mint("ops", 600))
    )
    if db_url.startswith("postgresql"):
        assert usage.backend == "postgresql"
        names = {i.index for i in usage.indexes}
        assert "ix_thread_members_user" in names
        assert sum(i.scans for i in usage.indexes) > 0
    else:
        assert usage.backend == "sqlite" and list(usage.indexes) == []
    for s in (alice, bob_phone):
        s.cancel()
    await asyncio.sleep(0)


async def test_connections_page_in_order_without_repeats(app, chan):
    streams = [RawStream(chan, app.mint(f"user{i}", 600)) for i in range(5)]
    for s in streams:
        await s.hello()
    admin = admg.AdminServiceStub(chan)
    ops = bearer(app.mint("ops", 600))
    seen: list[str] = []
    page_token, pages = "", 0
    while True:
        page = await admin.ListConnections(
            adm.ListConnectionsRequest(page_size=2, page_token=page_token), metadata=ops
        )
        pages += 1
        assert 1 <= len(page.connections) <= 2 and page.users_online == 5
        seen.extend(c.session_id for c in page.connections)
        page_token = page.next_page_token
        if not page_token:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 5
    everything = await admin.ListConnections(adm.ListConnectionsRequest(), metadata=ops)
    assert [c.session_id for c in everything.connections] == seen  # oldest first, both ways

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await admin.ListConnections(
            # a token issued for the unfiltered listing is refused for a filtered one
            adm.ListConnectionsRequest(
                user_id="user1", page_token=paging.encode({"t": 0.0, "s": ""}, {"user": ""})
            ),
            metadata=ops,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(bad.value)["fields"] == ["page_token"]
    for s in streams:
        s.cancel()
    await asyncio.sleep(0)
