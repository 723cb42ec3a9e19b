"""A statement stuck longer than the query timeout is cancelled on the database side and the RPC
answers with a clear, retryable status; nothing is half written."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.rpc import details
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer


async def test_query_timeout_cancels_the_statement(settings_factory, db_url):
    app = ThreadlineServer(settings_factory(database={"query_timeout_s": 1.0, "slow_query_s": 0.5}))
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            stub = tsg.ThreadServiceStub(channel)
            meta = bearer(app.mint("alice", 600))
            # PostgreSQL's statement_timeout (= query timeout) cancels the waiting UPDATE; SQLite's
            # writer gives up waiting for the write lock after the timeout.
            lock = await LockHolder.take(db_url, thread)
            if lock.postgres:
                expected, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DB_TIMEOUT"
            else:
                expected, reason = grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ArchiveThread(
                        ts.ArchiveThreadRequest(thread_id=thread), metadata=meta, timeout=10
                    )
                assert err.value.code() == expected
                assert details(err.value)["reason"] == reason
            finally:
                await lock.release()
            got = await stub.GetThread(ts.GetThreadRequest(thread_id=thread), metadata=meta)
            assert not got.thread.thread.archived and got.thread.thread.version == 1
            again = await stub.ArchiveThread(
                ts.ArchiveThreadRequest(thread_id=thread), metadata=meta
            )
            assert again.thread.archived  # the server is fine afterwards
    finally:
        await app.stop(grace=0.5)


async def test_slow_query_is_logged_with_duration_caller_and_request_id(
    settings_factory, db_url, caplog
):
    app = ThreadlineServer(settings_factory(database={"query_timeout_s": 5.0, "slow_query_s": 0.3}))
    endpoints = await app.start()
    caplog.set_level(logging.WARNING, logger="threadline_server.storage.db")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            # Hold the lock the archive needs for 0.6 s: slower than 0.3 s, within the timeout.
            lock = await LockHolder.take(db_url, thread)
            release = asyncio.create_task(lock.release(after=0.6))
            meta = (*bearer(app.mint("alice", 600)), ("x-request-id", "req-slow-1"))
            done = await tsg.ThreadServiceStub(channel).ArchiveThread(
                ts.ArchiveThreadRequest(thread_id=thread), metadata=meta, timeout=10
            )
            assert done.thread.archived
            await release
        [slow] = [r for r in caplog.records if r.getMessage().startswith("slow query")]
        assert slow.duration_s >= 0.3  # type: ignore[attr-defined]
        assert slow.statement  # type: ignore[attr-defined]
        assert slow.caller.startswith("threadline_server.storage.store_threads.")  # type: ignore[attr-defined]
        assert slow.request_id == "req-slow-1"  # type: ignore[attr-defined]
        assert (slow.rpc, slow.user) == ("ArchiveThread", "alice")  # type: ignore[attr-defined]
        text = app.metrics.render().decode()
        assert "threadline_slow_queries_total 1.0" in text
    finally:
        await app.stop(grace=0.5)


class LockHolder:
    """Another session holding what an archive needs: the thread's row lock on PostgreSQL, the
    database's write lock on SQLite (another process would hold it the same way)."""

    def __init__(self, pg: asyncpg.Connection | None, sqlite: sqlite3.Connection | None) -> None:
        self.pg, self.sqlite = pg, sqlite
        self.postgres = pg is not None

    @classmethod
    async def take(cls, db_url: str, thread_id: str) -> LockHolder:
        url = make_url(db_url)
        if url.get_backend_name() != "postgresql":
            conn = sqlite3.connect(url.database or "", isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            return cls(None, conn)
        pg = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        await pg.execute("BEGIN")
        await pg.execute("SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", thread_id)
        return cls(pg, None)

    async def release(self, after: float = 0.0) -> None:
        await asyncio.sleep(after)
        if self.pg is not None:
            await self.pg.execute("ROLLBACK")
            await self.pg.close()
        if self.sqlite is not None:
            self.sqlite.execute("ROLLBACK")
            self.sqlite.close()
