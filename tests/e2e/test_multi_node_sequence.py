"""Two server instances on one database: concurrent senders still get gapless sequences."""

from __future__ import annotations

import asyncio

import grpc

from tests.conftest import bearer, make_settings
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer


async def test_two_nodes_share_gapless_thread_sequence(tmp_path, db_url):
    nodes = [ThreadlineServer(make_settings(tmp_path / f"n{i}", db_url)) for i in range(2)]
    for node in nodes:  # one after the other: the first applies the migrations
        await node.start()
    try:
        targets = [f"127.0.0.1:{n.endpoints.grpc_port}" for n in nodes]  # type: ignore[union-attr]
        async with (
            grpc.aio.insecure_channel(targets[0]) as ch0,
            grpc.aio.insecure_channel(targets[1]) as ch1,
        ):
            thread_id = await create_thread(ch0, nodes[0].mint("alice", 600), "bob")
            alice = RawStream(ch0, nodes[0].mint("alice", 600))
            bob = RawStream(ch1, nodes[1].mint("bob", 600))
            await alice.hello()
            await bob.hello()
            per = 40

            async def blast(stream: RawStream, who: str) -> list[int]:
                results = await asyncio.gather(
                    *(stream.send_message(thread_id, f"{who}{n}", f"{who}-{n}") for n in range(per))
                )
                assert all(r.WhichOneof("outcome") == "confirmed" for r in results)
                return [r.confirmed.message.seq for r in results]

            a, b = await asyncio.gather(blast(alice, "a"), blast(bob, "b"))
            assert sorted(a + b) == list(range(1, 2 * per + 1))
            # Alice's op id, sent again through the other node, applies once there too.
            alice_elsewhere = RawStream(ch1, nodes[1].mint("alice", 600))
            await alice_elsewhere.hello()
            again = await alice_elsewhere.send_message(thread_id, "a0", "a-0")
            assert again.replayed and again.confirmed.message.seq == a[0]
            alice_elsewhere.cancel()
            page = await tsg.ThreadServiceStub(ch1).ListMessages(
                ts.ListMessagesRequest(thread_id=thread_id, page_size=200),
                metadata=bearer(nodes[1].mint("bob", 600)),
            )
            assert [m.seq for m in page.messages] == list(range(2 * per, 0, -1))
            alice.cancel()
            bob.cancel()
    finally:
        for node in nodes:
            await node.stop(grace=0.5)
