"""The send transaction on PostgreSQL through asyncpg directly: a group commit of any size is one
round trip, a call of the server-side function threadline_send_batch (migration 0004), which
runs the batch in its own implicit transaction and decides as storage/hot/plan.py does. It was
five round trips (BEGIN, a read, the thread bumps, the inserts, COMMIT): 1.45 ms and 0.59 ms of
our CPU per one-message batch against 1.0 ms and 0.16 ms for the call (docs/performance.md).

It has its own connection, with the engine's settings (statement timeout, synchronous_commit),
opened at the first send and again after the server was lost. Writes in this process are
serialized by Database.write_lock (the caller holds it), so one connection is all it needs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg
from sqlalchemy.engine import URL

from threadline_server.domain.models import EventKind
from threadline_server.domain.ports import SendItem
from threadline_server.errors import DeadlineExceeded, IdempotencyKeyReused, NotFound, Unavailable
from threadline_server.storage.hot import plan as p
from threadline_server.storage.hot.errors import WriteRaced

logger = logging.getLogger(__name__)

_CALL = "SELECT * FROM threadline_send_batch($1, $2, $3, $4, $5, $6, $7, $8)"

# asyncpg raises these before a query is written to the socket: a connection it knows is closed
# (InterfaceError), or one a server-side termination left mid-state, failing with "cannot switch
# to state 15; another operation (2) is in progress" (InternalClientError, seen once in CI after
# pg_terminate_backend). Nothing of the batch reached the server.
_UNSENT = (asyncpg.InterfaceError, asyncpg.InternalClientError)
# The connection ended during the call, which may have committed.
_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    OSError,
)
_TIMEOUT = (TimeoutError, asyncpg.QueryCanceledError)
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


class PostgresSendWriter:
    """Runs each group commit as one call on its own asyncpg connection."""

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
        except _Unsent as unsent:
            if fresh:
                raise _unavailable(unsent) from unsent
        # A connection that died while idle (the server restarted) fails before the call is
        # sent: one more try on a new connection.
        try:
            return await self._attempt(items, now)
        except _Unsent as unsent:
            raise _unavailable(unsent) from unsent

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
                    # Twice the statement timeout: the server's own cancel (a certain rollback,
                    # QueryCanceledError) comes first; ours would leave the outcome unknown, as
                    # a call in flight can still commit after asyncpg gave up on it.
                    command_timeout=self._timeout_s * 2,
                    server_settings={
                        "statement_timeout": str(int(self._timeout_s * 1000)),
                        "synchronous_commit": "on",
                    },
                )
            except (*_UNSENT, *_LOST, *_TIMEOUT) as exc:
                raise _unavailable(exc) from exc
        return self._conn

    async def _attempt(
        self, items: Sequence[SendItem], now: datetime
    ) -> tuple[p.BatchPlan, p.Written]:
        conn = await self._connect()
        ids = [uuid.uuid4().hex for _ in items]
        call = asyncio.ensure_future(
            conn.fetch(
                _CALL,
                [i.user_id for i in items],
                [i.client_op_id for i in items],
                [i.thread_id for i in items],
                [i.text for i in items],
                [i.payload_hash for i in items],
                ids,
                now,
                EventKind.MESSAGE_CREATED.value,
            )
        )
        try:
            # Shielded: a cancelled caller must not leave the call's outcome unknown (asyncpg
            # would cancel it on the server mid-way); the caller holds the write lock until the
            # transaction has ended either way.
            rows = await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            if not call.cancelled() and call.exception() is None:
                # Committed, but the caller is gone before publishing it: whoever mirrors
                # writes (the caches) must forget, as for a COMMIT whose outcome is unknown.
                self._on_unknown_outcome()
            elif not call.cancelled() and isinstance(call.exception(), _LOST):
                await self._drop()
                self._on_unknown_outcome()
            raise
        except _UNSENT as exc:
            await self._drop()
            raise _Unsent(type(exc).__name__) from exc
        except asyncpg.UniqueViolationError as exc:  # another node committed an op id first
            raise WriteRaced(str(exc)) from exc
        except asyncpg.QueryCanceledError as exc:  # the statement timeout: rolled back
            raise DeadlineExceeded("DB_TIMEOUT", "database query timed out") from exc
        except _RETRYABLE as exc:
            raise _unavailable(exc) from exc
        except (*_LOST, TimeoutError) as exc:
            # The call may have committed before the connection (or our patience) ended.
            await self._drop()
            self._on_unknown_outcome()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("DB_TIMEOUT", "database query timed out") from exc
            raise _unavailable(exc) from exc
        return _outcomes(items, rows, ids, now)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _outcomes(
    items: Sequence[SendItem], rows: Sequence[asyncpg.Record], ids: list[str], now: datetime
) -> tuple[p.BatchPlan, p.Written]:
    """The plan and rows the function decided and wrote, in the shapes plan.py makes, so that
    finishing the batch (replays, events, outcomes) is the same code on both databases."""
    members: dict[str, set[str]] = {}
    plan = p.BatchPlan(items, {}, [None] * len(items))
    seqs: list[tuple[int, int]] = []
    first_change: int | None = None
    for n, outcome, ref, seq, change_seq, resource_id, thread_id, user_id in rows:
        if outcome == "member":
            members.setdefault(thread_id, set()).add(user_id)
            continue
        idx = n - 1
        item = items[idx]
        if outcome == "new":
            plan.by_thread.setdefault(item.thread_id, []).append(idx)
            seqs.append((idx, int(seq)))
            if first_change is None:
                first_change = int(change_seq)
        elif outcome == "replay":
            plan.replays[idx] = p.PriorOp(item.payload_hash, resource_id, int(change_seq))
        elif outcome == "same":
            plan.replays[idx] = ref - 1
        elif outcome == "reused":
            plan.outcomes[idx] = IdempotencyKeyReused(item.client_op_id)
        else:
            plan.outcomes[idx] = NotFound("thread", item.thread_id)
    plan.members = {tid: frozenset(m) for tid, m in members.items()}
    if first_change is None:
        return plan, p.Written()
    w = p.build(plan, seqs, now, ids)
    p.number(plan, w, first_change)  # the function numbered the new rows in item order too
    return plan, w


class _Unsent(Exception):
    """The call failed before it was sent: nothing of the batch reached the server."""


def _unavailable(exc: BaseException) -> Unavailable:
    logger.warning("database unavailable: %s", type(exc).__name__)
    return Unavailable("BACKEND_UNAVAILABLE", "database unavailable")
