"""Several real Threadline nodes sharing one database and one Redis, for the cluster tests, and
a redis-server of a test's own that it can stop and restart."""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from tests.support.fake_clock import FakeClock
from threadline_server.app import ThreadlineServer
from threadline_server.config import Settings

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@asynccontextmanager
async def nodes(
    settings_factory: Callable[..., Settings],
    redis_url: str,
    count: int = 2,
    limits: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    **cluster_settings: Any,
) -> AsyncIterator[tuple[list[ThreadlineServer], list[grpc.aio.Channel], FakeClock]]:
    """`count` nodes under a key prefix of their own, their limits on one fake clock."""
    cluster = {
        "redis_url": redis_url,
        "key_prefix": f"test-{uuid.uuid4().hex}",
        "redis_timeout_s": 0.5,
        "redis_retry_s": 0.01,
        **cluster_settings,
    }
    clock = FakeClock()
    apps: list[ThreadlineServer] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for _ in range(count):
            app = ThreadlineServer(
                settings_factory(limits=limits or {}, cluster=cluster, auth=auth or {})
            )
            app.limits.clock = clock
            endpoints = await app.start()
            apps.append(app)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}"))
        yield apps, channels, clock
    finally:
        for channel in channels:
            await channel.close()
        for app in apps:
            await app.stop(grace=0.5)


def metric(app: ThreadlineServer, name: str, labels: dict[str, str] | None = None) -> float:
    return app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server of this test's own, on a fixed port, that the test stops and restarts."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no"),
            stdout=asyncio.subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    return
                except (aioredis.ConnectionError, OSError):
                    await asyncio.sleep(0.05)
            pytest.fail("redis-server did not start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
            self.proc = None
