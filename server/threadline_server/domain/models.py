"""Domain records: frozen, slotted dataclasses shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: identity (issuer, user id) plus what the token said."""

    user_id: str
    issuer: str
    session_id: str
    expires_at: float  # seconds since the epoch (`exp`)
    display_name: str = ""
    email: str = ""
    image_url: str = ""
    actor: str = ""  # `act.sub` when an admin impersonates the user


class UserClaims(NamedTuple):
    """The profile a verified token states for its user (what the users table keeps of it)."""

    user_id: str
    display_name: str = ""
    email: str = ""
    image_url: str = ""

    @classmethod
    def of(cls, principal: Principal) -> UserClaims:
        return cls(principal.user_id, principal.display_name, principal.email, principal.image_url)


@dataclass(frozen=True, slots=True)
class User:
    """A user row, created from verified claims on first use."""

    id: str
    display_name: str
    email: str
    image_url: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Preferences:
    """Per-user settings."""

    theme: int = 0
    locale: str = ""
    time_zone: str = ""
    notifications_enabled: bool = True
    version: int = 0


@dataclass(frozen=True, slots=True)
class Attachment:
    """File metadata carried on a message."""

    upload_id: str
    file_name: str
    content_type: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Thread:
    """A thread's shared state (the same for every participant)."""

    id: str
    title: str
    description: str
    tags: tuple[str, ...]
    participant_ids: tuple[str, ...]
    archived: bool
    creator_id: str
    last_seq: int
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    """A message or its tombstone."""

    id: str
    thread_id: str
    seq: int
    author_id: str
    text: str
    version: int
    deleted: bool
    created_at: datetime
    updated_at: datetime | None
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True, slots=True)
class ReadMarker:
    """One participant's read position in one thread."""

    thread_id: str
    user_id: str
    read_seq: int
    unread_count: int


@dataclass(frozen=True, slots=True)
class ThreadSummary:
    """A thread as one participant sees it."""

    thread: Thread
    read_seq: int
    unread_count: int
    last_message: Message | None


class EventKind(Enum):
    """Mirrors threadline.v1.EventKind."""

    MESSAGE_CREATED = 1
    MESSAGE_UPDATED = 2
    MESSAGE_DELETED = 3
    THREAD_CREATED = 4
    THREAD_UPDATED = 5
    THREAD_REMOVED = 6
    READ_MARKER_UPDATED = 7
    TYPING = 8
    PRESENCE = 9


@dataclass(frozen=True, slots=True)
class TypingState:
    """An ephemeral typing signal."""

    thread_id: str
    user_id: str
    active: bool
    expires_at: float


@dataclass(frozen=True, slots=True)
class PresenceState:
    """An ephemeral online/offline announcement."""

    user_id: str
    online: bool
    last_active_at: float  # epoch seconds


Payload = Message | Thread | ReadMarker | TypingState | PresenceState | None


@dataclass(frozen=True, slots=True)
class Event:
    """A committed change, as delivered to the users in `recipients`.

    `change_seq` is the global change cursor (0 for ephemeral events); `client_op_id` goes only
    to the author's own streams.
    """

    change_seq: int
    kind: EventKind
    thread_id: str
    thread_seq: int
    version: int
    actor_id: str
    created_at: datetime
    payload: Payload
    recipients: frozenset[str] = field(default_factory=frozenset)
    client_op_id: str = ""
    # Addressed to its single recipient alone (read markers, being added or removed): replay
    # gives it to that user only, whatever the thread's membership is then.
    personal: bool = False


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of results and the opaque token for the next."""

    items: list[T]
    next_page_token: str
