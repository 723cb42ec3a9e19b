"""A statement stuck longer than the query timeout is cancelled on the database side and the RPC
answers with a clear, retryable status; nothing is half written."""

from __future__ import annotations

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
            url = make_url(db_url)
            if url.get_backend_name() == "postgresql":
                # Another session holds the thread's row lock: the archive's UPDATE waits, and
                # PostgreSQL's statement_timeout (= query timeout) cancels it.
                blocker = await asyncpg.connect(
                    host=url.host, port=url.port, user=url.username, database=url.database
                )
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", thread)
                expected, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DB_TIMEOUT"
            else:
                # Another process holds SQLite's write lock: the write gives up after the timeout.
                blocker_sqlite = sqlite3.connect(url.database or "", isolation_level=None)
                blocker_sqlite.execute("BEGIN IMMEDIATE")
                expected, reason = grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ArchiveThread(
                        ts.ArchiveThreadRequest(thread_id=thread), metadata=meta, timeout=10
                    )
                assert err.value.code() == expected
                assert details(err.value)["reason"] == reason
            finally:
                if url.get_backend_name() == "postgresql":
                    await tx.rollback()
                    await blocker.close()
                else:
                    blocker_sqlite.execute("ROLLBACK")
                    blocker_sqlite.close()
            got = await stub.GetThread(ts.GetThreadRequest(thread_id=thread), metadata=meta)
            assert not got.thread.thread.archived and got.thread.thread.version == 1
            again = await stub.ArchiveThread(
                ts.ArchiveThreadRequest(thread_id=thread), metadata=meta
            )
            assert again.thread.archived  # the server is fine afterwards
    finally:
        await app.stop(grace=0.5)
