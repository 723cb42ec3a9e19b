"""Frames from 10 KB up are gzipped on the wire and smaller ones are not (bytes counted by a
loopback proxy between the client and the server); a client that does not accept gzip gets
them plain (a bare HTTP/2 client shows each message's compressed flag)."""

from __future__ import annotations

import gzip

import grpc

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.byte_proxy import ByteCountingProxy
from tests.support.h2_grpc import RawMessage, server_stream
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import thread_service_pb2 as ts


async def _bytes_for_bob(server, token, text: str, channel_options=()) -> tuple[int, str]:
    assert server.endpoints is not None
    proxy = ByteCountingProxy(server.endpoints.grpc_port)
    port = await proxy.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.endpoints.grpc_port}") as direct,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(channel_options)) as via,
        ):
            thread = await create_thread(direct, token("alice"), "bob")
            bob = RawStream(via, token("bob"))
            await bob.hello()
            before = proxy.to_client
            alice = RawStream(direct, token("alice"))
            await alice.hello()
            result = await alice.send_message(thread, text, f"op-{thread}")
            assert result.WhichOneof("outcome") == "confirmed"
            [event] = await bob.events(1)
            used = proxy.to_client - before
            alice.cancel()
            bob.cancel()
            return used, event.message.text
    finally:
        await proxy.stop()


async def test_large_frames_are_compressed_small_ones_are_not(server, token):
    big = "lunch plans " * 5_000  # 60 KB, very compressible
    used, text = await _bytes_for_bob(server, token, big)
    assert text == big
    assert used < len(big) / 5  # gzip on the wire

    small = "lunch plans " * 500  # 6 KB, under the 10 KB threshold
    used_small, text_small = await _bytes_for_bob(server, token, small)
    assert text_small == small
    assert used_small > len(small)  # sent as is


async def _large_frame_as_seen_by(server, token, accept: list[tuple[str, str]]) -> RawMessage:
    """Bob subscribes with a bare HTTP/2 client sending `accept` as its only encoding header;
    alice posts 60 KB; returns the message frame as it came off the wire."""
    assert server.endpoints is not None
    port = server.endpoints.grpc_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        thread = await create_thread(channel, token("alice"), "bob")
        request = rs.SubscribeRequest(hello=rt.Hello()).SerializeToString()
        bob = await server_stream(
            "127.0.0.1",
            port,
            "/threadline.v1.RealtimeService/Subscribe",
            request,
            [("authorization", f"Bearer {token('bob')}"), *accept],
        )
        try:
            for expected in ("welcome", "sync_complete"):
                first = await bob.next_message()
                assert not first.compressed
                assert rs.SubscribeResponse.FromString(first.body).frame.WhichOneof("kind") == (
                    expected
                )
            alice = RawStream(channel, token("alice"))
            await alice.hello()
            big = "lunch plans " * 5_000
            assert (await alice.send_message(thread, big, f"op-{thread}")).WhichOneof(
                "outcome"
            ) == "confirmed"
            alice.cancel()
            while True:
                raw = await bob.next_message()
                if len(raw.body) > 10_240 or raw.compressed:
                    return raw
        finally:
            await bob.close()


async def test_a_client_that_does_not_accept_gzip_gets_plain_frames(server, token):
    plain = await _large_frame_as_seen_by(server, token, [])
    assert not plain.compressed
    frame = rs.SubscribeResponse.FromString(plain.body).frame
    assert frame.events.events[0].message.text == "lunch plans " * 5_000

    # The same bare client, now advertising gzip, gets the frame compressed: the test can tell.
    zipped = await _large_frame_as_seen_by(server, token, [("grpc-accept-encoding", "gzip")])
    assert zipped.compressed
    assert len(zipped.body) < 60_000 / 5
    unzipped = rs.SubscribeResponse.FromString(gzip.decompress(zipped.body)).frame
    assert unzipped.events.events[0].message.text == "lunch plans " * 5_000


async def test_unary_responses_follow_the_same_rule(server, token, channel):
    thread = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    big = "lunch plans " * 5_000
    await alice.send_message(thread, big, "op-unary-big")
    alice.cancel()
    assert server.endpoints is not None
    port = server.endpoints.grpc_port
    auth = ("authorization", f"Bearer {token('alice')}")
    history = ts.ListMessagesRequest(thread_id=thread).SerializeToString()
    seen = {}
    for name, path, request in (
        ("history", "/threadline.v1.ThreadService/ListMessages", history),
        ("me", "/threadline.v1.UserService/GetMe", b""),
    ):
        for accept in ([], [("grpc-accept-encoding", "gzip")]):
            call = await server_stream("127.0.0.1", port, path, request, [auth, *accept])
            seen[name, bool(accept)] = (await call.next_message()).compressed
            await call.close()
    assert seen == {
        ("history", False): False,  # large, but this client takes no gzip
        ("history", True): True,
        ("me", False): False,
        ("me", True): False,  # small: sent plain even though gzip is accepted
    }
