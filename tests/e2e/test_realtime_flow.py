"""Slow consumers, the grpc-web pair (Subscribe + Submit), typing, and connection caps."""

from __future__ import annotations

import asyncio
import secrets

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from tests.support.rpc import details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline_server.app import ThreadlineServer


@pytest.fixture
async def tuned(settings_factory):
    """A server with a small per-stream queue, short typing TTL and a 2-connection cap."""
    app = ThreadlineServer(
        settings_factory(
            realtime={"queue_max_frames": 20, "typing_ttl_s": 1.0, "max_connections_per_user": 2}
        )
    )
    endpoints = await app.start()
    target = f"127.0.0.1:{endpoints.grpc_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        channel.target_address = target  # type: ignore[attr-defined]
        yield app, channel
    await app.stop(grace=0.5)


async def test_slow_consumer_gets_resync_required_and_never_blocks_others(tuned):
    app, channel = tuned
    thread_id = await create_thread(channel, app.mint("alice", 600), "bob")
    # Bob's stream is opened on its own connection and then not read at all.
    async with grpc.aio.insecure_channel(channel.target_address) as bob_channel:
        outbox: asyncio.Queue[rs.ConnectRequest | None] = asyncio.Queue()

        async def requests():
            while (item := await outbox.get()) is not None:
                yield item

        bob = rsg.RealtimeServiceStub(bob_channel).Connect(
            requests(), metadata=bearer(app.mint("bob", 600))
        )
        outbox.put_nowait(rs.ConnectRequest(frame=rt.ClientFrame(hello=rt.Hello())))
        alice = RawStream(channel, app.mint("alice", 600))
        await alice.hello()
        big = secrets.token_hex(45_000)  # 90 KB that gzip cannot shrink, to fill the windows
        for i in range(150):  # ~13 MB: more than HTTP/2 windows and bob's queue can hold
            result = await asyncio.wait_for(alice.send_message(thread_id, big, f"op-{i}"), 5)
            assert result.WhichOneof("outcome") == "confirmed"  # alice is never held up by bob

        kinds = []
        while True:
            try:
                response = await asyncio.wait_for(bob.read(), 10)
            except grpc.aio.AioRpcError:
                break  # the stream's final status, checked below
            kinds.append(response.frame.WhichOneof("kind"))
        assert kinds[:2] == ["welcome", "sync_complete"]
        assert kinds[-1] == "resync_required"
        assert kinds.count("events") < 150
        assert await bob.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = grpc.aio.AioRpcError(
            await bob.code(), None, await bob.trailing_metadata(), await bob.details()
        )
        assert details(trailers)["reason"] == "SLOW_CONSUMER"
        outbox.put_nowait(None)
        alice.cancel()


async def test_subscribe_and_submit_serve_browsers(tuned):
    app, channel = tuned
    thread_id = await create_thread(channel, app.mint("alice", 600), "bob")
    stub = rsg.RealtimeServiceStub(channel)
    sub = stub.Subscribe(
        rs.SubscribeRequest(hello=rt.Hello()), metadata=bearer(app.mint("bob", 600))
    )
    welcome = (await sub.read()).frame.welcome
    assert (await sub.read()).frame.WhichOneof("kind") == "sync_complete"

    sent = await stub.Submit(
        rs.SubmitRequest(
            frame=rt.ClientFrame(
                request_id="r1",
                send_message=rt.SendMessage(
                    client_op_id="web-1", thread_id=thread_id, text="via submit"
                ),
            )
        ),
        metadata=bearer(app.mint("alice", 600)),
    )
    assert sent.frame.request_id == "r1"
    assert sent.frame.operation_result.confirmed.message.seq == 1
    pushed = (await sub.read()).frame
    assert pushed.events.events[0].message.text == "via submit"

    pong = await stub.Submit(
        rs.SubmitRequest(frame=rt.ClientFrame(ping=rt.Ping()), session_id=welcome.session_id),
        metadata=bearer(app.mint("bob", 600)),
    )
    assert pong.frame.WhichOneof("kind") == "pong"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # another user's session
        await stub.Submit(
            rs.SubmitRequest(frame=rt.ClientFrame(ping=rt.Ping()), session_id=welcome.session_id),
            metadata=bearer(app.mint("carol", 600)),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    sub.cancel()


async def test_typing_expires_on_server_and_clears_on_close(tuned):
    app, channel = tuned
    thread_id = await create_thread(channel, app.mint("alice", 600), "bob")
    alice, bob = (
        RawStream(channel, app.mint("alice", 600)),
        RawStream(channel, app.mint("bob", 600)),
    )
    await alice.hello()
    await bob.hello()
    alice.send(rt.ClientFrame(typing=rt.Typing(thread_id=thread_id, active=True)))
    [start] = await bob.events(1)
    assert start.kind == rt.EVENT_KIND_TYPING and start.typing.active and start.change_seq == 0
    [expired] = await bob.events(1, timeout=3)  # nobody said "stopped": the TTL did
    assert not expired.typing.active and expired.typing.user_id == "alice"

    alice.send(rt.ClientFrame(typing=rt.Typing(thread_id=thread_id, active=True)))
    await bob.events(1)
    alice.cancel()  # the stream closes while typing
    [cleared] = await bob.events(1, timeout=0.9)  # sooner than the TTL
    assert not cleared.typing.active
    bob.cancel()


async def test_connection_cap_closes_the_oldest_stream(tuned):
    app, channel = tuned
    streams = [RawStream(channel, app.mint("alice", 600)) for _ in range(3)]
    for s in streams:
        await s.hello()
    frame = await streams[0].recv()
    assert frame.WhichOneof("kind") == "error" and frame.error.can_resume
    assert await streams[0].status() == grpc.StatusCode.UNAVAILABLE
    for s in streams[1:]:
        ping = s.send(rt.ClientFrame(ping=rt.Ping()))
        assert (await s.reply_to(ping)).WhichOneof("kind") == "pong"
        s.cancel()


async def test_typing_in_an_invisible_thread_is_dropped_and_stream_survives(tuned):
    app, channel = tuned
    thread_id = await create_thread(channel, app.mint("alice", 600), "bob")
    carol, bob = (
        RawStream(channel, app.mint("carol", 600)),
        RawStream(channel, app.mint("bob", 600)),
    )
    await carol.hello()
    await bob.hello()
    carol.send(rt.ClientFrame(typing=rt.Typing(thread_id=thread_id, active=True)))
    await bob.no_event()
    ping = carol.send(rt.ClientFrame(ping=rt.Ping()))
    assert (await carol.reply_to(ping)).WhichOneof("kind") == "pong"
    carol.cancel()
    bob.cancel()


async def test_silent_stream_is_closed_after_idle_timeout_and_hello_is_required_in_time(
    settings_factory,
):
    app = ThreadlineServer(
        settings_factory(realtime={"idle_timeout_s": 1.5, "hello_timeout_s": 1.0})
    )
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            pinging, silent = (RawStream(channel, app.mint(u, 600)) for u in ("alice", "bob"))
            await pinging.hello()
            await silent.hello()
            for _ in range(4):  # 2 s of pings every 0.5 s keep one stream alive
                await asyncio.sleep(0.5)
                await pinging.reply_to(pinging.send(rt.ClientFrame(ping=rt.Ping())))
            frame = await silent.recv(timeout=3)
            assert frame.WhichOneof("kind") == "error" and frame.error.can_resume
            assert await silent.status() == grpc.StatusCode.UNAVAILABLE
            trailers = grpc.aio.AioRpcError(
                await silent.call.code(),
                None,
                await silent.call.trailing_metadata(),
                await silent.call.details(),
            )
            assert details(trailers)["reason"] == "IDLE_TIMEOUT"
            ping = pinging.send(rt.ClientFrame(ping=rt.Ping()))
            assert (await pinging.reply_to(ping)).WhichOneof("kind") == "pong"
            pinging.cancel()

            mute = RawStream(channel, app.mint("carol", 600))  # never sends hello
            assert await mute.status() == grpc.StatusCode.DEADLINE_EXCEEDED
            mute.cancel()
    finally:
        await app.stop(grace=0.5)
