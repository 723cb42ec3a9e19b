"""One message at a time: user A sends, waits until user B's stream has it, sends the next.
Beside a bare grpc.aio ping-pong (one bidirectional stream, one 200-byte payload in flight)
measured in the same run: rate, p50/p99 and server CPU per message from /proc, as ratios.

Usage: python bench/pingpong_bench.py [--messages 2000] [--db URL] [--profile out.txt]
`--profile` runs py-spy (pip install 'threadline[bench]') against the server during the
Threadline run and writes its top frames. Prints a table; not a test (nothing asserts on time).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import (  # noqa: E402
    CpuClock,
    EchoStream,
    Measured,
    echo_server,
    mint_tokens,
    pct,
)
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402

PAYLOAD = 200
WARMUP = 50


async def bare(count: int) -> Measured:
    """The transport's floor: one echo stream, one payload in flight at a time."""
    payload = b"x" * PAYLOAD
    m = Measured(messages=count)
    with echo_server() as (port, pid):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = EchoStream(channel)
            for _ in range(WARMUP):
                stream.send(payload)
                await stream.read()
            clock = CpuClock.start(pid)
            start = time.perf_counter()
            for _ in range(count):
                sent = time.perf_counter()
                stream.send(payload)
                await stream.read()
                m.deliver.append(time.perf_counter() - sent)
            m.acked_s = m.delivered_s = time.perf_counter() - start
            clock.stop(m)
            stream.close()
    m.deliveries = count
    return m


async def threadline(
    count: int, db: str, profile: str, sqlite_sync: str, loop: str = "asyncio"
) -> Measured:
    m = Measured(messages=count)
    with tempfile.TemporaryDirectory() as tmp:
        url = db or f"sqlite+aiosqlite:///{tmp}/bench.db"
        proc = ServerProcess(
            Path(tmp) / "data",
            url,
            THREADLINE_LOG_LEVEL="WARNING",
            THREADLINE_DATABASE__SQLITE_SYNCHRONOUS=sqlite_sync,
            THREADLINE_SERVER__EVENT_LOOP=loop,
        )
        proc.start()
        assert proc.proc is not None
        try:
            tokens = mint_tokens(proc, ["alice", "bob"])
            async with grpc.aio.insecure_channel(proc.target) as channel:
                thread = (
                    await tsg.ThreadServiceStub(channel).CreateThread(
                        ts.CreateThreadRequest(
                            thread=thread_pb2.Thread(title="bench", participant_ids=["bob"])
                        ),
                        metadata=(("authorization", f"Bearer {tokens['alice']}"),),
                    )
                ).thread.id
                alice, bob = RawStream(channel, tokens["alice"]), RawStream(channel, tokens["bob"])
                await alice.hello()
                await bob.hello()

                run = uuid.uuid4().hex[:8]  # op ids of their own: a database may be reused

                async def one(op: str) -> float:
                    # client_op_id is on the author's own events only: match bob's by text.
                    body = op.ljust(PAYLOAD, "x")
                    sent = time.perf_counter()
                    alice.send(
                        rt.ClientFrame(
                            send_message=rt.SendMessage(
                                client_op_id=op, thread_id=thread, text=body
                            )
                        )
                    )
                    while True:
                        frame = await bob.recv(timeout=30)
                        if frame.WhichOneof("kind") == "events" and any(
                            e.message.text == body for e in frame.events.events
                        ):
                            return time.perf_counter() - sent

                for i in range(WARMUP):
                    await one(f"{run}-w{i}")
                spy = _start_profile(proc.proc.pid, profile)
                clock = CpuClock.start(proc.proc.pid)
                start = time.perf_counter()
                for i in range(count):
                    m.deliver.append(await one(f"{run}-m{i}"))
                m.acked_s = m.delivered_s = time.perf_counter() - start
                clock.stop(m)
                _stop_profile(spy, profile)
                alice.cancel()
                bob.cancel()
        finally:
            proc.stop()
    m.deliveries = count
    return m


def _start_profile(pid: int, out: str) -> subprocess.Popen[bytes] | None:
    if not out:
        return None
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--gil",
            "--rate",
            "250",
            "--output",
            out + ".raw",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_profile(spy: subprocess.Popen[bytes] | None, out: str) -> None:
    if spy is None:
        return
    spy.send_signal(2)  # SIGINT: py-spy writes what it has
    spy.wait(30)
    from bench.profile_summary import summarize

    Path(out).write_text(summarize(Path(out + ".raw").read_text()))


def row(name: str, m: Measured, base: Measured) -> str:
    rate = m.messages / m.delivered_s
    base_rate = base.messages / base.delivered_s
    cpu_ms = m.server_cpu_s / m.messages * 1000
    base_cpu = base.server_cpu_s / base.messages * 1000
    return (
        f"{name:<26}{rate:>9.0f}{rate / base_rate:>8.2f}"
        f"{pct(m.deliver, 0.5):>8.2f}{pct(m.deliver, 0.99):>8.2f}"
        f"{cpu_ms:>9.3f}{cpu_ms / base_cpu:>8.1f}{m.db_cpu_s / m.messages * 1000:>8.3f}"
    )


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--db", default="", help="database URL (default: a temporary SQLite file)")
    p.add_argument("--sqlite-synchronous", default="FULL")
    p.add_argument("--profile", default="", help="write a py-spy summary of the server here")
    p.add_argument(
        "--event-loop",
        default="asyncio",
        help="the server's server.event_loop; `both` runs asyncio, then uvloop (SQLite only: "
        "each run needs a database of its own)",
    )
    a = p.parse_args()
    if a.event_loop == "both" and a.db:
        p.error("--event-loop both needs the default SQLite (one fresh database per run)")
    base = await bare(a.messages)
    loops = ["asyncio", "uvloop"] if a.event_loop == "both" else [a.event_loop]
    runs = [
        (loop, await threadline(a.messages, a.db, a.profile, a.sqlite_synchronous, loop))
        for loop in loops
    ]
    db = a.db.split("://")[0] if a.db else f"sqlite synchronous={a.sqlite_synchronous}"
    print(f"one message in flight, {a.messages} messages, {PAYLOAD} B, db={db}")
    print(
        f"{'case':<26}{'msgs/s':>9}{'ratio':>8}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'srv ms':>9}{'x bare':>8}{'db ms':>8}"
    )
    print(row("bare grpc.aio ping-pong", base, base))
    for loop, t in runs:
        print(
            row("threadline send->deliver" + ("" if loop == "asyncio" else f" ({loop})"), t, base)
        )


if __name__ == "__main__":
    asyncio.run(main())
