"""Delivery across the nodes of a cluster (cluster.delivery): a message committed on one node
reaches every participant's streams on every node, once and in thread order, non-participants
never; with Redis down the nodes deliver by reading the changes table, and return to Redis
when it is back. A client may resume on another node.

Real nodes (ThreadlineServer) share the test database and a real Redis: the machine's under a
key prefix of the test's own, or a redis-server the test stops and restarts.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.e2e.test_sync_resume import resume
from tests.support.cluster import SHARED_REDIS, OwnRedis, metric, nodes
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg


async def texts(stream: RawStream, count: int) -> list[tuple[int, str]]:
    """The next `count` message events, as (thread seq, text)."""
    return [(e.thread_seq, e.message.text) for e in await stream.events(count, timeout=10)]


async def test_a_message_reaches_participants_on_the_other_node_once_in_order(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS) as (apps, channels, _clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
        alice = RawStream(channels[0], a.mint("alice", 600))
        bob = RawStream(channels[1], b.mint("bob", 600))
        carol = RawStream(channels[1], b.mint("carol", 600))  # not a participant, on b
        for stream in (alice, bob, carol):
            await stream.hello()
        for i in range(20):
            sent = await alice.send_message(thread, f"m{i}", f"op-{i}")
            assert sent.WhichOneof("outcome") == "confirmed"
        assert await texts(bob, 20) == [(i + 1, f"m{i}") for i in range(20)]
        await bob.no_event(0.3)  # once: nothing more
        await carol.no_event(0.3)
        reply = await bob.send_message(thread, "hi alice", "b-1")
        assert reply.confirmed.message.seq == 21
        own = await alice.events(21, timeout=10)  # her 20 echoes, then bob's
        assert [e.thread_seq for e in own] == list(range(1, 22))
        assert own[-1].message.text == "hi alice" and own[-1].client_op_id == ""
        assert metric(b, "threadline_cluster_remote_events_total") >= 20  # through Redis
        assert metric(a, "threadline_cluster_remote_events_total") >= 1
        for stream in (alice, bob, carol):
            stream.cancel()


async def test_concurrent_senders_on_two_nodes_reach_every_stream_in_order(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS) as (apps, channels, _clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob", "dave")
        alice = RawStream(channels[0], a.mint("alice", 600))
        bob = RawStream(channels[1], b.mint("bob", 600))
        dave_a = RawStream(channels[0], a.mint("dave", 600))  # one user, a stream on each node
        dave_b = RawStream(channels[1], b.mint("dave", 600))
        for stream in (alice, bob, dave_a, dave_b):
            await stream.hello()

        async def burst(stream: RawStream, who: str) -> None:
            results = await asyncio.gather(
                *(stream.send_message(thread, f"{who}{i}", f"{who}-{i}") for i in range(30))
            )
            assert all(r.WhichOneof("outcome") == "confirmed" for r in results)

        await asyncio.gather(burst(alice, "a"), burst(bob, "b"))
        for stream in (dave_a, dave_b, alice, bob):
            got = await texts(stream, 60)
            assert [seq for seq, _ in got] == list(range(1, 61))  # every one, once, in order
            assert sorted(t for _, t in got) == sorted(
                [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]
            )
            await stream.no_event(0.2)
        for stream in (alice, bob, dave_a, dave_b):
            stream.cancel()


async def test_a_client_resumes_on_another_node(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS) as (apps, channels, _clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
        alice = RawStream(channels[0], a.mint("alice", 600))
        bob = RawStream(channels[1], b.mint("bob", 600))
        await alice.hello()
        welcome = await bob.hello()
        await alice.send_message(thread, "before", "op-0")
        [first] = await bob.events(1)
        bob.cancel()  # bob's node is gone for him; alice goes on
        for i in range(3):
            await alice.send_message(thread, f"while away {i}", f"op-{i + 1}")
        again = RawStream(channels[0], a.mint("bob", 600))  # to the other node
        frames, done = await resume(
            again, rt.SyncState(epoch=welcome.epoch, change_seq=first.change_seq)
        )
        missed = [e.message.text for f in frames for e in f.events.events]
        assert missed == [f"while away {i}" for i in range(3)]
        assert done.sync_complete.event_count == 3
        await alice.send_message(thread, "live again", "op-live")
        assert await texts(again, 1) == [(5, "live again")]
        for stream in (alice, again):
            stream.cancel()


async def test_delivery_goes_on_by_the_changes_table_while_redis_is_down(settings_factory):
    server = OwnRedis()
    await server.start()
    try:
        async with nodes(settings_factory, server.url, tail_interval_s=0.05) as (
            apps,
            channels,
            _clock,
        ):
            a, b = apps
            thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
            alice = RawStream(channels[0], a.mint("alice", 600))
            bob = RawStream(channels[1], b.mint("bob", 600))
            await alice.hello()
            await bob.hello()
            await alice.send_message(thread, "up", "op-up")
            assert await texts(bob, 1) == [(1, "up")]
            await server.stop()
            for i in range(5):
                await alice.send_message(thread, f"down {i}", f"op-down-{i}")
            assert await texts(bob, 5) == [(i + 2, f"down {i}") for i in range(5)]
            assert metric(b, "threadline_redis_up", {"what": "delivery"}) == 0
            assert metric(b, "threadline_cluster_repaired_events_total") >= 5  # from the table
            await server.start()
            for _ in range(200):  # the listener subscribes again within redis_retry_s
                if metric(b, "threadline_redis_up", {"what": "delivery"}) == 1:
                    break
                await asyncio.sleep(0.05)
            assert metric(b, "threadline_redis_up", {"what": "delivery"}) == 1
            await alice.send_message(thread, "back", "op-back")
            assert await texts(bob, 1) == [(7, "back")]
            await bob.no_event(0.2)
            for stream in (alice, bob):
                stream.cancel()
    finally:
        await server.stop()


async def test_a_participant_removed_on_one_node_is_cut_off_on_the_other(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS) as (apps, channels, _clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob", "carol")
        alice = RawStream(channels[0], a.mint("alice", 600))
        carol = RawStream(channels[1], b.mint("carol", 600))
        await alice.hello()
        await carol.hello()
        await alice.send_message(thread, "for all", "op-0")
        assert await texts(carol, 1) == [(1, "for all")]
        history = tsg.ThreadServiceStub(channels[1])
        request = ts.ListMessagesRequest(thread_id=thread, page_size=10)
        await history.ListMessages(request, metadata=bearer(b.mint("carol", 600)))  # cached on b
        await tsg.ThreadServiceStub(channels[0]).RemoveParticipants(
            ts.RemoveParticipantsRequest(thread_id=thread, user_ids=["carol"]),
            metadata=bearer(a.mint("alice", 600)),
        )
        [removed] = await carol.events(1, timeout=10)  # hers alone, read from the table by b
        assert (removed.kind, removed.thread_id) == (rt.EVENT_KIND_THREAD_REMOVED, thread)
        await alice.send_message(thread, "without carol", "op-1")
        await carol.no_event(0.3)  # node b checks membership itself
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await history.ListMessages(request, metadata=bearer(b.mint("carol", 600)))
        assert denied.value.code() == grpc.StatusCode.NOT_FOUND
        for stream in (alice, carol):
            stream.cancel()


async def test_typing_reaches_participants_on_the_other_node(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS) as (apps, channels, _clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
        alice = RawStream(channels[0], a.mint("alice", 600))
        bob = RawStream(channels[1], b.mint("bob", 600))
        carol = RawStream(channels[1], b.mint("carol", 600))  # not a participant, on b
        for stream in (alice, bob, carol):
            await stream.hello()
        for active in (True, False):
            alice.send(rt.ClientFrame(typing=rt.Typing(thread_id=thread, active=active)))
            [typing] = await bob.events(1)
            assert typing.kind == rt.EVENT_KIND_TYPING
            assert (typing.typing.user_id, typing.typing.active) == ("alice", active)
        await carol.no_event(0.3)
        for stream in (alice, bob, carol):
            stream.cancel()


async def test_an_event_lost_on_the_way_is_repaired_from_the_changes_table(settings_factory):
    """As if node a died between COMMIT and PUBLISH, twice: once with a later event behind the
    lost one (node b sees the gap), once as the last event (b's periodic read finds it)."""
    async with nodes(settings_factory, SHARED_REDIS, safety_poll_s=0.2) as (apps, channels, _c):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
        alice = RawStream(channels[0], a.mint("alice", 600))
        bob = RawStream(channels[1], b.mint("bob", 600))
        await alice.hello()
        await bob.hello()
        assert a.cluster is not None
        delivery = a.cluster.delivery
        publish = delivery._queue
        dropped: list[object] = []
        delivery._queue = dropped.append  # type: ignore[method-assign]
        await alice.send_message(thread, "lost", "op-lost")
        delivery._queue = publish  # type: ignore[method-assign]
        await alice.send_message(thread, "after it", "op-after")
        assert await texts(bob, 2) == [(1, "lost"), (2, "after it")]  # in order, once
        delivery._queue = dropped.append  # type: ignore[method-assign]
        await alice.send_message(thread, "lost last", "op-last")
        assert await texts(bob, 1) == [(3, "lost last")]
        await bob.no_event(0.3)
        assert len(dropped) == 2
        assert metric(b, "threadline_cluster_repaired_events_total") == 2
        for stream in (alice, bob):
            stream.cancel()


async def test_an_event_the_node_cannot_address_is_read_again_from_the_table(settings_factory):
    """Node b fails to read the thread's members for an event that arrived (a database blip):
    the event is not skipped but read again from the changes table, and delivered."""
    async with nodes(settings_factory, SHARED_REDIS) as (apps, channels, _clock):
        a, b = apps
        thread = await create_thread(channels[0], a.mint("alice", 600), "bob")
        alice = RawStream(channels[0], a.mint("alice", 600))
        bob = RawStream(channels[1], b.mint("bob", 600))
        await alice.hello()
        await bob.hello()
        members = b.store.thread_members
        failures: list[str] = []

        async def blip(thread_id: str) -> frozenset[str]:
            if not failures:
                failures.append(thread_id)
                raise ConnectionError("database blip")
            return await members(thread_id)

        b.store.thread_members = blip  # type: ignore[method-assign]
        await alice.send_message(thread, "through the blip", "op-1")
        assert await texts(bob, 1) == [(1, "through the blip")]
        assert failures == [thread]
        assert metric(b, "threadline_cluster_repaired_events_total") == 1
        await bob.no_event(0.3)
        for stream in (alice, bob):
            stream.cancel()
