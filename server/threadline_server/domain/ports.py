"""What the domain needs from the outside: the Store and Broker protocols and their records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from threadline_server.domain.models import (
    Event,
    Message,
    Preferences,
    ReadMarker,
    Thread,
    ThreadSummary,
    User,
    UserClaims,
)
from threadline_server.errors import DomainError


@dataclass(frozen=True, slots=True)
class OpKey:
    """An idempotency key and the hash of the operation it names."""

    user_id: str
    client_op_id: str
    payload_hash: bytes


@dataclass(frozen=True, slots=True)
class StoredOp:
    """What an idempotency key produced."""

    resource_kind: str
    resource_id: str
    change_seq: int
    result_version: int = 0


@dataclass(frozen=True, slots=True)
class SendItem:
    """One message waiting for the next group commit."""

    user_id: str
    client_op_id: str
    thread_id: str
    text: str
    payload_hash: bytes
    attachment_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """A committed (or replayed) message and the change cursor of its event."""

    message: Message
    change_seq: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class ThreadChange:
    """One change to a thread: field values, membership, or deletion."""

    fields: dict[str, Any] = field(default_factory=dict)
    add_participants: tuple[str, ...] = ()
    remove_participants: tuple[str, ...] = ()
    delete: bool = False
    expected_version: int = 0
    # Non-zero: the client's change was made from this version; merge three-way against it.
    base_version: int = 0


@dataclass(frozen=True, slots=True)
class ThreadCursor:
    """Keyset position in a thread list."""

    last_activity_at: datetime
    thread_id: str


@dataclass(frozen=True, slots=True)
class IndexStat:
    """How much one index has been used (database statistics)."""

    table: str
    index: str
    scans: int
    tuples_read: int


@dataclass(frozen=True, slots=True)
class ReplayPage:
    """One user's next replay page: changes in (after, upto], at most `limit` rows and about
    `max_bytes` of payload."""

    user_id: str
    after: int
    upto: int
    limit: int
    max_bytes: int


class Store(Protocol):
    """Durable state. Every write is one transaction; its events are published after COMMIT."""

    async def stale_profiles(self, profiles: Sequence[UserClaims]) -> set[UserClaims]: ...
    async def upsert_users(self, profiles: Sequence[UserClaims]) -> dict[UserClaims, Exception]: ...
    async def get_user(self, user_id: str) -> tuple[User, Preferences]: ...
    async def update_preferences(
        self, user_id: str, values: dict[str, Any], expected_version: int
    ) -> Preferences: ...
    async def create_thread(
        self,
        actor: str,
        title: str,
        description: str,
        tags: Sequence[str],
        participant_ids: Sequence[str],
        op: OpKey | None,
    ) -> tuple[Thread, bool]: ...
    async def change_thread(
        self, actor: str, thread_id: str, change: ThreadChange, op: OpKey | None
    ) -> tuple[Thread | None, bool]: ...
    async def get_thread(self, user_id: str, thread_id: str) -> ThreadSummary: ...
    async def list_threads(
        self, user_id: str, archived: bool | None, limit: int, after: ThreadCursor | None
    ) -> tuple[list[tuple[ThreadSummary, ThreadCursor]], bool]:
        """A page of summaries, each with its keyset position; and whether more exist."""
        ...

    async def mark_read(self, user_id: str, thread_id: str, read_seq: int) -> ReadMarker: ...
    async def list_messages(
        self, user_id: str, thread_id: str, *, forward: bool, start_seq: int, limit: int
    ) -> tuple[list[Message], bool]: ...
    async def send_messages(self, items: Sequence[SendItem]) -> list[SendOutcome | DomainError]: ...
    async def change_message(
        self,
        actor: str,
        message_id: str,
        *,
        text: str | None,
        base_version: int,
        op: OpKey | None,
    ) -> tuple[Message, int, bool]: ...
    async def current_change_seq(self) -> tuple[str, int]: ...
    async def resume_point(self) -> tuple[str, int, int]: ...
    async def replay(
        self, user_id: str, after: int, upto: int, limit: int, max_bytes: int
    ) -> tuple[list[Event], int | None]:
        """Changes in (after, upto]: at most `limit` rows, and it stops loading once the payloads
        read reach about `max_bytes` (memory per page); plus the last cursor scanned."""
        ...

    async def replay_many(
        self, pages: Sequence[ReplayPage]
    ) -> dict[ReplayPage, tuple[list[Event], int | None]]: ...
    async def stored_results(
        self, user_id: str, op_ids: Sequence[str]
    ) -> list[tuple[str, StoredOp, Message | Thread | None]]: ...
    async def prune(self, retention_s: int, idempotency_window_s: int) -> tuple[int, int]: ...
    async def thread_members(self, thread_id: str) -> frozenset[str]: ...
    async def co_participants(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]: ...
    async def index_usage(self) -> tuple[str, list[IndexStat]]: ...


class PageSizes(Protocol):
    """Encoded size of one item of a page, as the transport will send it (exact, so a page
    never exceeds the frame limit)."""

    def message(self, m: Message) -> int: ...
    def summary(self, s: ThreadSummary) -> int: ...


class Broker(Protocol):
    """Fans committed events out to the live streams of their recipients."""

    def publish(self, events: list[Event]) -> None: ...
    def online(self, user_id: str) -> bool: ...
