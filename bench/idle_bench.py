"""Idle-connection benchmark: server CPU and memory while N realtime streams are open and silent,
beside a bare grpc.aio echo server holding N silent bidirectional streams in the same run.

Usage: python bench/idle_bench.py [--streams 100,1000] [--seconds 10] [--db URL]
       python bench/idle_bench.py --streams 10000        (issue 12: RSS per stream ≤ 1.3x bare)
Prints a Markdown table; not a test (nothing asserts on time or memory).

What it shows: the cost of keeping connections that do nothing (heartbeats are 30 s apart, so a
10 s window sees none): the server's own timers and bookkeeping per stream, as
- CPU: the server process's CPU over the window, in % of one core;
- RSS per stream: the server's VmRSS (/proc/<pid>/status) after the streams are open and the
  window has passed, minus its VmRSS just before they were opened (after one warm-up stream,
  so one-time costs of the first call are not charged to the N), divided by N.

Threadline streams are authenticated (one token per user, 5 streams per user, the server's cap)
and greeted (Hello → Welcome → SyncComplete); the echo streams are answered once. Both open
WAVE streams at a time, PER_CHANNEL per TCP connection. The bench raises its soft
RLIMIT_NOFILE to the hard limit (the servers it starts inherit it). `closed` counts streams that
ended before the measurement was over (it should be 0: Threadline closes a stream silent for
realtime.idle_timeout_s, 120 s, so opening must take less than that).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    OWN_CONNECTION,
    drain_output,
    echo_server,
    mint_tokens,
    process_cpu_seconds,
)
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402

PER_CHANNEL = 90  # under the server's 100 concurrent streams per connection
PER_USER = 5  # realtime.max_connections_per_user
WAVE = 100  # streams opened concurrently


@dataclass
class Idle:
    """What one server did while holding `streams` silent streams."""

    streams: int
    cpu_pct: float = 0.0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    open_s: float = 0.0
    closed: int = 0

    @property
    def rss_per_stream_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.streams if self.streams else 0.0


def rss_kib(pid: int) -> int:
    """Resident set size of another process (VmRSS in /proc/<pid>/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the servers started later)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def _measure(pid: int, seconds: float, m: Idle) -> None:
    """The process's CPU over `seconds` (% of one core), then its RSS."""
    await asyncio.sleep(1.0)  # let the opening settle
    before, started = process_cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    m.cpu_pct = 100 * (process_cpu_seconds(pid) - before) / (time.perf_counter() - started)
    m.rss_after_kib = rss_kib(pid)


async def echo_idle(streams: int, seconds: float) -> Idle:
    stop = asyncio.Event()
    m = Idle(streams)

    async def silent() -> AsyncIterator[bytes]:
        yield b"hi"
        await stop.wait()

    with echo_server() as (port, pid):
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)
            for _ in range(-(-(streams + 1) // PER_CHANNEL))
        ]
        calls: list[grpc.aio.StreamStreamCall[bytes, bytes]] = []

        async def open_one(i: int) -> None:
            method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channels[
                i // PER_CHANNEL
            ].stream_stream("/bench.Echo/Echo")
            call = method(silent())
            calls.append(call)
            await call.read()  # open and answered once

        try:
            await open_one(streams)  # the warm-up stream (on the last channel's spare slot)
            await asyncio.sleep(0.5)
            m.rss_before_kib = rss_kib(pid)
            started = time.perf_counter()
            for first in range(0, streams, WAVE):
                await asyncio.gather(
                    *(open_one(i) for i in range(first, min(first + WAVE, streams)))
                )
            m.open_s = time.perf_counter() - started
            await _measure(pid, seconds, m)
            m.closed = sum(call.done() for call in calls)
            return m
        finally:
            stop.set()
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()


async def threadline_idle(streams: int, seconds: float, db: str) -> Idle:
    m = Idle(streams)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        server = ServerProcess(data, db or f"sqlite+aiosqlite:///{data}/bench.db")
        server.start()
        drain_output(server)  # 10,000 streams must never block the server on a full log pipe
        assert server.proc is not None
        pid = server.proc.pid
        users = [f"idle{i}" for i in range(-(-streams // PER_USER))]
        tokens = mint_tokens(server, [*users, "idlewarm"])
        channels = [
            grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION)
            for _ in range(-(-(streams + 1) // PER_CHANNEL))
        ]
        opened: list[RawStream] = []

        async def open_one(i: int, token: str) -> None:
            stream = RawStream(channels[i // PER_CHANNEL], token)
            opened.append(stream)
            await stream.hello()

        try:
            await open_one(streams, tokens["idlewarm"])  # the warm-up stream
            await asyncio.sleep(0.5)
            m.rss_before_kib = rss_kib(pid)
            started = time.perf_counter()
            for first in range(0, streams, WAVE):
                await asyncio.gather(
                    *(
                        open_one(i, tokens[users[i // PER_USER]])
                        for i in range(first, min(first + WAVE, streams))
                    )
                )
            m.open_s = time.perf_counter() - started
            await _measure(pid, seconds, m)
            m.closed = sum(stream.call.done() for stream in opened)
            return m
        finally:
            for stream in opened:
                stream.cancel()
            for channel in channels:
                await channel.close()
            server.stop()


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", default="100,1000", help="comma-separated stream counts")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    p.add_argument("--db", default="", help="database URL (default: SQLite in a temp dir)")
    args = p.parse_args()
    soft, hard = raise_nofile_limit()
    print(f"RLIMIT_NOFILE soft/hard: {soft}/{hard}; {PER_CHANNEL} streams per connection")
    print()
    print(
        "| idle streams | bare grpc.aio echo CPU | Threadline CPU | ratio "
        "| bare RSS KiB/stream | Threadline RSS KiB/stream | ratio "
        "| RSS MiB before → after, bare / Threadline | open s, bare / Threadline "
        "| closed, bare / Threadline |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.streams.split(",")):
        echo = await echo_idle(n, args.seconds)
        ours = await threadline_idle(n, args.seconds, args.db)
        # No CPU measured on the echo side (a quiet window) leaves no ratio to state.
        cpu_ratio = f"{ours.cpu_pct / echo.cpu_pct:.1f}" if echo.cpu_pct > 0 else "-"
        e_rss, o_rss = echo.rss_per_stream_kib, ours.rss_per_stream_kib
        rss_ratio = o_rss / e_rss if e_rss > 0 else float("inf")
        print(
            f"| {n:,} | {echo.cpu_pct:.1f}% | {ours.cpu_pct:.1f}% | {cpu_ratio} "
            f"| {e_rss:.1f} | {o_rss:.1f} | {rss_ratio:.2f} "
            f"| {mib(echo.rss_before_kib)} → {mib(echo.rss_after_kib)} / "
            f"{mib(ours.rss_before_kib)} → {mib(ours.rss_after_kib)} "
            f"| {echo.open_s:.1f} / {ours.open_s:.1f} | {echo.closed} / {ours.closed} |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
