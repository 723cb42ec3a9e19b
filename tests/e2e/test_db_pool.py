"""Database load controls: the pool is bounded at its size with no overflow, and on PostgreSQL
the hot statements run as prepared statements (asyncpg's per-connection statement cache)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream


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

    # Every connection the server used has its statements prepared once and reused.
    prepared = 0
    held = []
    try:
        for _ in range(pool.checkedin()):
            conn = await server.db.engine.connect()
            held.append(conn)
            prepared += (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_prepared_statements "
                        "WHERE statement LIKE 'INSERT INTO messages %'"
                    )
                )
            ).scalar_one()
    finally:
        await asyncio.gather(*(c.close() for c in held))
    assert prepared >= 1  # the send path's INSERT, prepared on the connection that ran it
