"""`server.event_loop = "uvloop"`: the real server runs on uvloop end to end (streams, a send
delivered, a drain on SIGTERM), since grpc.aio on another loop is measured, not assumed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.process import ServerProcess
from tests.support.raw_stream import RawStream


async def test_the_server_runs_on_uvloop_end_to_end(tmp_path: Path, db_url: str) -> None:
    proc = ServerProcess(tmp_path / "data", db_url, THREADLINE_SERVER__EVENT_LOOP="uvloop")
    proc.start()
    try:
        assert any("threadline: event loop uvloop" in line for line in proc.output), proc.output
        alice, bob = (proc.cli("token", user, "--ttl", "600").strip() for user in ("al", "bo"))
        async with grpc.aio.insecure_channel(proc.target) as channel:
            thread = await create_thread(channel, alice, "bo")
            reader = RawStream(channel, bob)
            await reader.hello()
            writer = RawStream(channel, alice)
            await writer.hello()
            result = await writer.send_message(thread, "over uvloop", "uv-1")
            [event] = await reader.events(1)
            assert event.message.text == "over uvloop"
            assert event.change_seq == result.change_seq
            code = await asyncio.to_thread(proc.terminate)
            assert code == 0
            assert await reader.status() == grpc.StatusCode.UNAVAILABLE  # SERVER_DRAINING
    finally:
        proc.stop()
