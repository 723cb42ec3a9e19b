"""Connection storms: N users opening their realtime stream at the same moment, as after a node
restart, beside a bare grpc.aio server opening N bidirectional streams in the same run.

Usage: python bench/storm_bench.py [--users 1000,10000] [--db URL] [--profile out.txt]
                                   [--concurrency 0]
`--profile`: py-spy (pip install 'threadline[bench]') on the server during the returning storm,
its top frames written there (out-<N>.txt for several sizes). Prints Markdown tables; not a test.

Why: issue 12 (3b) saw 1,000 returning users all past SyncComplete only after 12.4 s (81/s).
- bare: bench/echo_server.py; each stream sends 200 B and reads the echo.
- first-time: a `threadline serve` (tests/support/process.py) whose users sit in blocks of 10:
  a group thread each, the block's first user (hub) also in four threads with two others (1-3
  threads a user, 5 a hub), 3 messages a thread. That setup is not measured and the server
  restarts after it (cold caches). Then all N send a fresh Hello.
- returning: each hub sends one message per thread, received live by every member, whose cursor
  is then the highest change_seq it saw (mostly below the server's: the resume reads the log).
  The server is SIGKILLed, started on the same data dir and ports, and all N resume at once.

`all synced s`: until the last stream is past SyncComplete (its echo, for bare); p50/p99 per
connect from its call's start; rates and /proc CPU (server, local PostgreSQL with --db, this
client, and `other`: the rest of the machine in % of a core) per connect that got there.
Streams go 90 to a TCP connection (OWN_CONNECTION), one a user; failures are counted, not retried.

Limit: grpc core refuses new calls while those the application has not taken up yet number
between `grpc.server.max_pending_requests` (default 1,000) and `..._hard_limit` (3,000) at
random, beyond it all (CANCELLED, or INTERNAL when the first write was in flight,
grpc/grpc#36066). `threadline serve` raises both (server.max_pending_calls, 30,000) and so does
echo_server.py; `--concurrency N` caps the connects in flight from this client instead.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import (  # noqa: E402
    OWN_CONNECTION,
    CpuClock,
    EchoStream,
    Measured,
    drain_output,
    echo_server,
    mint_tokens,
    pct,
)
from bench.pingpong_bench import _start_profile, _stop_profile  # noqa: E402
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402

PER_CHANNEL = 90  # under the server's 100 concurrent streams per connection
BLOCK = 10  # users per group thread
MESSAGES = 3  # per thread, in the setup
TIMEOUT = 900.0  # per connect: a storm is slow, never give up on it
STARTED = time.perf_counter()


def _tree() -> str:
    """The server code measured: HEAD, and whether server/ differs from it (read-only git)."""
    git = shutil.which("git") or "/usr/bin/git"
    head = subprocess.run([git, "rev-parse", "--short", "HEAD"], capture_output=True, cwd=ROOT)
    dirty = subprocess.run([git, "diff", "--quiet", "HEAD", "--", "server"], cwd=ROOT)
    return head.stdout.decode().strip() + (" + uncommitted server/ changes" * dirty.returncode)


def progress(what: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)


@dataclass
class Storm(Measured):
    """messages: streams; deliver: per-connect seconds; delivered_s: until all were done."""

    failures: Counter[str] = field(default_factory=Counter)
    replayed: int = 0
    resynced: int = 0
    behind: int = 0  # resuming from a cursor below the server's
    limit: int = 0  # connects in flight at once (0: all)
    channels: list[grpc.aio.Channel] = field(default_factory=list)


def _channels(target: str, n: int) -> list[grpc.aio.Channel]:
    return [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        for _ in range(-(-n // PER_CHANNEL))
    ]


async def _storm(s: Storm, pid: int, attempts: list[Coroutine[Any, Any, None]]) -> None:
    """Runs the attempts, `s.limit` at a time (all at once for 0); fills the time, CPU and
    failures of `s`."""
    gate = asyncio.Semaphore(s.limit or len(attempts))

    async def gated(attempt: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await attempt

    clock = CpuClock.start(pid)
    results = await asyncio.gather(*map(gated, attempts), return_exceptions=True)
    s.delivered_s = time.perf_counter() - clock.wall
    clock.stop(s)
    for r in results:
        if isinstance(r, grpc.aio.AioRpcError):
            s.failures[f"{r.code().name}: {r.details()}"] += 1
        elif isinstance(r, BaseException):
            s.failures[f"{type(r).__name__}: {r}"[:120]] += 1


async def bare(n: int, limit: int) -> Storm:
    s = Storm(messages=n, limit=limit)
    with echo_server() as (port, pid):
        channels = _channels(f"127.0.0.1:{port}", n)

        async def one(i: int) -> None:
            start = time.perf_counter()
            stream = EchoStream(channels[i // PER_CHANNEL])
            stream.send(b"x" * 200)
            await stream.read()
            s.deliver.append(time.perf_counter() - start)

        await _storm(s, pid, [one(i) for i in range(n)])
        for channel in channels:
            await channel.close()  # cancels its calls
    return s


def _blocks(users: list[str]) -> list[list[list[str]]]:
    """Per block of users, its threads' members, the hub (creator) first."""
    out = []
    for b in range(0, len(users), BLOCK):
        members = users[b : b + BLOCK]
        pairs = [members[i : i + 2] for i in range(1, len(members), 2)][:4]
        out.append([members] + [[members[0], *pair] for pair in pairs])
    return out


async def setup(target: str, tokens: dict[str, str], users: list[str]) -> dict[str, list[str]]:
    """Creates the threads and their messages; returns each hub's thread ids."""
    hubs: dict[str, list[str]] = {}
    gate = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tsg.ThreadServiceStub(channel)

        async def block(threads: list[list[str]]) -> None:
            hub = threads[0][0]
            auth = (("authorization", f"Bearer {tokens[hub]}"),)
            async with gate:
                for members in threads:
                    thread = thread_pb2.Thread(title="storm", participant_ids=members[1:])
                    created = await stub.CreateThread(
                        ts.CreateThreadRequest(thread=thread), metadata=auth
                    )
                    hubs.setdefault(hub, []).append(created.thread.id)
                stream = RawStream(channel, tokens[hub])
                await stream.hello()
                for t, thread_id in enumerate(hubs[hub]):
                    for k in range(MESSAGES):
                        text = f"setup message {k} ".ljust(100, "x")
                        result = await stream.send_message(thread_id, text, f"s{t}-{k}", 60)
                        assert result.HasField("confirmed"), result
                stream.cancel()

        await asyncio.gather(*(block(threads) for threads in _blocks(users)))
    return hubs


async def connect_all(
    server: ServerProcess,
    tokens: dict[str, str],
    states: dict[str, rt.SyncState],
    opened: dict[str, RawStream],
    limit: int,
) -> Storm:
    """All users send Hello at once (resuming from `states` where they have one); keeps each
    stream in `opened` and its new cursor in `states`."""
    users = list(tokens)
    s = Storm(messages=len(users), limit=limit)
    s.channels = channels = _channels(server.target, len(users))

    async def one(i: int, user: str) -> None:
        start = time.perf_counter()
        stream = opened[user] = RawStream(channels[i // PER_CHANNEL], tokens[user])
        hello = rt.Hello(sync_state=states.get(user), client_name="storm")
        try:
            welcome = await stream.reply_to(stream.send(rt.ClientFrame(hello=hello)), TIMEOUT)
            if welcome.WhichOneof("kind") != "welcome":
                raise RuntimeError(f"{welcome.WhichOneof('kind')} instead of welcome")
            while (frame := await stream.recv(TIMEOUT)).WhichOneof("kind") != "sync_complete":
                s.resynced += frame.WhichOneof("kind") == "resync_required"
        except EOFError:  # RawStream keeps the status on the call
            code, details = await stream.call.code(), await stream.call.details()
            raise RuntimeError(f"{code.name}: {details}") from None
        s.deliver.append(time.perf_counter() - start)
        done = frame.sync_complete
        s.replayed += done.event_count
        states[user] = rt.SyncState(epoch=done.epoch, change_seq=done.change_seq)

    assert server.proc is not None
    await _storm(s, server.proc.pid, [one(i, u) for i, u in enumerate(users)])
    return s


def _apply(stream: RawStream, state: rt.SyncState) -> int:
    """Applies the events pushed so far to the cursor; returns how many message events."""
    seen = 0
    while not stream.pushes.empty():
        frame = stream.pushes.get_nowait()
        for e in frame.events.events if frame is not None else ():
            if e.change_seq:
                state.change_seq = max(state.change_seq, e.change_seq)
                state.thread_seqs[e.thread_id] = max(state.thread_seqs[e.thread_id], e.thread_seq)
                seen += e.kind == rt.EVENT_KIND_MESSAGE_CREATED
    return seen


async def live(
    hubs: dict[str, list[str]],
    users: list[str],
    states: dict[str, rt.SyncState],
    opened: dict[str, RawStream],
) -> None:
    """Each hub sends one message per thread on its stream; waits until every member has it."""

    async def hub(user: str) -> None:
        for t, thread_id in enumerate(hubs[user]):
            await opened[user].send_message(thread_id, "live ".ljust(100, "x"), f"l{t}", 120)

    await asyncio.gather(*(hub(u) for u in hubs if u in states), return_exceptions=True)
    blocks = [threads for threads in _blocks(users) if threads[0][0] in states]  # hub synced
    want = Counter(m for threads in blocks for members in threads for m in members)
    deadline = time.monotonic() + 60
    while want and time.monotonic() < deadline:
        for user in list(want):
            want[user] -= _apply(opened[user], states[user]) if user in states else want[user]
            if want[user] <= 0:
                del want[user]
        await asyncio.sleep(0.2)
    if want:
        print(f"warning: {len(want)} users missed live messages", file=sys.stderr)


async def close(opened: dict[str, RawStream], s: Storm) -> None:
    for stream in opened.values():
        stream.cancel()
    opened.clear()
    for channel in s.channels:
        await channel.close()


async def threadline(
    n: int, db: str, profile: str, limit: int
) -> tuple[Storm, Storm, ServerProcess]:
    with tempfile.TemporaryDirectory() as tmp:
        url = db or f"sqlite+aiosqlite:///{tmp}/bench.db"
        server = ServerProcess(Path(tmp) / "data", url, THREADLINE_LOG_LEVEL="WARNING")
        server.start()
        drain_output(server)
        try:
            users = [f"storm{i}" for i in range(n)]
            tokens = mint_tokens(server, users, ttl_s=4 * 3600)
            hubs = await setup(server.target, tokens, users)
            progress(f"setup done: {sum(map(len, hubs.values())):,} threads")
            server.terminate()
            server.start()  # cold caches, as a node that just started
            drain_output(server)
            await asyncio.sleep(1)
            states: dict[str, rt.SyncState] = {}
            opened: dict[str, RawStream] = {}
            first = await connect_all(server, tokens, states, opened, limit)
            progress(f"first-time storm: {first.delivered_s:.1f} s, {first.failures}")
            await live(hubs, users, states, opened)
            first_states = list(states.values())
            server.kill()  # the node dies with every stream open
            await close(opened, first)
            server.start()  # same data dir and ports
            drain_output(server)
            await asyncio.sleep(1)
            assert server.proc is not None
            top = max(st.change_seq for st in states.values())
            spy = _start_profile(server.proc.pid, profile)
            returning = await connect_all(server, tokens, states, opened, limit)
            progress(f"returning storm: {returning.delivered_s:.1f} s, {returning.failures}")
            returning.behind = sum(st.change_seq < top for st in first_states)
            _stop_profile(spy, profile)
            await close(opened, returning)
        finally:
            server.stop()
    return first, returning, server


def row(name: str, s: Storm, base: Storm, db: bool) -> str:
    ok, base_ok = len(s.deliver) or 1, len(base.deliver) or 1  # per connect that synced
    rate, base_rate = ok / s.delivered_s, base_ok / base.delivered_s
    cpu, base_cpu = s.server_cpu_s / ok * 1000, base.server_cpu_s / base_ok * 1000
    return (
        f"| {name} | {s.delivered_s:.2f} | {rate:,.0f} | {rate / base_rate:.3f}"
        f" | {pct(s.deliver, 0.5):,.0f} | {pct(s.deliver, 0.99):,.0f} | {cpu:.2f}"
        f" | {cpu / base_cpu:.1f} | {s.db_cpu_s / ok * 1000 if db else 0:.2f}"
        f" | {s.client_cpu_s / ok * 1000:.2f} | {100 * s.other_cpu_s / s.wall_s:.0f}%"
        f" | {sum(s.failures.values())} |"
    )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", default="1000,10000", help="comma-separated storm sizes")
    p.add_argument("--db", default="", help="database URL (default: SQLite in a temp dir)")
    p.add_argument("--profile", default="", help="write a py-spy summary of the server here")
    p.add_argument("--concurrency", type=int, default=0, help="connects in flight (0: all)")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the server inherits it
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = [int(x) for x in a.users.split(",")]
    db, tree = a.db.split("://")[0] if a.db else "sqlite", _tree()
    for n in sizes:
        out = a.profile
        if out and len(sizes) > 1:
            out = str(Path(out).with_name(f"{Path(out).stem}-{n}{Path(out).suffix}"))
        base = await bare(n, a.concurrency)
        progress(f"bare: {base.delivered_s:.1f} s, {base.failures}")
        first, returning, server = await threadline(n, a.db, out, a.concurrency)
        print(
            f"\nstorm of {n:,} users, db={db}, fd limit {soft}->{hard},"
            f" {a.concurrency or 'all'} connects in flight, tree {tree}"
        )
        print(
            "| case | all synced s | connects/s | x bare | p50 ms | p99 ms | server CPU ms"
            " | x bare | db CPU ms | client CPU ms | other CPU | failed |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(row("bare grpc.aio streams", base, base, False))
        print(row("threadline first-time", first, base, bool(a.db)))
        print(row("threadline returning", returning, base, bool(a.db)), flush=True)
        r = returning
        print(
            f"returning: {r.behind:,} of {n:,} cursors behind the server's, {r.replayed:,}"
            f" events replayed, {r.resynced} resyncs"
        )
        for name, s in (("bare", base), ("first-time", first), ("returning", returning)):
            for reason, count in s.failures.most_common(5):
                print(f"{name} failed x{count}: {reason}")
        noisy = [line.rstrip() for line in server.output if "WARNING" in line or "ERROR" in line]
        print(f"server log: {len(noisy)} warning/error lines", *noisy[:5], sep="\n  ")


if __name__ == "__main__":
    asyncio.run(main())
