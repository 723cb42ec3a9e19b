"""Baseline: a bare grpc.aio broadcast server on raw bytes (no auth, no database, no batching).

Usage: python bench/bare_fanout_server.py PORT   (prints "ready" once listening)

`/bench.Fanout/Join` is a bidirectional stream; every open one is a subscriber. The server first
writes one empty frame to the joining stream (so the client knows it is registered), then every
frame any stream sends is written to every joined stream, the sender included: one gRPC message
per event per subscriber, through a per-stream asyncio.Queue drained by that stream's own writer
loop. That is the shape a plain broadcast server has; bench/fanout_bare_bench.py compares
Threadline's fan-out with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import grpc

MAX_STREAMS_PER_CONNECTION = 100  # as `threadline serve` (server.max_concurrent_streams)

_subscribers: set[asyncio.Queue[bytes | None]] = set()


async def _relay(requests: AsyncIterator[bytes], own: asyncio.Queue[bytes | None]) -> None:
    """Reads one stream's frames and queues each on every subscriber."""
    try:
        async for frame in requests:
            for queue in _subscribers:
                queue.put_nowait(frame)
    finally:
        own.put_nowait(None)  # the client half-closed (or went away): end its writer too


async def join(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> None:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    _subscribers.add(queue)
    reader = asyncio.create_task(_relay(requests, queue))
    try:
        await context.write(b"")  # joined
        while (frame := await queue.get()) is not None:
            await context.write(frame)
    finally:
        _subscribers.discard(queue)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def main(port: int) -> None:
    server = grpc.aio.server(options=(("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),))
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(join)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Fanout", {"Join": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
