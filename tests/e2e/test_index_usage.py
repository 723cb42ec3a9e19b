"""Every hot query uses an index at realistic table sizes (EXPLAIN on both databases).

The statements are not written out here: they are captured from a real workload (send, history
page, thread list with unread counts, resume replay, read marker) run against the server, then
explained against tables filled to tens of thousands of rows."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, insert, text

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.storage.tables import (
    changes,
    messages,
    operations,
    thread_members,
    threads,
)

BIG_TABLES = ("messages", "changes", "thread_members", "threads", "operations")


async def _fill(app: Any, n_threads: int = 20_000, per_thread: int = 5) -> None:
    """20,000 threads of 500 users (each in ~160 threads), 100,000 messages and changes."""
    now = datetime.now(UTC)
    async with app.db.engine.begin() as conn:
        await conn.execute(
            insert(threads),
            [
                {
                    "id": f"t{i:05d}",
                    "title": "x",
                    "creator_id": "u0",
                    "last_seq": per_thread,
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                    "last_activity_at": now - timedelta(seconds=i),
                    "tags": "[]",
                }
                for i in range(n_threads)
            ],
        )
        await conn.execute(
            insert(thread_members),
            [
                {
                    "thread_id": f"t{i:05d}",
                    "user_id": f"u{(i + k * 125) % 500}",
                    "read_seq": 0,
                    "joined_at": now,
                }
                for i in range(n_threads)
                for k in range(4)
            ],
        )
        rows, change_rows = [], []
        for i in range(n_threads):
            for s in range(1, per_thread + 1):
                mid = f"m{i:05d}{s:04d}"
                rows.append(
                    {
                        "id": mid,
                        "thread_id": f"t{i:05d}",
                        "seq": s,
                        "author_id": "u1",
                        "text": "hello",
                        "version": 1,
                        "deleted": False,
                        "created_at": now,
                    }
                )
                change_rows.append(
                    {
                        "change_seq": 1_000_000 + i * per_thread + s,
                        "thread_id": f"t{i:05d}",
                        "user_id": None,
                        "kind": 1,
                        "thread_seq": s,
                        "version": 1,
                        "actor_id": "u1",
                        "resource_id": mid,
                        "client_op_id": "",
                        "created_at": now,
                    }
                )
        await conn.execute(insert(messages), rows)
        await conn.execute(insert(changes), change_rows)
        await conn.execute(
            insert(operations),
            [
                {
                    "user_id": f"u{i % 50}",
                    "client_op_id": f"op{i}",
                    "payload_hash": b"0" * 32,
                    "resource_kind": "message",
                    "resource_id": f"m{i}",
                    "change_seq": i,
                    "result_version": 1,
                    "created_at": now,
                }
                for i in range(20_000)
            ],
        )
        await conn.execute(text("ANALYZE"))


# Known and accepted: on PostgreSQL the thread list joins the caller's memberships (found by
# ix_thread_members_user) to threads with a hash join, and the planner reads all 20,000 threads
# rather than probing the primary key ~160 times, which it costs higher at this size. Ordering
# by activity across memberships without reading threads needs the activity time denormalized
# into thread_members (a write per member on every send); that trade is left for later.
ACCEPTED = {("postgresql", "FROM threads JOIN thread_members ON", "threads")}


def _full_scans(dialect: str, plan: str, statement: str = "") -> list[str]:
    found = _scans(dialect, plan)
    return [
        t
        for t in found
        if not any(d == dialect and frag in statement and t == table for d, frag, table in ACCEPTED)
    ]


def _scans(dialect: str, plan: str) -> list[str]:
    if dialect == "sqlite":
        # "SCAN t" is a full scan; "SEARCH t USING ..." and "SCAN t USING COVERING INDEX" are not.
        return [t for t in BIG_TABLES if re.search(rf"\bSCAN {t}\b(?! USING)", plan)]
    return [t for t in BIG_TABLES if re.search(rf"Seq Scan on {t}\b", plan)]


async def test_hot_queries_use_indexes(server, channel, token):
    app = server
    await _fill(app)
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool):
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            captured.append((statement, params))

    event.listen(app.db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        thread = await create_thread(channel, token("u1"), "u2")
        alice = RawStream(channel, token("u1"))
        welcome = await alice.hello()
        for i in range(3):
            await alice.send_message(thread, f"m{i}", f"idx-{i}")
        stub = tsg.ThreadServiceStub(channel)
        meta = bearer(token("u1"))
        await stub.ListMessages(
            ts.ListMessagesRequest(thread_id="t00001", page_size=50), metadata=meta
        )
        await stub.ListThreads(ts.ListThreadsRequest(page_size=50), metadata=meta)
        await stub.MarkRead(ts.MarkReadRequest(thread_id="t00001", read_seq=10), metadata=meta)
        alice.cancel()
        again = RawStream(channel, token("u1"))
        rid = again.send(
            rt.ClientFrame(
                hello=rt.Hello(
                    sync_state=rt.SyncState(epoch=welcome.epoch, change_seq=1_000_000 + 250 * 100)
                )
            )
        )
        await again.reply_to(rid)
        await again.recv()
        again.cancel()
    finally:
        event.remove(app.db.engine.sync_engine, "before_cursor_execute", capture)

    dialect = app.db.dialect
    prefix = "EXPLAIN QUERY PLAN " if dialect == "sqlite" else "EXPLAIN "
    offenders: dict[str, list[str]] = {}
    seen: set[str] = set()
    async with app.db.engine.connect() as conn:
        for statement, params in captured:
            if statement in seen:
                continue
            seen.add(statement)
            result = await conn.exec_driver_sql(prefix + statement, params)
            plan = "\n".join(" ".join(str(c) for c in row) for row in result)
            scans = _full_scans(dialect, plan, statement)
            if scans:
                offenders[statement] = [*scans, plan]
    assert len(seen) >= 8, "the workload should exercise the hot queries"
    assert not offenders, offenders
