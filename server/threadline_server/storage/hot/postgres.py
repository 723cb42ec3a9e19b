"""The send transaction on PostgreSQL through asyncpg directly: a group commit of any size is
five round trips (BEGIN, one read, the thread bumps, one statement for the change cursors and
every row, COMMIT), each a prepared statement from asyncpg's cache, with no SQLAlchemy compile
or greenlet hop per statement.

It has its own connection, with the engine's settings (statement timeout, synchronous_commit),
opened at the first send and again after the server was lost. Writes in this process are
serialized by Database.write_lock (the caller holds it), so one connection is all it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg
from sqlalchemy.engine import URL

from threadline_server.domain.models import EventKind
from threadline_server.domain.ports import SendItem
from threadline_server.errors import DeadlineExceeded, Unavailable
from threadline_server.storage.hot import plan as p
from threadline_server.storage.hot.errors import WriteRaced

logger = logging.getLogger(__name__)

# The batch's idempotency records and its threads' members in one round trip.
_READ = """
SELECT 0 AS what, o.user_id, o.client_op_id, o.payload_hash, o.resource_id, o.change_seq
  FROM operations o
  JOIN unnest($1::text[], $2::text[]) AS k(user_id, client_op_id)
    ON o.user_id = k.user_id AND o.client_op_id = k.client_op_id
UNION ALL
SELECT 1, m.user_id, m.thread_id, NULL, NULL, NULL
  FROM thread_members m WHERE m.thread_id = ANY($3::text[])
"""

# Rows are locked in thread id order (LockRows sits above the Sort), then bumped.
_BUMP = """
WITH bump AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS b(id, n)),
     locked AS (SELECT t.id FROM threads t JOIN bump ON t.id = bump.id ORDER BY t.id FOR UPDATE)
UPDATE threads t SET last_seq = t.last_seq + bump.n, last_activity_at = $3
  FROM bump WHERE t.id = bump.id AND t.id IN (SELECT id FROM locked)
RETURNING t.id, t.last_seq
"""

# The change cursors are reserved here, last in the transaction: the server_state row lock
# orders commits, so cursors commit in order without gaps. Returns the first cursor.
_INSERT = """
WITH s AS (
  UPDATE server_state SET change_seq = change_seq + cardinality($1::text[]) WHERE id = 1
  RETURNING change_seq - cardinality($1::text[]) AS base
),
r AS (
  SELECT r.*, s.base + r.n AS change_seq
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::bytea[]) WITH ORDINALITY AS r(id, thread_id, seq, author, body, op, hash, n),
         s
),
m AS (
  INSERT INTO messages (id, thread_id, seq, author_id, text, version, deleted, created_at)
  SELECT id, thread_id, seq, author, body, 1, false, $8 FROM r ORDER BY n
),
o AS (
  INSERT INTO operations (user_id, client_op_id, payload_hash, resource_kind, resource_id,
                          change_seq, result_version, created_at)
  SELECT author, op, hash, 'message', id, change_seq, 1, $8 FROM r ORDER BY n
),
c AS (
  INSERT INTO changes (change_seq, thread_id, user_id, kind, thread_seq, version, actor_id,
                       resource_id, client_op_id, created_at)
  SELECT change_seq, thread_id, NULL, $9, seq, 1, author, id, op, $8 FROM r ORDER BY n
)
SELECT base + 1 FROM s
"""

_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    # A connection the server terminated while it was idle can be left by asyncpg in a state
    # where the next query fails with "cannot switch to state 15; another operation (2) is in
    # progress" (seen once in CI after pg_terminate_backend): as unusable as a lost one.
    asyncpg.InternalClientError,
    OSError,
)
_TIMEOUT = (TimeoutError, asyncpg.QueryCanceledError)
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


class PostgresSendWriter:
    """Runs each group commit on its own asyncpg connection."""

    def __init__(
        self,
        url: URL,
        *,
        query_timeout_s: float,
        on_unknown_outcome: Callable[[], None],
    ) -> None:
        self._url = url
        self._timeout_s = query_timeout_s
        self._on_unknown_outcome = on_unknown_outcome
        self._conn: asyncpg.Connection | None = None

    async def write(
        self, items: Sequence[SendItem], now: datetime
    ) -> tuple[p.BatchPlan, p.Written]:
        fresh = self._conn is None or self._conn.is_closed()
        try:
            return await self._attempt(items, now)
        except _Stale as stale:
            if fresh:
                raise _unavailable(stale) from stale
        # A connection that died while idle (the server restarted) fails at BEGIN, before
        # anything was sent: one more try on a new connection.
        try:
            return await self._attempt(items, now)
        except _Stale as stale:
            raise _unavailable(stale) from stale

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=self._timeout_s)
            self._conn = None

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            u = self._url
            try:
                self._conn = await asyncpg.connect(
                    host=u.host,
                    port=u.port,
                    user=u.username,
                    password=u.password,
                    database=u.database,
                    timeout=self._timeout_s,
                    command_timeout=self._timeout_s,
                    server_settings={
                        "statement_timeout": str(int(self._timeout_s * 1000)),
                        "synchronous_commit": "on",
                    },
                )
            except (*_LOST, *_TIMEOUT) as exc:
                raise _unavailable(exc) from exc
        return self._conn

    async def _attempt(
        self, items: Sequence[SendItem], now: datetime
    ) -> tuple[p.BatchPlan, p.Written]:
        conn = await self._connect()
        try:
            await conn.execute("BEGIN")
        except _LOST as exc:
            await self._drop()
            raise _Stale(type(exc).__name__) from exc
        committing = False
        try:
            plan, written = await self._transaction(conn, items, now)
            committing = True
            await conn.execute("COMMIT")
            return plan, written
        except BaseException as exc:
            await self._rollback(conn)
            if committing:
                self._on_unknown_outcome()
            if isinstance(exc, asyncpg.UniqueViolationError):
                raise WriteRaced(str(exc)) from exc
            if isinstance(exc, _TIMEOUT):
                raise DeadlineExceeded("DB_TIMEOUT", "database query timed out") from exc
            if isinstance(exc, (*_LOST, *_RETRYABLE)):
                raise _unavailable(exc) from exc
            raise

    async def _transaction(
        self, conn: asyncpg.Connection, items: Sequence[SendItem], now: datetime
    ) -> tuple[p.BatchPlan, p.Written]:
        keys = p.op_keys(items)
        tids = p.thread_ids(items)
        existing: dict[tuple[str, str], p.PriorOp] = {}
        found: dict[str, set[str]] = {tid: set() for tid in tids}
        rows = await conn.fetch(_READ, [k[0] for k in keys], [k[1] for k in keys], tids)
        for what, user_id, other, payload_hash, resource_id, change_seq in rows:
            if what == 0:
                existing[(user_id, other)] = p.PriorOp(
                    bytes(payload_hash), resource_id, int(change_seq)
                )
            else:
                found[other].add(user_id)
        plan = p.plan_batch(items, existing, {t: frozenset(m) for t, m in found.items()})
        counts = plan.thread_counts()
        if not counts:
            return plan, p.Written()
        bumped = await conn.fetch(_BUMP, [c[0] for c in counts], [c[1] for c in counts], now)
        seqs = p.allocate(plan, {tid: int(last) for tid, last in bumped})
        if not seqs:
            return plan, p.Written()
        w = p.build(plan, seqs, now)
        first = await conn.fetchval(
            _INSERT,
            w.message_ids,
            w.thread_ids,
            w.seqs,
            w.authors,
            w.texts,
            w.op_ids,
            w.hashes,
            now,
            EventKind.MESSAGE_CREATED.value,
        )
        # The statement numbered the rows in this order (WITH ORDINALITY), as `number` does.
        p.number(plan, w, int(first))
        return plan, w

    async def _rollback(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed():
            self._conn = None
            return
        try:
            await conn.execute("ROLLBACK")
        except Exception:  # the connection is in an unknown state: start over with a new one
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


class _Stale(Exception):
    """The connection failed at BEGIN: nothing of the batch reached the server."""


def _unavailable(exc: BaseException) -> Unavailable:
    logger.warning("database unavailable: %s", type(exc).__name__)
    return Unavailable("BACKEND_UNAVAILABLE", "database unavailable")
