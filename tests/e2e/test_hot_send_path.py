"""The driver-level send transaction (storage.hot) on SQLite and PostgreSQL: it decides exactly as
the engine's path does, writes rows every other reader parses, fails cleanly on a lock timeout
with nothing written, and survives the database dropping its connection."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tests.conftest import bearer
from tests.e2e.test_db_timeout import LockHolder
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from tests.support.rpc import status_details
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer
from threadline_server.domain.ports import SendItem, SendOutcome
from threadline_server.domain.validation import payload_hash
from threadline_server.errors import DomainError
from threadline_server.storage.tables import changes, messages, operations


def item(user: str, op: str, thread: str, text: str) -> SendItem:
    return SendItem(user, op, thread, text, payload_hash("send", thread_id=thread, text=text))


def shape(outcome: SendOutcome | DomainError, prefix: str) -> tuple[object, ...]:
    """An outcome without what differs between two threads (ids, cursors)."""
    if isinstance(outcome, DomainError):
        return (type(outcome).__name__, outcome.reason)
    m = outcome.message
    return ("sent", m.seq, m.author_id, m.text.removeprefix(prefix), m.version, outcome.replayed)


async def rows(server: ThreadlineServer, thread: str) -> list[tuple[object, ...]]:
    """What the batch wrote for `thread`, in cursor order, without ids and cursors."""
    async with server.db.read() as conn:
        found = (
            await conn.execute(
                select(
                    changes.c.kind,
                    changes.c.thread_seq,
                    changes.c.version,
                    changes.c.actor_id,
                    changes.c.user_id,
                    changes.c.client_op_id,
                    messages.c.seq,
                    messages.c.text,
                    messages.c.deleted,
                    operations.c.resource_kind,
                    operations.c.result_version,
                    operations.c.change_seq == changes.c.change_seq,
                )
                .join(messages, messages.c.id == changes.c.resource_id)
                .join(
                    operations,
                    (operations.c.user_id == changes.c.actor_id)
                    & (operations.c.client_op_id == changes.c.client_op_id),
                )
                .where(changes.c.thread_id == thread)
                .order_by(changes.c.change_seq)
            )
        ).all()
    return [(*r[:5], r[5].split("-", 1)[1], r[6], r[7].split("-", 1)[1], *r[8:]) for r in found]


async def test_hot_path_decides_and_writes_as_the_engine_path(server, channel, token):
    assert server.db.send_writer is not None  # this database takes the hot path
    store = server.store
    outcomes: dict[str, list[tuple[object, ...]]] = {}
    for name in ("hot", "engine"):
        thread = await create_thread(channel, token("alice"), "bob")
        second = await create_thread(channel, token("bob"), "alice")
        p = f"{name}-"
        first = [item("alice", f"{p}earlier", thread, f"{p}earlier")]
        batch = [
            item("alice", f"{p}a1", thread, f"{p}one"),
            item("bob", f"{p}b1", thread, f"{p}two"),
            item("alice", f"{p}a1", thread, f"{p}one"),  # the same op twice in one batch
            item("alice", f"{p}a1", thread, f"{p}other"),  # its key reused for another text
            item("carol", f"{p}c1", thread, f"{p}outsider"),  # not a participant
            item("alice", f"{p}earlier", thread, f"{p}earlier"),  # a replay of a commit
            item("alice", f"{p}earlier", thread, f"{p}changed"),  # a reused committed key
            item("bob", f"{p}b2", thread, f"{p}three"),
            item("bob", f"{p}b3", second, f"{p}elsewhere"),  # a second thread, its own seqs
            item("alice", f"{p}a2", second, f"{p}there"),
            item("alice", f"{p}a3", thread, f"{p}four"),
        ]
        if name == "hot":
            await store.send_messages(first)
            got = await store.send_messages(batch)
        else:  # the engine's transaction, as sends with attachments take it
            await store._send_batch(first)
            got = await store._send_batch(batch)
        outcomes[name] = [shape(o, p) for o in got]
        outcomes[f"{name} rows"] = await rows(server, thread) + await rows(server, second)
    assert outcomes["hot"] == outcomes["engine"]
    assert outcomes["hot rows"] == outcomes["engine rows"]
    assert [o[0] for o in outcomes["hot"]] == [
        "sent",
        "sent",
        "sent",
        "IdempotencyKeyReused",
        "NotFound",
        "sent",
        "IdempotencyKeyReused",
        "sent",
        "sent",
        "sent",
        "sent",
    ]
    assert [o[1] for o in outcomes["hot"] if o[0] == "sent"] == [2, 3, 2, 1, 4, 1, 2, 5]


async def test_hot_path_rows_read_back_exactly(channel, token):
    thread = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    sent = (await alice.send_message(thread, "hello", "op-1")).confirmed.message
    page = await tsg.ThreadServiceStub(channel).ListMessages(
        ts.ListMessagesRequest(thread_id=thread, page_size=10), metadata=bearer(token("bob"))
    )
    [listed] = page.messages
    assert (listed.id, listed.seq, listed.text, listed.version) == (sent.id, 1, "hello", 1)
    assert listed.create_time == sent.create_time  # to the microsecond, time zone included
    alice.cancel()


async def test_send_behind_a_held_lock_fails_retryably_and_writes_nothing(settings_factory, db_url):
    app = ThreadlineServer(settings_factory(database={"query_timeout_s": 1.0}))
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            alice = RawStream(channel, app.mint("alice", 600))
            await alice.hello()
            lock = await LockHolder.take(db_url, thread)
            try:
                failed = await alice.send_message(thread, "held", "op-held", timeout=15)
            finally:
                await lock.release()
            if lock.postgres:
                expected, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DB_TIMEOUT"
            else:
                expected, reason = grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"
            assert failed.rejected.code == expected.value[0]
            assert status_details(failed.rejected)["reason"] == reason
            # The retry with the same op id is the first write: seq 1, not a replay.
            again = await alice.send_message(thread, "held", "op-held")
            assert again.confirmed.message.seq == 1 and not again.replayed
            alice.cancel()
    finally:
        await app.stop(grace=0.5)


async def test_send_after_the_database_dropped_every_connection(server, channel, token, db_url):
    url = make_url(db_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("a SQLite file has no server to drop connections")
    thread = await create_thread(channel, token("alice"), "bob")
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    assert (await alice.send_message(thread, "before", "op-1")).confirmed.message.seq == 1
    admin = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        killed = await admin.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t"
        )
    finally:
        await admin.close()
    assert killed >= 1  # the send writer's connection among them
    after = await alice.send_message(thread, "after", "op-2")
    assert after.confirmed.message.seq == 2 and not after.replayed
    alice.cancel()


async def test_a_slow_send_transaction_is_logged_and_counted(settings_factory, db_url, caplog):
    app = ThreadlineServer(settings_factory(database={"query_timeout_s": 5.0, "slow_query_s": 0.3}))
    endpoints = await app.start()
    caplog.set_level(logging.WARNING, logger="threadline_server.storage.store_messages")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            thread = await create_thread(channel, app.mint("alice", 600), "bob")
            alice = RawStream(channel, app.mint("alice", 600))
            await alice.hello()
            # Held for 0.6 s: slower than 0.3 s, well within the timeout.
            lock = await LockHolder.take(db_url, thread)
            release = asyncio.create_task(lock.release(after=0.6))
            sent = await alice.send_message(thread, "slow", "op-slow", timeout=15)
            await release
            assert sent.confirmed.message.seq == 1
            alice.cancel()
        [slow] = [r for r in caplog.records if r.getMessage().startswith("slow send")]
        assert "1 messages" in slow.getMessage()
        assert "threadline_slow_queries_total 1.0" in app.metrics.render().decode()
    finally:
        await app.stop(grace=0.5)
