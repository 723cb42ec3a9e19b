"""Idle-connection benchmark: server CPU while N realtime streams are open and silent, beside a
bare grpc.aio echo server holding N silent bidirectional streams in the same run.

Usage: python bench/idle_bench.py [--streams 100,1000] [--seconds 10] [--db URL]
Prints a Markdown table; not a test (nothing asserts on time).

What it shows: the cost of keeping connections that do nothing (heartbeats are 30 s apart, so a
10 s window sees none): the server's own timers and bookkeeping per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    OWN_CONNECTION,
    echo_server,
    mint_tokens,
    process_cpu_seconds,
)
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402

PER_CHANNEL = 90  # under the server's 100 concurrent streams per connection


async def _cpu_share(pid: int, seconds: float) -> float:
    """The process's CPU over `seconds`, in % of one core."""
    await asyncio.sleep(1.0)  # let the opening settle
    before, started = process_cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return 100 * (process_cpu_seconds(pid) - before) / (time.perf_counter() - started)


async def echo_idle(streams: int, seconds: float) -> float:
    stop = asyncio.Event()

    async def silent() -> AsyncIterator[bytes]:
        yield b"hi"
        await stop.wait()

    with echo_server() as (port, pid):
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)
            for _ in range(-(-streams // PER_CHANNEL))
        ]
        calls: list[grpc.aio.StreamStreamCall[bytes, bytes]] = []
        try:
            for i in range(streams):
                method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channels[
                    i // PER_CHANNEL
                ].stream_stream("/bench.Echo/Echo")
                call = method(silent())
                await call.read()  # open and answered once
                calls.append(call)
            return await _cpu_share(pid, seconds)
        finally:
            stop.set()
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()


async def threadline_idle(streams: int, seconds: float, db: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        server = ServerProcess(data, db or f"sqlite+aiosqlite:///{data}/bench.db")
        server.start()
        users = [f"idle{i}" for i in range(-(-streams // 5))]  # at most 5 streams per user
        tokens = mint_tokens(server, users)
        channels = [
            grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION)
            for _ in range(-(-streams // PER_CHANNEL))
        ]
        opened: list[RawStream] = []
        try:
            for i in range(streams):
                stream = RawStream(channels[i // PER_CHANNEL], tokens[users[i // 5]])
                await stream.hello()
                opened.append(stream)
            assert server.proc is not None
            return await _cpu_share(server.proc.pid, seconds)
        finally:
            for stream in opened:
                stream.cancel()
            for channel in channels:
                await channel.close()
            server.stop()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", default="100,1000", help="comma-separated stream counts")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    p.add_argument("--db", default="", help="database URL (default: SQLite in a temp dir)")
    args = p.parse_args()
    print("| idle streams | bare grpc.aio echo CPU | Threadline CPU | ratio |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.streams.split(",")):
        echo = await echo_idle(n, args.seconds)
        ours = await threadline_idle(n, args.seconds, args.db)
        ratio = ours / echo if echo > 0 else float("inf")
        print(f"| {n:,} | {echo:.1f}% | {ours:.1f}% | {ratio:.1f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
