"""Engines per dialect, durability checks, named transactions, and schema migrations."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from threadline_server.errors import DeadlineExceeded, Unavailable
from threadline_server.observability import log_context
from threadline_server.storage.hot import SendWriter, send_writer

logger = logging.getLogger(__name__)

# The store method that opened the current transaction, for the slow-query log. SQLAlchemy runs
# the sync event hooks in a greenlet that carries the caller's context, so they can read it.
_caller: ContextVar[str] = ContextVar("threadline_db_caller", default="")


def _opener() -> str:
    """`module.function` of the code doing `async with db.read()/write()`: three frames up,
    past this generator and contextlib's __aenter__."""
    try:
        frame = sys._getframe(3)
    except ValueError:  # called from a shallower stack than a store method's
        return ""
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}"


MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class WriteTx:
    """One open write transaction and its after-commit callbacks."""

    def __init__(self) -> None:
        self.conn: AsyncConnection = None  # type: ignore[assignment]  # set before use
        self.callbacks: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)


class Database:
    """Owns the engine; hands out read and write transactions.

    Writes are serialized in-process by one lock: SQLite has a single writer anyway, and holding
    the lock across commit *and* publish keeps every stream's per-thread order equal to commit
    order. Throughput comes from group commit (many messages per transaction), not from
    concurrent writers.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 20,
        query_timeout_s: float = 5.0,
        slow_query_s: float = 1.0,
        sqlite_synchronous: str = "FULL",
        on_slow_query: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        self.query_timeout_s = query_timeout_s
        self.slow_query_s = slow_query_s
        self.write_lock = asyncio.Lock()
        self._unknown_outcome_hooks: list[Callable[[], None]] = []
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": query_timeout_s}
        else:
            kwargs.update(
                pool_size=pool_size,
                max_overflow=0,
                pool_timeout=query_timeout_s,
                pool_pre_ping=True,
                connect_args={
                    "command_timeout": query_timeout_s,
                    "server_settings": {
                        "statement_timeout": str(int(query_timeout_s * 1000)),
                        "synchronous_commit": "on",
                    },
                },
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _install_sqlite_hooks(self.engine, sqlite_synchronous, int(query_timeout_s * 1000))
        _install_slow_query_log(self.engine, slow_query_s, on_slow_query)
        self.on_slow_query = on_slow_query
        # Sends without attachments bypass the engine (storage.hot); it connects on first use.
        self.send_writer: SendWriter | None = send_writer(
            url,
            query_timeout_s=query_timeout_s,
            sqlite_synchronous=sqlite_synchronous,
            on_unknown_outcome=self.notify_unknown_outcome,
        )

    async def check_durability(self) -> None:
        """Asserts the settings that make an acknowledgement mean durable (P1)."""
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
                sync = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
                if str(mode).lower() != "wal" or int(sync or 0) < 1:
                    raise RuntimeError(f"SQLite not durable: journal={mode} synchronous={sync}")
            else:
                value = (await conn.exec_driver_sql("SHOW synchronous_commit")).scalar()
                if value != "on":
                    raise RuntimeError(f"PostgreSQL synchronous_commit is {value}, need on")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (a consistent snapshot on both dialects)."""
        previous = _caller.get()
        _caller.set(_opener())
        try:
            async with _mapped_errors(), self.engine.connect() as conn, conn.begin():
                if not self.is_sqlite:
                    # One snapshot for every statement of the read (a summary's last_seq and its
                    # unread count must agree), not READ COMMITTED's snapshot per statement.
                    await conn.exec_driver_sql(
                        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                    )
                yield conn
        finally:
            _caller.set(previous)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        """A write transaction under the node's write lock; commits on normal exit.

        Callbacks registered with `tx.after_commit` run after COMMIT succeeded and before the lock
        is released: that is where events are published, so delivery order equals commit order
        and nothing is announced that was not durably written.
        """
        previous = _caller.get()
        _caller.set(_opener())
        committing = False
        try:
            async with self.write_lock:
                tx = WriteTx()
                async with _mapped_errors(), self.engine.connect() as conn:
                    if self.is_sqlite:
                        conn = await conn.execution_options(sqlite_immediate=True)
                    async with conn.begin():
                        tx.conn = conn
                        yield tx
                        committing = True  # leaving begin() commits
                for callback in tx.callbacks:
                    callback()
        except BaseException:
            if committing:
                # COMMIT failed or its outcome is unknown (a dropped connection): it may have
                # happened without its after-commit step. Whoever mirrors writes must forget.
                self.notify_unknown_outcome()
            raise
        finally:
            _caller.set(previous)

    def on_unknown_outcome(self, hook: Callable[[], None]) -> None:
        """`hook` runs when a write transaction fails at or after COMMIT."""
        self._unknown_outcome_hooks.append(hook)

    def notify_unknown_outcome(self) -> None:
        for hook in self._unknown_outcome_hooks:
            hook()

    def pool_in_use(self) -> int:
        """Connections checked out of the pool now (for the metrics)."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if callable(checkedout) else 0

    async def dispose(self) -> None:
        if self.send_writer is not None:
            await self.send_writer.close()
        await self.engine.dispose()


@asynccontextmanager
async def _mapped_errors() -> AsyncIterator[None]:
    """Database outages and timeouts become statuses the client can act on (retry, same op id)."""
    try:
        yield
    except TimeoutError as exc:
        raise DeadlineExceeded("DB_TIMEOUT", "database query timed out") from exc
    except (OperationalError, DBAPIError, OSError) as exc:
        if isinstance(exc, DBAPIError) and not exc.connection_invalidated:
            text_ = str(exc.orig).lower() if exc.orig is not None else ""
            if "timeout" in text_ or "canceling statement" in text_:
                raise DeadlineExceeded("DB_TIMEOUT", "database query timed out") from exc
            if not isinstance(exc, OperationalError) and "locked" not in text_:
                raise
        logger.warning("database unavailable: %s", type(exc).__name__)
        raise Unavailable("BACKEND_UNAVAILABLE", "database unavailable") from exc


def configure_sqlite(dbapi_connection: Any, synchronous: str, busy_ms: int) -> None:
    """The settings of every SQLite connection: the engine's and the send writer's."""
    # Let us emit BEGIN ourselves (pysqlite's implicit transactions defeat BEGIN IMMEDIATE).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Waiting for another writer counts against the query timeout too.
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.close()


def _install_sqlite_hooks(engine: AsyncEngine, synchronous: str, busy_ms: int) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        configure_sqlite(dbapi_connection, synchronous, busy_ms)

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so a write never fails half-way on upgrade.
        if conn.get_execution_options().get("sqlite_immediate"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def _install_slow_query_log(
    engine: AsyncEngine, threshold_s: float, on_slow: Callable[[], None]
) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before(
        conn: Any, _cursor: Any, _stmt: Any, _params: Any, context: Any, _many: Any
    ) -> None:
        conn.info.setdefault("query_start", []).append(time.perf_counter())

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _after(conn: Any, _cursor: Any, statement: str, _p: Any, _c: Any, _m: Any) -> None:
        elapsed = time.perf_counter() - conn.info["query_start"].pop()
        if elapsed >= threshold_s:
            on_slow()
            caller = _caller.get()
            logger.warning(
                "slow query (%.3f s) in %s: %s",
                elapsed,
                caller or "?",
                statement[:200],
                extra={
                    **log_context(),
                    "duration_s": round(elapsed, 3),
                    "statement": statement[:500],
                    "caller": caller,
                },
            )


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(url: str) -> None:
    command.upgrade(alembic_config(url), "head")


async def migrate(url: str) -> None:
    """Applies every pending migration (Alembic runs synchronously, so off the event loop)."""
    if make_url(url).get_backend_name() == "sqlite":
        database = make_url(url).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(_upgrade, url)


async def ensure_server_state(db: Database, new_epoch: str) -> str:
    """Creates the single server_state row on first start; returns the epoch in force."""
    async with db.write() as tx:
        conn = tx.conn
        row = (await conn.execute(text("SELECT epoch FROM server_state WHERE id = 1"))).first()
        if row is not None:
            return str(row[0])
        await conn.execute(
            text("INSERT INTO server_state (id, epoch, change_seq) VALUES (1, :e, 0)"),
            {"e": new_epoch},
        )
        return new_epoch
