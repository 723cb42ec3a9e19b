"""Ping frames are capped per stream (`realtime.max_pings_per_second`): the excess is ignored
(no Pong), counted in /metrics as threadline_pings_dropped_total, and costs no send budget.

The server's limits run on a fake clock, so "per second" means per second of that clock: the
cap holds however long the machine takes to handle the pings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx

from tests.conftest import bearer
from tests.e2e.test_metrics import sample
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.fake_clock import FakeClock
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline_server.app import ThreadlineServer


class Frames:
    """A Connect stream read in order by the test itself (no reader task), so "every frame
    before this one" is exact."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._out: asyncio.Queue[rt.ClientFrame] = asyncio.Queue()
        self.call = rsg.RealtimeServiceStub(channel).Connect(
            self._requests(), metadata=bearer(token)
        )

    async def _requests(self) -> AsyncIterator[rs.ConnectRequest]:
        while True:
            yield rs.ConnectRequest(frame=await self._out.get())

    def send(self, frame: rt.ClientFrame) -> None:
        self._out.put_nowait(frame)

    async def read(self) -> rt.ServerFrame:
        async with asyncio.timeout(10):
            response = await self.call.read()
        assert isinstance(response, rs.ConnectResponse), response
        return response.frame

    async def until(self, kind: str) -> tuple[rt.ServerFrame, list[rt.ServerFrame]]:
        """The next frame of `kind`, and every frame before it."""
        before: list[rt.ServerFrame] = []
        while (frame := await self.read()).WhichOneof("kind") != kind:
            before.append(frame)
        return frame, before

    async def hello(self) -> rt.Welcome:
        self.send(rt.ClientFrame(request_id="hello", hello=rt.Hello()))
        welcome, _ = await self.until("welcome")
        await self.until("sync_complete")
        return welcome.welcome


def pings(n: int, prefix: str) -> list[rt.ClientFrame]:
    return [rt.ClientFrame(request_id=f"{prefix}{i}", ping=rt.Ping()) for i in range(n)]


def send(thread_id: str, op_id: str) -> rt.ClientFrame:
    return rt.ClientFrame(
        request_id=op_id,
        send_message=rt.SendMessage(client_op_id=op_id, thread_id=thread_id, text=op_id),
    )


async def test_pings_past_the_cap_get_no_pong_are_counted_and_cost_no_send_budget(
    settings_factory,
):
    app = ThreadlineServer(
        settings_factory(
            realtime={"max_pings_per_second": 2},
            limits={"operations_per_minute": 3},  # a ping charged to it would use it up
        )
    )
    clock = app.limits.clock = FakeClock()
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            alice = Frames(channel, app.mint("alice", 600))
            await alice.hello()
            for frame in [*pings(50, "p"), send(thread, "after-pings")]:
                alice.send(frame)
            # Pings are handled in order before the send is even read, and each Pong is queued
            # as its ping is handled: every Pong there will be comes before the send's result.
            result, before = await alice.until("operation_result")
            assert result.operation_result.WhichOneof("outcome") == "confirmed"
            pongs = [f.request_id for f in before if f.WhichOneof("kind") == "pong"]
            assert pongs == ["p0", "p1"]  # a burst of one second's worth, then nothing
            for i in (1, 2):  # the whole send budget is still there
                alice.send(send(thread, f"more-{i}"))
                more, _ = await alice.until("operation_result")
                assert more.operation_result.WhichOneof("outcome") == "confirmed"

            async with httpx.AsyncClient() as http:
                page = (await http.get(f"http://127.0.0.1:{endpoints.http_port}/metrics")).text
            assert sample(page, "threadline_pings_dropped_total") == 48
            assert app.metrics.registry.get_sample_value(
                "threadline_rate_limited_total", {"budget": "messages"}
            ) in (None, 0.0)

            clock.advance(0.5)  # one more ping's worth
            for frame in [*pings(3, "q"), send(thread, "x")]:
                alice.send(frame)
            # The send was refused (budget used up by three sends, not by 53 pings)...
            refused, before = await alice.until("operation_result")
            assert refused.operation_result.WhichOneof("outcome") == "rejected"
            assert [f.request_id for f in before if f.WhichOneof("kind") == "pong"] == ["q0"]
            assert app.metrics.registry.get_sample_value("threadline_pings_dropped_total") == 50

            # The cap is per stream: another stream of the same user has its own.
            laptop = RawStream(channel, app.mint("alice", 600))
            await laptop.hello()
            ping = laptop.send(rt.ClientFrame(ping=rt.Ping()))
            assert (await laptop.reply_to(ping)).WhichOneof("kind") == "pong"
            laptop.cancel()
            alice.call.cancel()
    finally:
        await app.stop(grace=0.5)


async def test_submit_pings_for_a_session_share_its_cap(settings_factory):
    app = ThreadlineServer(settings_factory(realtime={"max_pings_per_second": 2}))
    app.limits.clock = FakeClock()
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            stream = Frames(channel, app.mint("alice", 600))
            welcome = await stream.hello()
            stub = rsg.RealtimeServiceStub(channel)
            kinds = []
            for _ in range(3):
                reply = await stub.Submit(
                    rs.SubmitRequest(
                        frame=rt.ClientFrame(ping=rt.Ping()), session_id=welcome.session_id
                    ),
                    metadata=bearer(app.mint("alice", 600)),
                )
                kinds.append(reply.frame.WhichOneof("kind") if reply.HasField("frame") else None)
            assert kinds == ["pong", "pong", None]  # an empty answer: ignored, not refused
            for frame in [*pings(2, "s"), send(thread, "after")]:
                stream.send(frame)
            result, before = await stream.until("operation_result")
            assert result.operation_result.WhichOneof("outcome") == "confirmed"
            assert [f for f in before if f.WhichOneof("kind") == "pong"] == []
            assert app.metrics.registry.get_sample_value("threadline_pings_dropped_total") == 3
            stream.call.cancel()
    finally:
        await app.stop(grace=0.5)
