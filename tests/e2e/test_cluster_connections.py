"""The 5-connection cap per user across the cluster (cluster.connections): six streams of one
user spread over three nodes close the oldest, on whichever node it is, with the same REPLACED
error a single node gives; the other five stay live."""

from __future__ import annotations

import asyncio

import grpc
import redis.asyncio as aioredis

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.cluster import SHARED_REDIS, nodes
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import realtime_pb2 as rt


async def test_six_connections_over_three_nodes_close_the_oldest(settings_factory):
    async with nodes(settings_factory, SHARED_REDIS, count=3) as (apps, channels, _clock):
        assert all(app.settings.realtime.max_connections_per_user == 5 for app in apps)
        thread = await create_thread(channels[0], apps[0].mint("alice", 600), "bob")
        key = f"{apps[0].settings.cluster.key_prefix}:conns:alice"
        redis = aioredis.Redis.from_url(SHARED_REDIS)
        streams = []
        for i in range(5):  # one on the first node, two on each of the others
            node = (i + 1) // 2
            stream = RawStream(channels[node], apps[node].mint("alice", 600))
            await stream.hello()
            streams.append(stream)
            # The registry hears of a stream after its Welcome: wait for it, so that the
            # connect order the test means is the order Redis saw.
            for _ in range(400):
                if await redis.zcard(key) == i + 1:
                    break
                await asyncio.sleep(0.01)
            assert await redis.zcard(key) == i + 1
        await redis.aclose()
        oldest = streams[0]
        newest = RawStream(channels[2], apps[2].mint("alice", 600))
        await newest.hello()
        streams.append(newest)
        frame = await oldest.recv(timeout=10)  # on node 0; the sixth connected to node 2
        assert frame.WhichOneof("kind") == "error"
        assert status_details(frame.error.status)["reason"] == "REPLACED"
        assert await oldest.status() == grpc.StatusCode.UNAVAILABLE
        bob = RawStream(channels[1], apps[1].mint("bob", 600))
        await bob.hello()
        await bob.send_message(thread, "still there?", "b-1")
        for stream in streams[1:]:  # the five newest are live on their nodes
            [event] = await stream.events(1, timeout=10)
            assert event.kind == rt.EVENT_KIND_MESSAGE_CREATED
        for stream in (*streams, bob):
            stream.cancel()
