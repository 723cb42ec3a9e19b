"""An oversized authorization header is the application's to refuse, every time.

gRPC refuses request metadata between its soft limit (8 KiB by default) and its hard one (16 KiB)
at random, so a 9-15 KiB token got RESOURCE_EXHAUSTED on some calls and UNAUTHENTICATED on
others. The server sets both limits to `server.max_metadata_bytes` (32 KiB): every such header
reaches the 8 KiB token cap, which answers UNAUTHENTICATED (TOKEN_INVALID) with ErrorInfo. Twenty
calls per size make a random refusal all but certain to show (at 9 KiB, gRPC let 3 in 4 through:
0.75^20 is 0.3%).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.support.rpc import details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer

CALLS = 20


def authorization(kib: int) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + "a" * (kib * 1024 - len("Bearer "))),)


async def _hello() -> AsyncIterator[rs.ConnectRequest]:
    yield rs.ConnectRequest(frame=rt.ClientFrame(hello=rt.Hello()))
    await asyncio.Event().wait()  # keep the request side open; the server answers first


async def unary_outcome(channel: grpc.aio.Channel, kib: int) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tsg.ThreadServiceStub(channel).ListThreads(
            ts.ListThreadsRequest(), metadata=authorization(kib), timeout=10
        )
    return err.value.code().name, str(details(err.value).get("reason"))


async def stream_outcome(channel: grpc.aio.Channel, kib: int) -> tuple[str, str]:
    call = rsg.RealtimeServiceStub(channel).Connect(
        _hello(), metadata=authorization(kib), timeout=10
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    finally:
        call.cancel()
    return err.value.code().name, str(details(err.value).get("reason"))


@pytest.mark.parametrize("kib", [9, 12, 15])
async def test_oversized_authorization_is_always_unauthenticated(channel, kib):
    unary = Counter([await unary_outcome(channel, kib) for _ in range(CALLS)])
    stream = Counter([await stream_outcome(channel, kib) for _ in range(CALLS)])
    assert unary == {("UNAUTHENTICATED", "TOKEN_INVALID"): CALLS}
    assert stream == {("UNAUTHENTICATED", "TOKEN_INVALID"): CALLS}


async def test_metadata_over_the_configured_limit_is_always_refused_by_grpc(settings_factory):
    """Over `server.max_metadata_bytes` gRPC refuses before the application sees the call, and
    deterministically so: the soft and the hard limit are the same."""
    app = ThreadlineServer(settings_factory(server={"max_metadata_bytes": 16_384}))
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            under = Counter([await unary_outcome(channel, 12) for _ in range(CALLS)])
            over = Counter()
            for _ in range(CALLS):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await tsg.ThreadServiceStub(channel).ListThreads(
                        ts.ListThreadsRequest(), metadata=authorization(17), timeout=10
                    )
                over[err.value.code().name] += 1
        assert under == {("UNAUTHENTICATED", "TOKEN_INVALID"): CALLS}
        assert over == {"RESOURCE_EXHAUSTED": CALLS}
    finally:
        await app.stop(grace=0.5)
