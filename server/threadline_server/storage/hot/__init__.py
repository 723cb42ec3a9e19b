"""The hot path: the send transaction written against the drivers directly (the standard
library's sqlite3, asyncpg), behind one small port. SQLAlchemy and Alembic keep the schema, the
migrations and every other path; see docs/performance.md for why and what it saved."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy.engine import make_url

from threadline_server.domain.ports import SendItem
from threadline_server.storage.hot.plan import BatchPlan, Written


class SendWriter(Protocol):
    """Commits one group of sends (no attachments) in one transaction; the caller holds the
    node's write lock and publishes `Written.events` after this returns."""

    async def write(
        self, items: Sequence[SendItem], now: datetime
    ) -> tuple[BatchPlan, Written]: ...

    async def close(self) -> None: ...


def send_writer(
    url: str,
    *,
    query_timeout_s: float,
    sqlite_synchronous: str,
    on_unknown_outcome: Callable[[], None],
) -> SendWriter | None:
    """The writer for this database URL; None where only the engine can reach the database
    (an in-memory SQLite database is private to its connection)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return None
        from threadline_server.storage.hot.sqlite import SqliteSendWriter

        return SqliteSendWriter(
            parsed.database,
            synchronous=sqlite_synchronous,
            busy_timeout_s=query_timeout_s,
            on_unknown_outcome=on_unknown_outcome,
        )
    if backend == "postgresql" and parsed.get_driver_name() == "asyncpg":
        from threadline_server.storage.hot.postgres import PostgresSendWriter

        return PostgresSendWriter(
            parsed, query_timeout_s=query_timeout_s, on_unknown_outcome=on_unknown_outcome
        )
    return None
