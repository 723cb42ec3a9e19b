"""Send-path benchmark: messages/s and send→ack / send→deliver latency through a real
`threadline serve`, beside a bare grpc.aio echo measured in the same run (ratios).

Usage: python bench/send_bench.py [--senders 8] [--messages 300] [--subscribers 10] [--db URL]
Prints a table; not a test (nothing asserts on time).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import echo_baseline, pct  # noqa: E402
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402


async def threadline(senders: int, messages: int, subscribers: int, db: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        url = db or f"sqlite+aiosqlite:///{tmp}/bench.db"
        proc = ServerProcess(
            Path(tmp) / "data",
            url,
            THREADLINE_LOG_LEVEL="WARNING",
            THREADLINE_REALTIME__QUEUE_MAX_FRAMES="100000",
        )
        proc.start()
        try:
            token = proc.cli("token", "sender", "--ttl", "3600")
            async with grpc.aio.insecure_channel(proc.target) as channel:
                # Distinct sender users: a user may hold only 5 streams (the cap closes the oldest).
                writers = [f"sender{i}" for i in range(senders)]
                members = [f"sub{i}" for i in range(subscribers)]
                thread = (
                    await tsg.ThreadServiceStub(channel).CreateThread(
                        ts.CreateThreadRequest(
                            thread=thread_pb2.Thread(
                                title="bench", participant_ids=members + writers
                            )
                        ),
                        metadata=(("authorization", f"Bearer {token}"),),
                    )
                ).thread.id
                subs = [RawStream(channel, proc.cli("token", m, "--ttl", "3600")) for m in members]
                for s in subs:
                    await s.hello()
                streams = [
                    RawStream(channel, proc.cli("token", w, "--ttl", "3600")) for w in writers
                ]
                for s in streams:
                    await s.hello()
                sent_at: dict[str, float] = {}
                acks: list[float] = []

                async def sender(i: int, s: RawStream) -> None:
                    async def one(n: int) -> None:
                        op = f"b{i}-{n}"
                        sent_at[op] = time.perf_counter()
                        result = await s.send_message(thread, "x" * 200, op)
                        if result.WhichOneof("outcome") != "confirmed":
                            raise RuntimeError(f"send failed: {result}")
                        acks.append(time.perf_counter() - sent_at[op])

                    await asyncio.gather(*(one(n) for n in range(messages)))

                deliveries: list[float] = []
                start = time.perf_counter()
                total = senders * messages
                sub_task = asyncio.gather(
                    *(subscriber_by_seq(s, total, deliveries, start) for s in subs)
                )
                await asyncio.gather(*(sender(i, s) for i, s in enumerate(streams)))
                send_elapsed = time.perf_counter() - start
                await sub_task
                total_elapsed = time.perf_counter() - start
                for s in [*subs, *streams]:
                    s.cancel()
        finally:
            proc.stop()
    n = senders * messages
    return {
        "sends_per_s": n / send_elapsed,
        "deliveries_per_s": n * subscribers / total_elapsed,
        "ack_p50": pct(acks, 0.5),
        "ack_p99": pct(acks, 0.99),
        "all_delivered_s": max(deliveries) if deliveries else 0.0,
    }


async def subscriber_by_seq(s: RawStream, total: int, out: list[float], start: float) -> None:
    """Records when this subscriber has received every message (seconds from the start)."""
    got = 0
    while got < total:
        try:
            frame = await s.recv(timeout=20)
        except TimeoutError:
            print("subscriber stuck at", got, "of", total, flush=True)
            raise
        got += len(frame.events.events)
    out.append(time.perf_counter() - start)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--subscribers", type=int, default=10)
    p.add_argument("--db", default="")
    a = p.parse_args()
    echo_rate, echo_lat = await echo_baseline(a.senders, a.messages)
    t = await threadline(a.senders, a.messages, a.subscribers, a.db)
    print(
        f"senders={a.senders} messages/sender={a.messages} subscribers={a.subscribers} "
        f"db={a.db or 'sqlite'}"
    )
    print(f"{'case':<34}{'value':>12}")
    print(f"{'bare grpc.aio echo msgs/s':<34}{echo_rate:>12.0f}")
    print(f"{'echo p50 / p99 ms':<34}{pct(echo_lat, 0.5):>6.1f} / {pct(echo_lat, 0.99):.1f}")
    print(f"{'threadline durable sends/s':<34}{t['sends_per_s']:>12.0f}")
    print(f"{'  ratio to echo':<34}{t['sends_per_s'] / echo_rate:>12.2f}")  # type: ignore[operator]
    print(f"{'send→ack p50 / p99 ms':<34}{t['ack_p50']:>6.1f} / {t['ack_p99']:.1f}")
    print(f"{'deliveries/s (all subscribers)':<34}{t['deliveries_per_s']:>12.0f}")


if __name__ == "__main__":
    asyncio.run(main())
