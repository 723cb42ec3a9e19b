"""The SQL implementation of the domain's Store port: threads, members, messages, the change log
and idempotency keys, with events published only after COMMIT."""

from __future__ import annotations

from threadline_server.errors import DomainError
from threadline_server.storage.store_base import new_id as new_id
from threadline_server.storage.store_base import runs_to_completion as runs_to_completion
from threadline_server.storage.store_sync import SyncStore


class SqlStore(SyncStore):
    """Store port on SQLAlchemy Core. Every write runs in one transaction under the node's write
    lock; its events are handed to `publish` after COMMIT (see Database.write)."""


__all__ = ["DomainError", "SqlStore", "new_id"]
