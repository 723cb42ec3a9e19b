"""Fan-out beside a bare grpc.aio broadcast server, in the same run, as ratios (issue 12).

Usage: python bench/fanout_bare_bench.py [--subscribers 100,1000] [--rate 200] [--seconds 3]
                                         [--burst 200] [--size 200] [--db URL]
PostgreSQL: --db postgresql+asyncpg://postgres@127.0.0.1:5432/bench (a database of its own).
Not a test: nothing asserts on time. Prints Markdown tables.

What: for each subscriber count N, two cases, each run on a fresh bare server and then on a fresh
`threadline serve` (SQLite in a temp dir unless --db):

- bare: bench/bare_fanout_server.py, N `/bench.Fanout/Join` streams (STREAMS_PER_CHANNEL per
  TCP connection, as for Threadline); stream 0 sends, and the server writes every frame to all N
  streams, the sender included, as one gRPC message per event per subscriber;
- Threadline: bench/fanout_bench.py's setup, reused by import (its Fanout, consume, phase,
  filler, drive, which greets streams in waves): one thread whose N participants
  are distinct users, each holding one Connect stream; participant 0 sends. Its events count as
  deliveries too (N per message). Threadline batches queued events into one frame, so deliveries
  are counted as events, not frames.

Cases, after a warm-up of WARMUP messages at the steady rate:
- steady: `--rate` messages/s for `--seconds`; p50/p99 send→deliver over every delivery; the
  figure compared is p99 (target: Threadline ≤ 2x bare);
- burst: `--burst` messages pipelined at once; deliveries/s from the first send to the last
  delivery (target: Threadline ≥ 1.0x bare).

Both: server CPU per delivery in µs, from /proc/<pid>/stat, for each server. The detail table
also splits each run's CPU (100% = one core) into server, this client and the rest of the
machine: on a shared box, or when this one Python client is the bottleneck (a bare server sends
N gRPC messages per event, which the client must read one by one), the figures say so.

Why: the issue asks for Threadline's fan-out latency and throughput next to what plain grpc.aio
does on the same machine in the same minute, not as absolute numbers. 1,000 subscribers need
1,000 users (a user may hold 5 streams) and a thread of 1,000 participants: above 100 (the default
limits.max_participants) the server is started with THREADLINE_LIMITS__MAX_PARTICIPANTS=N.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import fanout_bench as fb  # noqa: E402
from bench._common import (  # noqa: E402
    OWN_CONNECTION,
    CpuClock,
    EchoStream,
    Measured,
    bare_server,
    drain_output,
    pace,
    pct,
)
from bench.pingpong_bench import _start_profile, _stop_profile  # noqa: E402
from tests.support.process import ServerProcess  # noqa: E402

SEQ_DIGITS = fb.SEQ_DIGITS
WARMUP = fb.WARMUP
STREAMS_PER_CHANNEL = fb.STREAMS_PER_CHANNEL  # same connection layout for both servers (≤ 90)
DEFAULT_MAX_PARTICIPANTS = 100  # limits.max_participants in server/threadline_server/config.py
MAX_PARTICIPANTS = "THREADLINE_LIMITS__MAX_PARTICIPANTS"
TIMEOUT_S = 120.0


# ---- the bare broadcast baseline ----------------------------------------------------------


class JoinStream(EchoStream):
    """One `/bench.Fanout/Join` call fed from a queue."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, "/bench.Fanout/Join")

    async def joined(self) -> None:
        """Waits for the server's empty "joined" frame."""
        if await self.read() != b"":
            raise RuntimeError("expected the joined frame first")

    def cancel(self) -> None:
        self.close()
        self.call.cancel()


async def bare_consume(stream: JoinStream, fan: fb.Fanout) -> None:
    """One subscriber: every frame is one delivery, matched to its send time by its prefix."""
    while True:
        try:
            frame = await stream.read()
        except (EOFError, grpc.aio.AioRpcError) as exc:
            fan.fail(f"a bare subscriber stream ended: {exc!r}"[:200])
            return
        now = time.perf_counter()
        fan.frames += 1
        fan.latencies.append(now - fan.sent[int(frame[:SEQ_DIGITS])])
        fan.delivered += 1
        fan.last = now
        if fan.delivered >= fan.expect:
            fan.done.set()


async def bare_phase(
    sender: JoinStream,
    fan: fb.Fanout,
    *,
    rate: float,
    count: int,
    first_seq: int,
    tail: bytes,
    subscribers: int,
    server_pid: int,
) -> Measured:
    """Sends `count` frames at `rate` (0: all at once) and waits for every delivery."""
    fan.reset(count * subscribers)
    m = Measured(messages=count)
    clock = CpuClock.start(server_pid)
    start = time.perf_counter()
    async for i in pace(rate, count):
        seq = first_seq + i
        fan.sent[seq] = time.perf_counter()
        sender.send(f"{seq:0{SEQ_DIGITS}d} ".encode() + tail)
    m.offered_s = time.perf_counter() - start
    try:
        await asyncio.wait_for(fan.done.wait(), timeout=TIMEOUT_S)
    except TimeoutError:
        fan.fail(f"timed out with {fan.delivered} of {fan.expect} deliveries")
    if fan.failed:
        raise RuntimeError(fan.failed)
    clock.stop(m)
    m.delivered_s = fan.last - start
    m.deliveries, m.frames, m.deliver = fan.delivered, fan.frames, fan.latencies
    return m


async def bare_run(n: int, burst: bool, args: argparse.Namespace) -> Measured:
    tail = fb.filler(args.size - SEQ_DIGITS - 1).encode()
    with bare_server("bare_fanout_server.py") as (port, pid):
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)
            for _ in range(math.ceil(n / STREAMS_PER_CHANNEL))
        ]
        streams = [JoinStream(channels[i // STREAMS_PER_CHANNEL]) for i in range(n)]
        consumers: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(s.joined() for s in streams))
            fan = fb.Fanout()
            consumers = [asyncio.create_task(bare_consume(s, fan)) for s in streams]

            async def run(rate: float, count: int, first_seq: int) -> Measured:
                return await bare_phase(
                    streams[0],
                    fan,
                    rate=rate,
                    count=count,
                    first_seq=first_seq,
                    tail=tail,
                    subscribers=n,
                    server_pid=pid,
                )

            await run(args.rate, WARMUP, 0)
            if burst:
                return await run(0.0, args.burst, WARMUP)
            return await run(args.rate, round(args.rate * args.seconds), WARMUP)
        finally:
            for task in consumers:
                task.cancel()
            for s in streams:
                s.cancel()
            for channel in channels:
                await channel.close()


# ---- Threadline, through fanout_bench's pieces ---------------------------------------------


def threadline_env(n: int) -> dict[str, str]:
    env = dict(fb.LIMITS_ON)  # the production shape: rate limiter on (never refusing), gzip
    if n > DEFAULT_MAX_PARTICIPANTS:
        env[MAX_PARTICIPANTS] = str(n)
    return env


async def threadline_run(
    n: int, burst: bool, args: argparse.Namespace, attempts: int = 2
) -> Measured:
    """One case on a fresh `threadline serve` whose output is drained (1,000 streams may log
    more than a pipe holds); a failed attempt (port races on a shared box) is retried once."""
    label = f"{'burst' if burst else 'steady'}, {n} subs"
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as tmp:
            url = args.db or f"sqlite+aiosqlite:///{tmp}/bench.db"
            proc = ServerProcess(
                Path(tmp) / "data", url, THREADLINE_LOG_LEVEL="WARNING", **threadline_env(n)
            )
            proc.start()
            startup = len(proc.output)
            drain_output(proc)
            try:
                case = fb.Case(str(n), f"{n} subscribers", n, burst, args.size)
                out = f"{args.profile}.{label.replace(', ', '-').replace(' ', '')}"
                spy = _start_profile(proc.proc.pid, out) if args.profile else None
                try:
                    return await fb.drive(proc, case, args)
                finally:
                    _stop_profile(spy, out)
            except (grpc.aio.AioRpcError, RuntimeError, EOFError, TimeoutError) as exc:
                if attempt == attempts:
                    raise
                print(f"  attempt {attempt} failed, retrying: {exc!r}"[:300], file=sys.stderr)
            finally:
                proc.stop()
                if logged := proc.output[startup:]:  # warnings (slow consumers, ...) or a crash
                    print(
                        f"  server output ({label}), last 20 of {len(logged)} lines:",
                        file=sys.stderr,
                    )
                    print("".join(logged[-20:]), file=sys.stderr, end="")
    raise AssertionError("unreachable")


# ---- report ---------------------------------------------------------------------------------


def cpu_us(m: Measured) -> float:
    return m.server_cpu_s / m.deliveries * 1e6 if m.deliveries else 0.0


def shares(m: Measured) -> str:
    w = m.wall_s or 1.0
    return " / ".join(f"{v / w:.0%}" for v in (m.server_cpu_s, m.client_cpu_s, m.other_cpu_s))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


Result = Measured | str  # a measurement, or why the run failed


def main_row(kind: str, n: int, bare: Result, ours: Result) -> str:
    target = "≤ 2.0" if kind == "steady" else "≥ 1.0"

    def figure(r: Result) -> str:
        if isinstance(r, str):
            return f"failed: {r}"
        if kind == "steady":
            return f"{pct(r.deliver, 0.5):.1f} / {pct(r.deliver, 0.99):.1f}"
        return f"{r.deliveries_per_s:,.0f}"

    if isinstance(bare, str) or isinstance(ours, str):
        r, met = "-", "-"
    elif kind == "steady":
        a, b = pct(ours.deliver, 0.99), pct(bare.deliver, 0.99)
        r, met = ratio(a, b), ("yes" if b and a / b <= 2.0 else "no")
    else:
        a, b = ours.deliveries_per_s, bare.deliveries_per_s
        r, met = ratio(a, b), ("yes" if b and a / b >= 1.0 else "no")
    cpu = " / ".join("-" if isinstance(x, str) else f"{cpu_us(x):,.1f}" for x in (bare, ours))
    what = "p50 / p99 send→deliver ms" if kind == "steady" else "deliveries/s"
    return (
        f"| {kind} ({what}) | {n:,} | {figure(bare)} | {figure(ours)} | {r} | {target} | {met} "
        f"| {cpu} |"
    )


def detail_row(server: str, kind: str, n: int, r: Result) -> str:
    if isinstance(r, str):
        return f"| {server} | {kind} | {n:,} | failed: {r} | | | | | | |"
    return (
        f"| {server} | {kind} | {n:,} | {r.messages:,} | {r.deliveries:,} | "
        f"{r.offered_s:.2f} / {r.delivered_s:.2f} | {r.deliveries_per_s:,.0f} | "
        f"{r.events_per_frame:.1f} | {pct(r.deliver, 0.5):.1f} / {pct(r.deliver, 0.99):.1f} | "
        f"{cpu_us(r):,.1f} | {shares(r)} |"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fan-out beside bare grpc.aio (see module docstring)")
    p.add_argument(
        "--subscribers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[100, 1000],
        help="comma-separated subscriber counts",
    )
    p.add_argument("--rate", type=float, default=200.0, help="steady messages/s")
    p.add_argument("--seconds", type=float, default=3.0, help="length of a steady run")
    p.add_argument("--burst", type=int, default=200, help="messages pipelined in a burst run")
    p.add_argument("--size", type=int, default=200, help="message text bytes (bare: frame bytes)")
    p.add_argument("--db", default="", help="database URL (default: SQLite in a temp dir)")
    p.add_argument(
        "--profile",
        default="",
        help="py-spy summaries of each Threadline run go to PATH.<case> (setup included)",
    )
    return p.parse_args()


async def main() -> None:
    args = parse_args()
    db = args.db.rsplit("@", 1)[-1] if args.db else "sqlite (temp file)"
    print(
        f"db={db} rate={args.rate:g}/s seconds={args.seconds:g} burst={args.burst} "
        f"size={args.size} B streams/connection={STREAMS_PER_CHANNEL} load(1m)={load()}",
        flush=True,
    )
    started = time.perf_counter()
    results: list[tuple[str, int, Result, Result]] = []
    for n in args.subscribers:
        for kind in ("steady", "burst"):
            burst = kind == "burst"
            pair: list[Result] = []
            for name, run in (("bare", bare_run), ("Threadline", threadline_run)):
                print(f"  {kind}, {n} subs: {name}", file=sys.stderr, flush=True)
                try:
                    pair.append(await run(n, burst, args))
                except (grpc.aio.AioRpcError, RuntimeError, EOFError, TimeoutError) as exc:
                    print(f"  {name} {kind} {n} failed: {exc!r}"[:500], file=sys.stderr)
                    pair.append(f"{type(exc).__name__}: {exc}"[:120].replace("|", "/"))
            results.append((kind, n, pair[0], pair[1]))
    print(f"took {time.perf_counter() - started:.0f} s; load(1m) now {load()}")
    print()
    print(
        "| case | N | bare grpc.aio | Threadline | ratio | target | met "
        "| server CPU µs/delivery bare / Threadline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, bare, ours in results:
        print(main_row(kind, n, bare, ours))
    print()
    print(
        "| server | case | N | messages | deliveries | last send / last delivery s "
        "| deliveries/s | events/frame | send→deliver p50 / p99 ms | server CPU µs/delivery "
        "| CPU % server / client / other |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, n, bare, ours in results:
        print(detail_row("bare", kind, n, bare))
        print(detail_row("Threadline", kind, n, ours))


if __name__ == "__main__":
    asyncio.run(main())
