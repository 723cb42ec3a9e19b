"""Baseline: a bare grpc.aio bidirectional echo on raw bytes (no auth, no database)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc


async def echo(requests: AsyncIterator[bytes], _context: object) -> AsyncIterator[bytes]:
    async for item in requests:
        yield item


async def main(port: int) -> None:
    # As `threadline serve` sets them (server.max_pending_calls): gRPC's defaults refuse calls
    # of a storm of thousands that the application has not taken up yet.
    server = grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", 15_000),
            ("grpc.server.max_pending_requests_hard_limit", 30_000),
            ("grpc.server_max_unrequested_time_in_server", 300),
        ]
    )
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
