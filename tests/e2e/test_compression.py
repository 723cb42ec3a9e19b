"""Frames from 10 KB up are gzipped on the wire and smaller ones are not (bytes counted by a
loopback proxy between the client and the server)."""

from __future__ import annotations

import grpc

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.byte_proxy import ByteCountingProxy
from tests.support.raw_stream import RawStream


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
