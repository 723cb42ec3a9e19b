"""Database load controls: the pool is bounded at its size with no overflow, and on PostgreSQL
the send path's statements run as prepared statements (asyncpg's per-connection statement cache),
each prepared once and reused."""

from __future__ import annotations

import pytest

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline_server.storage.hot import postgres
from threadline_server.storage.hot.postgres import PostgresSendWriter


async def test_pool_is_bounded_and_hot_statements_are_prepared(server, channel, token, db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("prepared statements and the pool size are PostgreSQL settings here")
    pool = server.db.engine.pool
    assert pool.size() == server.settings.database.pool_size == 20
    assert pool._max_overflow == 0  # type: ignore[attr-defined]

    thread = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    for i in range(5):
        await alice.send_message(thread, f"m{i}", f"op-{i}")
    alice.cancel()

    # The send transaction is one call on the send writer's own connection (storage.hot.
    # postgres), prepared once there and run for every send since.
    writer = server.db.send_writer
    assert isinstance(writer, PostgresSendWriter)
    conn = writer._conn
    assert conn is not None
    runs = await conn.fetchval(
        "SELECT coalesce(max(generic_plans + custom_plans), 0) FROM pg_prepared_statements"
        " WHERE statement = $1",
        postgres._CALL,
    )
    assert runs >= 5, runs
