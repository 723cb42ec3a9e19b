"""The cluster's write ceiling on PostgreSQL (issue 13): every write transaction of every node
takes the one `server_state` row lock to reserve its change cursors (that is what keeps
change_seq gapless and in commit order), so the whole cluster commits one transaction at a time
through that row. How many group commits and messages a second does it take here?

K connections stand for K nodes' send writers; each runs the real send transaction (the
`threadline_send_batch` function of migration 0004, synchronous_commit on) in a loop with
batches of B messages, to a thread of its own (so only server_state is shared) or all to one
thread (its row is shared too). No gRPC, no Python server: this is the database's limit.

    python bench/write_ceiling_bench.py --db postgresql+asyncpg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import pct  # noqa: E402
from threadline_server.storage.db import (  # noqa: E402
    Database,
    ensure_server_state,
    migrate,
)

CALL = "SELECT * FROM threadline_send_batch($1, $2, $3, $4, $5, $6, $7, 1)"


async def connect(url: str) -> asyncpg.Connection:
    u = make_url(url)
    return await asyncpg.connect(
        host=u.host,
        port=u.port,
        user=u.username,
        password=u.password,
        database=u.database,
        server_settings={"synchronous_commit": "on"},
    )


async def setup(url: str, threads: int) -> list[str]:
    await migrate(url)
    db = Database(url, pool_size=2, query_timeout_s=30, slow_query_s=10)
    try:
        await ensure_server_state(db, uuid.uuid4().hex)
    finally:
        await db.dispose()
    conn = await connect(url)
    ids = [uuid.uuid4().hex for _ in range(threads)]
    now = datetime.now(UTC)
    await conn.executemany(
        "INSERT INTO threads (id, title, creator_id, created_at, updated_at, last_activity_at)"
        " VALUES ($1, 'ceiling', 'writer', $2, $2, $2)",
        [(t, now) for t in ids],
    )
    await conn.executemany(
        "INSERT INTO thread_members (thread_id, user_id, joined_at) VALUES ($1, 'writer', $2)",
        [(t, now) for t in ids],
    )
    await conn.close()
    return ids


async def writer(url: str, thread: str, batch: int, until: float, latencies: list[float]) -> int:
    conn = await connect(url)
    text = "x" * 200
    digest = hashlib.sha256(text.encode()).digest()
    sent = 0
    try:
        while time.perf_counter() < until:
            ops = [uuid.uuid4().hex for _ in range(batch)]
            started = time.perf_counter()
            await conn.fetch(
                CALL,
                ["writer"] * batch,
                ops,
                [thread] * batch,
                [text] * batch,
                [digest] * batch,
                [uuid.uuid4().hex for _ in range(batch)],
                datetime.now(UTC),
            )
            latencies.append(time.perf_counter() - started)
            sent += batch
    finally:
        await conn.close()
    return sent


async def case(url: str, threads: list[str], writers: int, batch: int, shared: bool, s: float):
    latencies: list[float] = []
    until = time.perf_counter() + s
    started = time.perf_counter()
    sent = await asyncio.gather(
        *(
            writer(url, threads[0] if shared else threads[i], batch, until, latencies)
            for i in range(writers)
        )
    )
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, sum(sent) / elapsed, latencies


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True, help="a PostgreSQL database of its own (not `test`)")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    threads = await setup(a.db, 16)
    print(f"write ceiling, {a.seconds:.0f} s per case, synchronous_commit on")
    print(
        f"{'writers':>8}{'batch':>7}{'threads':>9}{'txn/s':>9}{'msgs/s':>9}"
        f"{'p50 ms':>8}{'p99 ms':>8}"
    )
    for writers in (1, 3, 8, 16):
        for batch in (1, 10, 100):
            for shared in (False, True):
                if shared and writers == 1:
                    continue
                txn, msgs, lat = await case(a.db, threads, writers, batch, shared, a.seconds)
                print(
                    f"{writers:>8}{batch:>7}{'one' if shared else 'own':>9}{txn:>9.0f}"
                    f"{msgs:>9.0f}{pct(lat, 0.5):>8.2f}{pct(lat, 0.99):>8.2f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
