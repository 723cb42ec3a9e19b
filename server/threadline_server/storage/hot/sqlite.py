"""The send transaction on SQLite through the standard library's sqlite3, on one dedicated
thread: the event loop hands a whole group commit over once and gets its result back once,
instead of one thread hand-off (and one SQLAlchemy compile) per statement.

The connection has the engine's settings (storage.db.configure_sqlite: WAL, synchronous,
foreign keys, busy timeout). Writes in this process are serialized by Database.write_lock,
which the caller holds, so this connection and the engine's never wait on each other; another
process waits up to the busy timeout, as it does for the engine.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import sqlite as sqlite_dialect

from threadline_server.domain.models import EventKind
from threadline_server.domain.ports import SendItem
from threadline_server.errors import Unavailable
from threadline_server.storage.db import configure_sqlite
from threadline_server.storage.hot import plan as p
from threadline_server.storage.hot.errors import WriteRaced
from threadline_server.storage.tables import Stamp

logger = logging.getLogger(__name__)

# SQLAlchemy's own storage format for the column type, so that every reader parses our rows.
_stamp: Callable[[datetime], Any] = Stamp.dialect_impl(sqlite_dialect.dialect()).bind_processor(
    sqlite_dialect.dialect()
) or (lambda v: v)

_FIND_OP = (
    "SELECT payload_hash, resource_id, change_seq FROM operations"
    " WHERE user_id = ? AND client_op_id = ?"
)
_MEMBERS = "SELECT user_id FROM thread_members WHERE thread_id = ?"
_BUMP = (
    "UPDATE threads SET last_seq = last_seq + ?, last_activity_at = ? WHERE id = ?"
    " RETURNING last_seq"
)
_RESERVE = "UPDATE server_state SET change_seq = change_seq + ? WHERE id = 1 RETURNING change_seq"
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, thread_id, seq, author_id, text, version, deleted, created_at)"
    " VALUES (?, ?, ?, ?, ?, 1, 0, ?)"
)
_INSERT_OP = (
    "INSERT INTO operations (user_id, client_op_id, payload_hash, resource_kind, resource_id,"
    " change_seq, result_version, created_at) VALUES (?, ?, ?, 'message', ?, ?, 1, ?)"
)
_INSERT_CHANGE = (
    "INSERT INTO changes (change_seq, thread_id, user_id, kind, thread_seq, version, actor_id,"
    " resource_id, client_op_id, created_at) VALUES (?, ?, NULL, ?, ?, 1, ?, ?, ?, ?)"
)


class SqliteSendWriter:
    """Runs each group commit whole on its own thread and connection."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        busy_timeout_s: float,
        on_unknown_outcome: Callable[[], None],
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._on_unknown_outcome = on_unknown_outcome
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="threadline-sqlite-writer")
        self._local = threading.local()
        self._closed = False

    async def write(
        self, items: Sequence[SendItem], now: datetime
    ) -> tuple[p.BatchPlan, p.Written]:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, items, now)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The transaction runs to its end on the thread either way; the caller holds the
            # write lock until it has, so no other writer starts while it is open.
            await asyncio.wait([future])
            if not future.cancelled() and future.exception() is None:
                # Committed, but the caller is gone before publishing it: whoever mirrors
                # writes (the caches) must forget, as for a COMMIT whose outcome is unknown.
                self._on_unknown_outcome()
            raise
        except _CommitFailed as failed:
            # On the loop, not the writer thread: the hooks clear caches the loop reads.
            self._on_unknown_outcome()
            raise failed.error from failed.__cause__

    async def close(self) -> None:
        if self._closed:  # a server stopped twice closes its writer once
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)

    # ---- on the writer thread -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout_s)
            configure_sqlite(conn, self._synchronous, int(self._busy_timeout_s * 1000))
            self._local.conn = conn
        return conn

    def _close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _run(self, items: Sequence[SendItem], now: datetime) -> tuple[p.BatchPlan, p.Written]:
        try:
            conn = self._connection()
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc
        committing = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            plan, written = self._transaction(conn, items, now)
            committing = True
            conn.execute("COMMIT")
            return plan, written
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.warning("rollback after a failed send transaction failed")
            error = (
                WriteRaced(str(exc)) if isinstance(exc, sqlite3.IntegrityError) else _mapped(exc)
            )
            if committing:
                raise _CommitFailed(error) from exc
            raise error from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _transaction(
        self, conn: sqlite3.Connection, items: Sequence[SendItem], now: datetime
    ) -> tuple[p.BatchPlan, p.Written]:
        existing: dict[tuple[str, str], p.PriorOp] = {}
        for key in p.op_keys(items):
            row = conn.execute(_FIND_OP, key).fetchone()
            if row is not None:
                existing[key] = p.PriorOp(bytes(row[0]), row[1], int(row[2]))
        members = {
            tid: frozenset(r[0] for r in conn.execute(_MEMBERS, (tid,)))
            for tid in p.thread_ids(items)
        }
        plan = p.plan_batch(items, existing, members)
        stamp = _stamp(now)
        last_seqs: dict[str, int] = {}
        for thread_id, count in plan.thread_counts():
            row = conn.execute(_BUMP, (count, stamp, thread_id)).fetchone()
            if row is not None:
                last_seqs[thread_id] = int(row[0])
        seqs = p.allocate(plan, last_seqs)
        if not seqs:
            return plan, p.Written()
        w = p.build(plan, seqs, now)
        last = int(conn.execute(_RESERVE, (len(w),)).fetchone()[0])
        p.number(plan, w, last - len(w) + 1)
        kind = EventKind.MESSAGE_CREATED.value
        rows = list(zip(w.items, w.messages, w.change_seqs, strict=True))
        conn.executemany(
            _INSERT_MESSAGE,
            [(m.id, m.thread_id, m.seq, m.author_id, m.text, stamp) for _, m, _ in rows],
        )
        conn.executemany(
            _INSERT_OP,
            [(m.author_id, i.client_op_id, i.payload_hash, m.id, c, stamp) for i, m, c in rows],
        )
        conn.executemany(
            _INSERT_CHANGE,
            [
                (c, m.thread_id, kind, m.seq, m.author_id, m.id, i.client_op_id, stamp)
                for i, m, c in rows
            ],
        )
        return plan, w


class _CommitFailed(Exception):
    """COMMIT failed: its outcome is unknown to whoever mirrors writes (see Database.write)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _mapped(exc: sqlite3.Error) -> Unavailable:
    """As the engine's errors are mapped (storage.db._mapped_errors): a locked or full database
    or a failing disk is an outage the client retries with the same op id."""
    logger.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return Unavailable("BACKEND_UNAVAILABLE", "database unavailable")
