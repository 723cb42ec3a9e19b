"""Acknowledged data survives SIGKILL; SIGTERM drains streams with a reconnect hint."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from tests.conftest import bearer
from tests.support.process import ServerProcess
from tests.support.raw_stream import RawStream
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg


@pytest.fixture
def proc(tmp_path, db_url):
    p = ServerProcess(tmp_path / "data", db_url)
    yield p
    p.stop()


async def test_sigkill_loses_no_acknowledged_message(proc):
    proc.start()
    tok = proc.cli("token", "alice")
    async with grpc.aio.insecure_channel(proc.target) as channel:
        stub = tsg.ThreadServiceStub(channel)
        thread = (
            await stub.CreateThread(
                ts.CreateThreadRequest(
                    thread=thread_pb2.Thread(title="crash", participant_ids=["bob"])
                ),
                metadata=bearer(tok),
            )
        ).thread
        stream = RawStream(channel, tok)
        await stream.hello()
        acked: list[str] = []

        async def sender(n: int) -> None:
            result = await stream.send_message(thread.id, f"m{n}", f"op-{n}")
            if result.WhichOneof("outcome") == "confirmed":
                acked.append(result.confirmed.message.id)

        tasks = [asyncio.create_task(sender(n)) for n in range(200)]
        while len(acked) < 50:
            await asyncio.sleep(0.005)
        proc.kill()  # mid-stream: some sends are acked, others in flight
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        stream.cancel()
    assert len(acked) >= 50

    proc.start()
    async with grpc.aio.insecure_channel(proc.target) as channel:
        stub = tsg.ThreadServiceStub(channel)
        stored, token = [], ""
        while True:
            page = await stub.ListMessages(
                ts.ListMessagesRequest(
                    thread_id=thread.id,
                    direction=ts.ListMessagesRequest.DIRECTION_FORWARD,
                    page_size=200,
                    page_token=token,
                ),
                metadata=bearer(tok),
            )
            stored += list(page.messages)
            token = page.next_page_token
            if not token:
                break
    ids = {m.id for m in stored}
    assert set(acked) <= ids  # every acknowledged message survived
    assert [m.seq for m in stored] == list(range(1, len(stored) + 1))  # and no gaps


async def test_sigterm_tells_streams_to_reconnect(proc):
    proc.start()
    tok = proc.cli("token", "alice")
    async with grpc.aio.insecure_channel(proc.target) as channel:
        stream = RawStream(channel, tok)
        await stream.hello()
        await asyncio.to_thread(proc.terminate)
        frame = await stream.recv(timeout=10)
        assert frame.WhichOneof("kind") == "error"
        assert frame.error.can_resume
        assert await stream.status() == grpc.StatusCode.UNAVAILABLE
        status = await stream.call.trailing_metadata()
        assert status is not None
    assert proc.proc is not None and proc.proc.returncode == 0
