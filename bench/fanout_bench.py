"""Fan-out benchmark: messages/s and p50/p99 send→deliver latency with 1, 10 and 100 subscribers
per thread, the cost of the limits (rate limiter, gzip from 10 KB) and the effect of batching
queued events into one frame, beside a bare grpc.aio echo measured in the same run (ratios).

Usage: python bench/fanout_bench.py [--rate 200] [--seconds 3] [--burst 500] [--repeat 3]
                                    [--subscribers 1,10,100] [--groups ...] [--db URL]
PostgreSQL: use a database of its own (never `test`, whose schema the test suite drops):
  createdb -h 127.0.0.1 -U postgres bench
  python bench/fanout_bench.py --db postgresql+asyncpg://postgres@127.0.0.1:5432/bench
Not a test: nothing asserts on time. Prints Markdown tables.

Each case starts a fresh `threadline serve` (tests/support/process.py) and one thread whose N
participants are distinct users (a user may hold only 5 streams), each holding one live Connect
stream (RawStream); participant 0's stream also sends, so its own events count as deliveries too
(N per message) and its acks queue behind them. A message's text starts with its sequence number,
so every delivery is matched to the moment its frame was sent.

- steady: one message every 1/rate s for `seconds`, after a short warm-up;
- burst: `burst` messages pipelined at once on the sending stream (max msgs/s; latencies are
  then mostly queueing).

"Limits on" is the production shape, used by every case unless its label says otherwise: the rate
limiter enabled with a budget too large to refuse (1,000,000 operations/minute), gzip from the
default 10 KB, live batches of up to 100 events. The comparisons switch one of those off at a time.

Columns: `msgs/s acked` counts sends until the last ack; `events/frame` is deliveries per event
frame received (the batching); `server CPU µs/delivery` is the server process's CPU time over
deliveries; `CPU %` splits the run's CPU (100% = one core) into the server, this client, local
PostgreSQL processes and the rest of the machine, which shows how disturbed a run was. With
--repeat N every case runs N times (rounds interleaved) and the table keeps, per case, the run
the rest of the machine disturbed least.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    OWN_CONNECTION,
    CpuClock,
    Measured,
    echo_run,
    mint_tokens,
    pace,
    pct,
)
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402
from threadline.v1 import realtime_pb2 as rt  # noqa: E402
from threadline.v1 import thread_pb2  # noqa: E402
from threadline.v1 import thread_service_pb2 as ts  # noqa: E402
from threadline.v1 import thread_service_pb2_grpc as tsg  # noqa: E402

STREAMS_PER_CHANNEL = 20  # the server allows 100 concurrent streams per connection
WARMUP = 20  # messages sent (at the steady rate) and delivered before measuring
SEQ_DIGITS = 8
HELLO_WAVE = 50  # streams greeted at once
HELLO_WAIT_S = 60.0

OPS = "THREADLINE_LIMITS__OPERATIONS_PER_MINUTE"
GZIP = "THREADLINE_LIMITS__COMPRESSION_THRESHOLD_BYTES"
BATCH = "THREADLINE_REALTIME__BATCH_MAX_EVENTS"
NEVER = str(1 << 30)

LIMITS_ON: dict[str, str] = {OPS: "1000000"}  # gzip threshold and batch size: the defaults
RATE_LIMIT_OFF = {**LIMITS_ON, OPS: "0"}
GZIP_OFF = {**LIMITS_ON, GZIP: NEVER}
BATCH_1 = {**LIMITS_ON, BATCH: "1"}


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    subscribers: int
    burst: bool
    size: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Fanout:
    """Deliveries as the subscriber streams see them, for the current phase."""

    sent: dict[int, float] = field(default_factory=dict)
    expect: int = 0
    delivered: int = 0
    frames: int = 0
    latencies: list[float] = field(default_factory=list)
    last: float = 0.0
    failed: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self, expect: int) -> None:
        self.expect, self.delivered, self.frames, self.latencies = expect, 0, 0, []
        self.done.clear()

    def fail(self, why: str) -> None:
        self.failed = self.failed or why
        self.done.set()


def filler(size: int) -> str:
    """Chat-like text (a small vocabulary in a non-repeating order): gzip shrinks it about 4x."""
    words = [
        "the", "a", "we", "it", "to", "of", "and", "in", "on", "for", "with", "lunch", "plans",
        "team", "meeting", "today", "tomorrow", "deploy", "review", "please", "thanks", "sounds",
        "good", "let", "me", "check", "later", "fixed", "broken", "build", "test", "release",
        "call", "notes", "doc", "link", "draft", "update", "ship", "merge", "branch", "issue",
        "ticket", "customer", "latency",
    ]  # fmt: skip
    out: list[str] = []
    length, i = 0, 0
    while length < size:
        digest = hashlib.blake2b(i.to_bytes(4, "big"), digest_size=2).digest()
        word = words[int.from_bytes(digest, "big") % len(words)]
        out.append(word)
        length += len(word) + 1
        i += 1
    return " ".join(out)[:size]


async def consume(stream: RawStream, fan: Fanout) -> None:
    """Reads one subscriber's pushed frames and matches each message event to its send time."""
    while True:
        frame = await stream.pushes.get()
        now = time.perf_counter()
        if frame is None:
            fan.fail("a subscriber stream ended")
            return
        kind = frame.WhichOneof("kind")
        if kind != "events":
            if kind in ("error", "resync_required"):
                fan.fail(f"a subscriber got {frame}")
            continue
        fan.frames += 1
        for event in frame.events.events:
            if event.kind == rt.EVENT_KIND_MESSAGE_CREATED:
                fan.latencies.append(now - fan.sent[int(event.message.text[:SEQ_DIGITS])])
                fan.delivered += 1
        fan.last = now
        if fan.delivered >= fan.expect:
            fan.done.set()


async def phase(
    sender: RawStream,
    thread: str,
    fan: Fanout,
    *,
    rate: float,
    count: int,
    first_seq: int,
    text: str,
    subscribers: int,
    server_pid: int,
    op_prefix: str,
) -> Measured:
    """Sends `count` messages at `rate` (0: all at once) and waits for every delivery."""
    fan.reset(count * subscribers)
    m = Measured(messages=count)
    last_ack = 0.0

    async def ack(request_id: str, seq: int) -> None:
        nonlocal last_ack
        reply = await sender.reply_to(request_id, timeout=120)
        now = time.perf_counter()
        result = reply.operation_result
        if result.WhichOneof("outcome") != "confirmed":
            raise RuntimeError(f"send {seq} failed: {reply}")
        m.ack.append(now - fan.sent[seq])
        last_ack = max(last_ack, now)

    tasks: list[asyncio.Task[None]] = []
    clock = CpuClock.start(server_pid)
    start = time.perf_counter()
    async for i in pace(rate, count):
        seq = first_seq + i
        frame = rt.ClientFrame(
            send_message=rt.SendMessage(
                client_op_id=f"{op_prefix}-{seq}",
                thread_id=thread,
                text=f"{seq:0{SEQ_DIGITS}d} {text}",
            )
        )
        fan.sent[seq] = time.perf_counter()
        tasks.append(asyncio.create_task(ack(sender.send(frame), seq)))
    m.offered_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    try:
        await asyncio.wait_for(fan.done.wait(), timeout=120)
    except TimeoutError:
        fan.fail(f"timed out with {fan.delivered} of {fan.expect} deliveries")
    if fan.failed:
        raise RuntimeError(fan.failed)
    clock.stop(m)
    m.acked_s = last_ack - start
    m.delivered_s = fan.last - start
    m.deliveries, m.frames, m.deliver = fan.delivered, fan.frames, fan.latencies
    return m


async def hello(stream: RawStream) -> None:
    """RawStream.hello with a longer wait: 1,000 hellos on a busy 2-core box take more than its
    fixed 5 s (token checks, first sync, the presence of everyone already online)."""
    rid = stream.send(rt.ClientFrame(hello=rt.Hello(client_name="bench")))
    welcome = await stream.reply_to(rid, timeout=HELLO_WAIT_S)
    if welcome.WhichOneof("kind") != "welcome":
        raise RuntimeError(f"hello answered {welcome}")
    done = await stream.recv(timeout=HELLO_WAIT_S)
    if done.WhichOneof("kind") != "sync_complete":
        raise RuntimeError(f"expected sync_complete, got {done}")


async def open_streams(channels: list[grpc.aio.Channel], tokens: list[str]) -> list[RawStream]:
    """One stream per token, HELLO_WAVE at a time: a stream must send its hello within
    realtime.hello_timeout_s (10 s) of opening, so they are opened only as they are greeted."""
    streams: list[RawStream] = []
    for first in range(0, len(tokens), HELLO_WAVE):
        wave = [
            RawStream(channels[i // STREAMS_PER_CHANNEL], tokens[i])
            for i in range(first, min(first + HELLO_WAVE, len(tokens)))
        ]
        streams += wave
        outcomes = await asyncio.gather(*(hello(s) for s in wave), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                for s in streams:
                    s.cancel()
                raise outcome
    return streams


async def drive(proc: ServerProcess, case: Case, args: argparse.Namespace) -> Measured:
    assert proc.proc is not None
    pid = proc.proc.pid
    n = case.subscribers
    users = [f"fan{i}" for i in range(n)]
    tokens = mint_tokens(proc, users)
    channels = [
        grpc.aio.insecure_channel(proc.target, options=OWN_CONNECTION)
        for _ in range(math.ceil(n / STREAMS_PER_CHANNEL))
    ]
    streams: list[RawStream] = []
    consumers: list[asyncio.Task[None]] = []
    try:
        created = await tsg.ThreadServiceStub(channels[0]).CreateThread(
            ts.CreateThreadRequest(
                thread=thread_pb2.Thread(title=f"bench {case.key}", participant_ids=users[1:])
            ),
            metadata=(("authorization", f"Bearer {tokens[users[0]]}"),),
        )
        thread = created.thread.id
        streams = await open_streams(channels, [tokens[u] for u in users])
        fan = Fanout()
        consumers = [asyncio.create_task(consume(s, fan)) for s in streams]
        text = filler(case.size - SEQ_DIGITS - 1)
        op_prefix = uuid.uuid4().hex  # operation ids stay unique in a reused PostgreSQL database

        async def run(rate: float, count: int, first_seq: int) -> Measured:
            return await phase(
                streams[0],
                thread,
                fan,
                rate=rate,
                count=count,
                first_seq=first_seq,
                text=text,
                subscribers=n,
                server_pid=pid,
                op_prefix=op_prefix,
            )

        await run(args.rate, WARMUP, 0)
        if case.burst:
            return await run(0.0, args.burst, WARMUP)
        return await run(args.rate, round(args.rate * args.seconds), WARMUP)
    finally:
        for task in consumers:
            task.cancel()
        for s in streams:
            s.cancel()
        for channel in channels:
            await channel.close()


async def run_case(case: Case, args: argparse.Namespace, attempts: int = 2) -> Measured:
    """One case on a fresh server; a failed attempt (a shared box has port races) is retried."""
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as tmp:
            url = args.db or f"sqlite+aiosqlite:///{tmp}/bench.db"
            env = {"THREADLINE_LOG_LEVEL": "WARNING", **case.env}
            proc = ServerProcess(Path(tmp) / "data", url, **env)
            proc.start()
            try:
                return await drive(proc, case, args)
            except (grpc.aio.AioRpcError, RuntimeError, EOFError, TimeoutError) as exc:
                if attempt == attempts:
                    raise
                print(f"  attempt {attempt} failed, retrying: {exc!r}"[:300], file=sys.stderr)
            finally:
                proc.stop()
                if proc.proc is not None and proc.proc.returncode not in (None, -9):
                    print("  server output:", "".join(proc.output[-20:]), file=sys.stderr)
    raise AssertionError("unreachable")


def build_cases(args: argparse.Namespace) -> list[Case]:
    """Each comparison's pair runs back to back (less drift between them on a shared box)."""
    subs: list[int] = args.subscribers
    top, mid, size, big = max(subs), mid_subscribers(subs), args.size, args.big_size
    kb = f"{big // 1000} KB"
    groups = set(args.groups.split(","))
    cases: list[Case] = []
    if "steady" in groups:
        cases += [Case(f"steady{n}", f"steady, {n} subs", n, False, size, LIMITS_ON) for n in subs]
    if "limits" in groups:
        if "steady" not in groups:
            cases.append(Case(f"steady{mid}", f"steady, {mid} subs", mid, False, size, LIMITS_ON))
        cases += [
            Case("steady_rl_off", f"steady, {mid} subs, rate limit off", mid, False, size,
                 RATE_LIMIT_OFF),
            Case("big", f"steady, {kb}, {mid} subs", mid, False, big, LIMITS_ON),
            Case("big_gzip_off", f"steady, {kb}, {mid} subs, gzip off", mid, False, big, GZIP_OFF),
        ]  # fmt: skip
    if "batching" in groups:
        if "steady" not in groups:
            cases.append(Case(f"steady{top}", f"steady, {top} subs", top, False, size, LIMITS_ON))
        cases.append(
            Case("steady_batch1", f"steady, {top} subs, batch 1", top, False, size, BATCH_1)
        )
    if "burst" in groups:
        cases += [Case(f"burst{n}", f"burst, {n} subs", n, True, size, LIMITS_ON) for n in subs]
    elif groups & {"limits", "batching"}:
        cases.append(Case(f"burst{top}", f"burst, {top} subs", top, True, size, LIMITS_ON))
    if "limits" in groups:
        cases.append(
            Case("burst_gzip_off", f"burst, {top} subs, gzip off", top, True, size, GZIP_OFF)
        )
    if "batching" in groups:
        cases.append(Case("burst_batch1", f"burst, {top} subs, batch 1", top, True, size, BATCH_1))
    return list({case.key: case for case in cases}.values())


def mid_subscribers(subs: list[int]) -> int:
    """Where the limits are compared: 10 subscribers (the server keeps up at the steady rate)."""
    return 10 if 10 in subs else min(subs)


def comparisons(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(label, case with the limit or batching as in production, case with it off)."""
    top, mid = max(args.subscribers), mid_subscribers(args.subscribers)
    kb = f"{args.big_size // 1000} KB"
    return [
        (f"rate limiter on vs off (steady, {mid} subs)", f"steady{mid}", "steady_rl_off"),
        (f"gzip from 10 KB vs off (steady, {kb} texts, {mid} subs)", "big", "big_gzip_off"),
        (f"gzip from 10 KB vs off (burst, {top} subs)", f"burst{top}", "burst_gzip_off"),
        (f"batches of ≤100 vs 1 event/frame (steady, {top} subs)", f"steady{top}", "steady_batch1"),
        (f"batches of ≤100 vs 1 event/frame (burst, {top} subs)", f"burst{top}", "burst_batch1"),
    ]


def ms2(values: list[float]) -> str:
    return f"{pct(values, 0.5):.1f} / {pct(values, 0.99):.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def times(a: float, b: float) -> str:
    """a/b with two significant digits (ratios to the echo span 1 to 1,000s)."""
    if not b:
        return "-"
    r = a / b
    return f"{r:.1f}" if r < 10 else f"{r:,.0f}"


def cpu_per_delivery(m: Measured) -> float:
    return m.server_cpu_s / m.deliveries if m.deliveries else 0.0


def row(label: str, m: Measured, echo: Measured | None) -> str:
    p50, p99 = pct(m.deliver, 0.5), pct(m.deliver, 0.99)
    if echo is None:
        vs_rate, vs_lat = "1.00", "1 / 1"
    else:
        e50, e99 = pct(echo.deliver, 0.5), pct(echo.deliver, 0.99)
        vs_rate = ratio(m.msgs_per_s, echo.msgs_per_s)
        vs_lat = f"{times(p50, e50)} / {times(p99, e99)}"
    w = m.wall_s or 1.0
    cpu = " / ".join(
        f"{v / w:.0%}" for v in (m.server_cpu_s, m.client_cpu_s, m.db_cpu_s, m.other_cpu_s)
    )
    return (
        f"| {label} | {m.msgs_per_s:,.0f} | {vs_rate} | {m.deliveries_per_s:,.0f} | "
        f"{m.events_per_frame:.1f} | {ms2(m.ack)} | {p50:.1f} / {p99:.1f} | {vs_lat} | "
        f"{cpu_per_delivery(m) * 1e6:,.0f} | {cpu} |"
    )


def comparison_row(label: str, a: Measured, b: Measured) -> str:
    return (
        f"| {label} | {ratio(a.msgs_per_s, b.msgs_per_s)} | "
        f"{ratio(a.deliveries_per_s, b.deliveries_per_s)} | "
        f"{ratio(pct(a.deliver, 0.5), pct(b.deliver, 0.5))} | "
        f"{ratio(pct(a.deliver, 0.99), pct(b.deliver, 0.99))} | "
        f"{ratio(cpu_per_delivery(a), cpu_per_delivery(b))} | "
        f"{a.events_per_frame:.1f} / {b.events_per_frame:.1f} |"
    )


def quietest(runs: list[Measured]) -> Measured:
    """Of repeated runs, the one the rest of the machine disturbed least."""
    return min(runs, key=lambda m: m.other_cpu_s / (m.wall_s or 1.0))


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Threadline fan-out benchmark (see module docstring)")
    p.add_argument("--rate", type=float, default=200.0, help="steady messages/s")
    p.add_argument("--seconds", type=float, default=3.0, help="length of a steady run")
    p.add_argument("--burst", type=int, default=500, help="messages pipelined in a burst run")
    p.add_argument("--size", type=int, default=200, help="message text bytes")
    p.add_argument("--big-size", type=int, default=12_000, help="text bytes of the gzip cases")
    p.add_argument(
        "--subscribers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 10, 100],
        help="comma-separated subscriber counts (batching is compared at the largest)",
    )
    p.add_argument(
        "--groups",
        default="steady,burst,limits,batching",
        help="which cases: any of steady, burst, limits, batching",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="run every case N times, keep the quietest"
    )
    p.add_argument("--db", default="", help="database URL (default: SQLite in a temp dir)")
    return p.parse_args()


async def main() -> None:
    args = parse_args()
    steady_count = round(args.rate * args.seconds)
    kb = f"{args.big_size // 1000} KB"
    db = args.db.rsplit("@", 1)[-1] if args.db else "sqlite (temp file)"
    print(
        f"db={db} rate={args.rate:g}/s seconds={args.seconds:g} burst={args.burst} "
        f"size={args.size} B big={args.big_size} B repeat={args.repeat} load(1m)={load()}",
        flush=True,
    )
    cases = build_cases(args)
    echoes: dict[str, list[Measured]] = {"steady": [], "big": [], "burst": []}
    results: dict[str, list[Measured]] = {case.key: [] for case in cases}
    started = time.perf_counter()
    for round_ in range(args.repeat):
        echoes["steady"].append(await echo_run(args.rate, steady_count, args.size))
        echoes["big"].append(await echo_run(args.rate, steady_count, args.big_size))
        echoes["burst"].append(await echo_run(0.0, args.burst, args.size))
        for case in cases:
            print(f"  [{round_ + 1}/{args.repeat}] {case.label}", file=sys.stderr, flush=True)
            results[case.key].append(await run_case(case, args))
    elapsed = time.perf_counter() - started
    echo = {k: quietest(v) for k, v in echoes.items()}
    best = {k: quietest(v) for k, v in results.items()}

    print(f"took {elapsed:.0f} s; load(1m) now {load()}")
    print()
    print(
        "| case | msgs/s acked | vs echo | deliveries/s | events/frame | send→ack p50 / p99 ms "
        "| send→deliver p50 / p99 ms | p50 / p99 vs echo | server CPU µs/delivery "
        "| CPU % server / client / db / other |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(row(f"bare grpc.aio echo, steady {args.rate:g}/s", echo["steady"], None))
    print(row(f"bare grpc.aio echo, steady, {kb}", echo["big"], None))
    print(row(f"bare grpc.aio echo, burst of {args.burst}", echo["burst"], None))
    for case in cases:
        baseline = echo["burst"] if case.burst else echo["steady"]
        if case.size != args.size:
            baseline = echo["big"]
        print(row(case.label, best[case.key], baseline))

    rows = [
        comparison_row(label, best[a], best[b])
        for label, a, b in comparisons(args)
        if a in best and b in best
    ]
    if rows:
        print()
        print(
            "| on ÷ off | msgs/s | deliveries/s | deliver p50 | deliver p99 "
            "| server CPU/delivery | events/frame on / off |"
        )
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
