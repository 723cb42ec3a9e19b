"""Delivery across cluster nodes (issue 13): 1, 2 and 3 real `threadline serve` processes sharing
one database and Redis, beside one node without Redis and a bare grpc.aio ping-pong of the same
run.

- one message in flight: alice sends on the first node, bob reads on the last one (the same
  node when there is one); send -> deliver p50 / p99, msgs/s, and the CPU of all nodes together
  per message (from /proc);
- a burst: alice pipelines `--burst` messages to a thread whose other participants have one
  stream each, spread round robin over the nodes; deliveries/s and nodes' CPU per delivery.

    python bench/cluster_bench.py [--db postgresql+asyncpg://postgres@127.0.0.1:5432/bench]

Timing lives here, never in tests. Each node reads other nodes' commits from the changes table
(cluster/delivery.py), so the figures include that read; see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import mint_tokens, pct, process_cpu_seconds  # noqa: E402
from bench.pingpong_bench import PAYLOAD, bare  # noqa: E402
from tests.support.process import ServerProcess  # noqa: E402
from tests.support.raw_stream import RawStream  # noqa: E402
from threadline.v1 import realtime_pb2 as rt  # noqa: E402
from threadline.v1 import thread_pb2  # noqa: E402
from threadline.v1 import thread_service_pb2 as ts  # noqa: E402
from threadline.v1 import thread_service_pb2_grpc as tsg  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"
WARMUP = 50


class Result:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.rate = 0.0
        self.cpu_per_message_ms = 0.0
        self.burst_deliveries_per_s = 0.0
        self.cpu_per_delivery_us = 0.0


def cpu(nodes: list[ServerProcess]) -> float:
    return sum(process_cpu_seconds(n.proc.pid) for n in nodes if n.proc is not None)


async def run(count: int, burst: int, subscribers: int, nodes_n: int, db: str) -> Result:
    out = Result()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        url = db or f"sqlite+aiosqlite:///{tmp}/bench.db"
        env = {"THREADLINE_LOG_LEVEL": "WARNING"}
        if nodes_n:
            env |= {
                "THREADLINE_CLUSTER__REDIS_URL": REDIS,
                "THREADLINE_CLUSTER__KEY_PREFIX": f"bench-{uuid.uuid4().hex}",
            }
        nodes = []
        for _ in range(max(1, nodes_n)):
            node = ServerProcess(Path(tmp) / "data", url, **env)
            node.start()
            stack.callback(node.stop)
            nodes.append(node)
        users = ["alice", "bob"] + [f"sub{i}" for i in range(subscribers)]
        tokens = [mint_tokens(n, users) for n in nodes]
        channels = [grpc.aio.insecure_channel(n.target) for n in nodes]
        try:
            thread = (
                await tsg.ThreadServiceStub(channels[0]).CreateThread(
                    ts.CreateThreadRequest(
                        thread=thread_pb2.Thread(title="bench", participant_ids=users[1:])
                    ),
                    metadata=(("authorization", f"Bearer {tokens[0]['alice']}"),),
                )
            ).thread.id
            alice = RawStream(channels[0], tokens[0]["alice"])
            bob = RawStream(channels[-1], tokens[-1]["bob"])
            await alice.hello()
            await bob.hello()
            run_id = uuid.uuid4().hex[:8]

            async def one(op: str) -> float:
                body = op.ljust(PAYLOAD, "x")
                sent = time.perf_counter()
                alice.send(
                    rt.ClientFrame(
                        send_message=rt.SendMessage(client_op_id=op, thread_id=thread, text=body)
                    )
                )
                while True:
                    frame = await bob.recv(timeout=30)
                    if frame.WhichOneof("kind") == "events" and any(
                        e.message.text == body for e in frame.events.events
                    ):
                        return time.perf_counter() - sent

            for i in range(WARMUP):
                await one(f"{run_id}-w{i}")
            before, start = cpu(nodes), time.perf_counter()
            for i in range(count):
                out.latencies.append(await one(f"{run_id}-m{i}"))
            elapsed = time.perf_counter() - start
            out.rate = count / elapsed
            out.cpu_per_message_ms = (cpu(nodes) - before) / count * 1000

            subs = [
                RawStream(channels[i % len(nodes)], tokens[i % len(nodes)][f"sub{i}"])
                for i in range(subscribers)
            ]
            for s in subs:
                await s.hello()
            before, start = cpu(nodes), time.perf_counter()
            for i in range(burst):
                body = f"{run_id}-b{i}"
                alice.send(
                    rt.ClientFrame(
                        send_message=rt.SendMessage(client_op_id=body, thread_id=thread, text=body)
                    )
                )
            await asyncio.gather(*(s.events(burst, timeout=60) for s in subs))
            elapsed = time.perf_counter() - start
            out.burst_deliveries_per_s = burst * subscribers / elapsed
            out.cpu_per_delivery_us = (cpu(nodes) - before) / (burst * subscribers) * 1e6
            for s in [alice, bob, *subs]:
                s.cancel()
        finally:
            for channel in channels:
                await channel.close()
    return out


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--burst", type=int, default=200)
    p.add_argument("--subscribers", type=int, default=30)
    p.add_argument("--db", default="", help="database URL (default: a temporary SQLite file)")
    a = p.parse_args()
    base = await bare(a.messages)
    base_rate = base.messages / base.delivered_s
    cases = [("one node, no Redis", 0), ("cluster of 1", 1), ("cluster of 2", 2)]
    cases.append(("cluster of 3", 3))
    results = [(name, await run(a.messages, a.burst, a.subscribers, n, a.db)) for name, n in cases]
    db = a.db.split("://")[0] if a.db else "sqlite"
    print(
        f"one message in flight ({a.messages}, first node -> last node) and a burst of "
        f"{a.burst} to {a.subscribers} subscribers over the nodes; db={db}"
    )
    print(
        f"{'case':<20}{'msgs/s':>8}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}{'cpu ms':>8}"
        f"{'burst dlv/s':>12}{'cpu us/dlv':>11}"
    )
    print(
        f"{'bare grpc.aio':<20}{base_rate:>8.0f}{1.0:>7.2f}{pct(base.deliver, 0.5):>8.2f}"
        f"{pct(base.deliver, 0.99):>8.2f}{base.server_cpu_s / base.messages * 1000:>8.3f}"
    )
    for name, r in results:
        print(
            f"{name:<20}{r.rate:>8.0f}{r.rate / base_rate:>7.2f}{pct(r.latencies, 0.5):>8.2f}"
            f"{pct(r.latencies, 0.99):>8.2f}{r.cpu_per_message_ms:>8.3f}"
            f"{r.burst_deliveries_per_s:>12.0f}{r.cpu_per_delivery_us:>11.1f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
