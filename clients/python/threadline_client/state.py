"""Client-side state for Threadline apps: `ClientState`, the reducer that maintains it, and views.

This is the "Client State" of the data-flow design (user, threads, messages, ui) plus what sync
needs (cursor, pending operations). `ClientStore` is the reducer: it applies snapshots, events,
operation results and local optimistic operations to one `ClientState`, and tells subscribers
what changed. It does no I/O and never awaits, so it can be tested without a server and driven
by any transport; `threadline_client.session.ThreadlineSession` drives it from a live stream.

Rules the reducer follows (the server's sync contract):

* **Version rule.** A message or thread from an event, result or conflict replaces the local
  copy only when its `version` is higher, so replayed, live and snapshot data may overlap.
  Events at or below the applied change cursor are skipped outright.
* **Read markers merge by maximum**: a stale marker never makes read messages unread.
* **Optimistic operations.** A local operation is shown at once as an overlay on the server copy
  (a pending send at the end of its thread, an edit's text, a delete's tombstone, a thread's new
  fields, a read marker). A `LocalMessage` keeps a stable `local_id` (the `client_op_id` of an
  optimistic send), so when the server's version arrives the same object is updated in place and
  a UI never shows a duplicate. A rejection removes the overlay and lands in `messages.failed`
  (messages) or `ui.errors` (every operation) with the server's reason; a conflict is reported
  in the change's outcomes for the session's resolver.

State objects are mutated in place (not copied) precisely so that identity is stable: a UI may
keep a reference to a `LocalMessage` or `ThreadView` and re-render it on a change notification.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import status_pb2

from threadline.v1 import (
    errors_pb2,
    message_pb2,
    realtime_pb2,
    thread_pb2,
    user_pb2,
    user_service_pb2,
)
from threadline_client.errors import ThreadlineError, from_status_proto
from threadline_client.ids import new_op_id

__all__ = [
    "THREAD_UPDATE_FIELDS",
    "Change",
    "ChangeKind",
    "ClientState",
    "ClientStore",
    "ConflictInfo",
    "ConnectionState",
    "LocalMessage",
    "MessageRow",
    "MessageStatus",
    "MessagesState",
    "OpError",
    "OpKind",
    "OpOutcome",
    "OpStatus",
    "OpsState",
    "PendingOp",
    "Snapshot",
    "SnapshotView",
    "SyncInfo",
    "ThreadRow",
    "ThreadView",
    "ThreadsState",
    "UiError",
    "UiState",
    "UserState",
    "snapshot_view",
]

logger = logging.getLogger(__name__)

THREAD_UPDATE_FIELDS = frozenset({"title", "description", "tags", "archived"})
"""Thread fields an UPDATE operation may name in its mask."""

_MAX_UI_ERRORS = 50  # ui.errors is a notification log for people, not an audit trail


# -- enums ----------------------------------------------------------------------------------------


class ConnectionState(StrEnum):
    """Where a session's connection stands."""

    CONNECTING = "connecting"
    """The first connection attempt is under way."""
    SYNCING = "syncing"
    """The server accepted the stream; catching up (replay or snapshot) before going online."""
    ONLINE = "online"
    """Caught up; live events flow and pending operations are being sent."""
    RECONNECTING = "reconnecting"
    """The stream ended; waiting (backoff) or connecting again."""
    OFFLINE = "offline"
    """Not started, stopped, or given up after a non-transient error."""


class MessageStatus(StrEnum):
    """The delivery state of a `LocalMessage`."""

    PENDING = "pending"
    """An operation on it (send, edit or delete) awaits the server's answer."""
    SENT = "sent"
    """The server's copy, with no local change outstanding."""
    FAILED = "failed"
    """The server rejected the operation; see `LocalMessage.error`."""


class OpKind(StrEnum):
    """What a pending operation does."""

    SEND_MESSAGE = "send_message"
    EDIT_MESSAGE = "edit_message"
    DELETE_MESSAGE = "delete_message"
    CREATE_THREAD = "create_thread"
    UPDATE_THREAD = "update_thread"
    MARK_READ = "mark_read"


class OpStatus(StrEnum):
    """How an operation ended."""

    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    CONFLICT = "conflict"


class ChangeKind(StrEnum):
    """What caused a change notification."""

    SNAPSHOT = "snapshot"
    """A snapshot replaced the server state (or a page of older history was merged)."""
    EVENTS = "events"
    """Events from the stream (live or replayed)."""
    LOCAL = "local"
    """A local optimistic operation was queued, retried or dismissed."""
    RESULT = "result"
    """An operation result (or a deferral of a retryable one)."""
    CONNECTION = "connection"
    """The connection state changed."""
    UI = "ui"
    """UI-only state: active thread, loading flags, errors, sync bookkeeping."""


_MESSAGE_OPS = frozenset({OpKind.SEND_MESSAGE, OpKind.EDIT_MESSAGE, OpKind.DELETE_MESSAGE})
_THREAD_OPS = frozenset({OpKind.UPDATE_THREAD, OpKind.MARK_READ})


# -- value types ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpError:
    """Why an operation failed, as the server said it (or the SDK, for local conditions).

    Attributes:
        code: The gRPC status code name, e.g. `PERMISSION_DENIED`.
        reason: The stable `ErrorInfo.reason`, e.g. `NOT_ALLOWED` (None if the status had none).
        message: The status message, for people.
        retry_after: Server-suggested delay before retrying, in seconds, if any.
        field_violations: `(field, description)` pairs for INVALID_ARGUMENT.
    """

    code: str
    reason: str | None
    message: str
    retry_after: float | None = None
    field_violations: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_exception(cls, exc: ThreadlineError) -> OpError:
        """Builds an `OpError` from a typed SDK exception."""
        violations: list[tuple[str, str]] = getattr(exc, "field_violations", [])
        return cls(exc.code.name, exc.reason, exc.message, exc.retry_after, tuple(violations))

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> OpError:
        """Builds an `OpError` from a `google.rpc.Status` (e.g. `OperationResult.rejected`)."""
        return cls.from_exception(from_status_proto(status))

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text


@dataclass(frozen=True, slots=True)
class UiError:
    """An error to show to the user.

    Attributes:
        source: What failed: `op:<client_op_id>` for operations, `connection` for the stream.
        error: The error.
        at: When it happened (Unix seconds).
    """

    source: str
    error: OpError
    at: float


@dataclass(slots=True, eq=False)
class PendingOp:
    """A local operation not yet answered by the server, kept in submission order.

    Attributes:
        op_id: The `client_op_id`, stable across resends so the server applies it once.
        kind: What it does.
        thread_id: The thread concerned.
        target_id: The message id (edit, delete) or thread id (update, mark read); empty for
            sends and thread creation.
        local_id: The `LocalMessage.local_id` it shows on (the op id itself for sends).
        text: New text (send, edit).
        fields: Thread fields (create, update): title, description, tags, archived.
        participant_ids: Other participants (create thread).
        read_seq: The read marker (mark read).
        base_version: The version the change was made from (edit, delete, update).
        sent: Sent at least once; the outcome may be unknown until answered.
        attempts: How many times it was sent.
        not_before: Monotonic time before which it must not be resent (retryable rejection).
        error: The last error (a failed op's reason, or the last retryable rejection).
    """

    op_id: str
    kind: OpKind
    thread_id: str
    target_id: str = ""
    local_id: str = ""
    text: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    participant_ids: tuple[str, ...] = ()
    read_seq: int = 0
    base_version: int = 0
    sent: bool = False
    attempts: int = 0
    not_before: float = 0.0
    error: OpError | None = None

    def to_proto(self) -> realtime_pb2.SendMessage | realtime_pb2.Operation:
        """The frame payload to send: `SendMessage` for sends, `Operation` for the rest."""
        if self.kind is OpKind.SEND_MESSAGE:
            return realtime_pb2.SendMessage(
                client_op_id=self.op_id, thread_id=self.thread_id, text=self.text
            )
        op = realtime_pb2.Operation(client_op_id=self.op_id, base_version=self.base_version)
        if self.kind is OpKind.EDIT_MESSAGE:
            op.kind = realtime_pb2.OPERATION_KIND_UPDATE
            op.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=["text"]))
            op.message.CopyFrom(
                message_pb2.Message(id=self.target_id, thread_id=self.thread_id, text=self.text)
            )
        elif self.kind is OpKind.DELETE_MESSAGE:
            op.kind = realtime_pb2.OPERATION_KIND_DELETE
            op.message.CopyFrom(message_pb2.Message(id=self.target_id, thread_id=self.thread_id))
        elif self.kind is OpKind.CREATE_THREAD:
            op.kind = realtime_pb2.OPERATION_KIND_CREATE
            op.thread.CopyFrom(
                thread_pb2.Thread(
                    title=str(self.fields.get("title", "")),
                    description=str(self.fields.get("description", "")),
                    tags=list(self.fields.get("tags", ())),
                    participant_ids=list(self.participant_ids),
                )
            )
        elif self.kind is OpKind.UPDATE_THREAD:
            op.kind = realtime_pb2.OPERATION_KIND_UPDATE
            thread = thread_pb2.Thread(id=self.target_id)
            paths = sorted(self.fields)
            for path in paths:
                value = self.fields[path]
                if path == "tags":
                    thread.tags.extend(value)
                else:
                    setattr(thread, path, value)
            op.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
            op.thread.CopyFrom(thread)
        else:
            op.kind = realtime_pb2.OPERATION_KIND_UPDATE
            op.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=["read_seq"]))
            op.read_marker.CopyFrom(
                thread_pb2.ReadMarker(thread_id=self.thread_id, read_seq=self.read_seq)
            )
        return op


@dataclass(slots=True, eq=False)
class LocalMessage:
    """A message as the UI shows it: the server's copy with local changes laid over it.

    Compared by identity: the same message is always the same object while it stays in the
    store, and keeps its `local_id` when the server's version replaces a pending one.

    Attributes:
        local_id: Stable identity for UIs: the `client_op_id` of an optimistic send, else the
            message id. A failed edit or delete record has the op id as its `local_id`.
        thread_id: The thread.
        author_id: The author.
        text: The text shown (a pending edit's text; empty on tombstones).
        id: The server's message id (empty while a send is pending).
        seq: Position in the thread (0 while a send is pending).
        version: The server copy's version (0 while a send is pending).
        deleted: Shown as deleted (a tombstone, or a pending delete).
        status: Pending, sent or failed.
        op: For pending sends and failed records: the operation kind.
        client_op_id: The op id of the send that created it (own messages of this client).
        error: Why the operation failed (failed records only).
        create_time: When the server committed it (or when queued, while pending).
        update_time: When it was last edited or deleted on the server.
        server: The server's copy, or None while a send is pending.
    """

    local_id: str
    thread_id: str
    author_id: str
    text: str
    id: str = ""
    seq: int = 0
    version: int = 0
    deleted: bool = False
    status: MessageStatus = MessageStatus.SENT
    op: OpKind | None = None
    client_op_id: str = ""
    error: OpError | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None
    server: message_pb2.Message | None = field(default=None, repr=False)

    @property
    def pending(self) -> bool:
        """True while an operation on this message awaits the server."""
        return self.status is MessageStatus.PENDING

    @property
    def edited(self) -> bool:
        """True when the server copy was edited (version above 1 and not deleted)."""
        return self.version > 1 and not self.deleted


@dataclass(slots=True, eq=False)
class ThreadView:
    """A thread as the UI shows it: the server's copy with pending updates laid over it.

    Attributes:
        id: The thread id.
        title: Title shown (a pending update's value wins).
        description: Description shown.
        tags: Tags shown.
        participant_ids: Participants (sorted).
        archived: Archived as shown.
        creator_id: The creator.
        last_seq: Highest message sequence number known (from the thread and its messages).
        version: The server copy's version.
        read_seq: The caller's read marker (max of the server's and pending mark-reads).
        unread_count: Unread messages by others after `read_seq`.
        last_message: The newest message known (server copy), if any.
        create_time: When the thread was created.
        update_time: When its fields last changed.
        pending: True while an update or mark-read on it awaits the server.
        server: The server's copy of the thread.
    """

    id: str
    title: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    participant_ids: tuple[str, ...] = ()
    archived: bool = False
    creator_id: str = ""
    last_seq: int = 0
    version: int = 0
    read_seq: int = 0
    unread_count: int = 0
    last_message: message_pb2.Message | None = field(default=None, repr=False)
    create_time: datetime | None = None
    update_time: datetime | None = None
    pending: bool = False
    server: thread_pb2.Thread = field(default_factory=thread_pb2.Thread, repr=False)
    # The server's read marker and unread count, before pending mark-reads are laid over them,
    # and the change cursor they were last set at (to order equal markers).
    server_read_seq: int = field(default=0, repr=False)
    server_unread: int = field(default=0, repr=False)
    marker_change_seq: int = field(default=0, repr=False)


@dataclass(frozen=True, slots=True)
class ConflictInfo:
    """An operation the server answered with a `Conflict`, for the session's resolver.

    Attributes:
        op: The operation (already removed from the pending list).
        conflict: The server's Conflict: base, server and client values and conflicting fields.
    """

    op: PendingOp
    conflict: errors_pb2.Conflict

    @property
    def resource(self) -> str:
        """`message`, `thread` or `read_marker`."""
        return self.conflict.server.WhichOneof("resource") or (
            "message" if self.op.kind in _MESSAGE_OPS else "thread"
        )

    @property
    def fields(self) -> tuple[str, ...]:
        """Field paths changed on both sides to different values (e.g. `title`, `text`)."""
        return tuple(self.conflict.fields)

    @property
    def server_version(self) -> int:
        """The server's current version: the base of a resubmitted resolution."""
        return self.conflict.server_version

    @property
    def base(self) -> Any:
        """The resource as of the operation's base version (Message or Thread)."""
        return _snapshot_resource(self.conflict.base)

    @property
    def server(self) -> Any:
        """The resource as the server holds it now (Message or Thread)."""
        return _snapshot_resource(self.conflict.server)

    @property
    def client(self) -> Any:
        """The resource as this client wanted it (Message or Thread)."""
        return _snapshot_resource(self.conflict.client)


@dataclass(frozen=True, slots=True)
class OpOutcome:
    """How an operation ended.

    Attributes:
        op: The operation.
        status: Confirmed, rejected or conflict.
        resource: The confirmed resource (confirmed only; empty for deletes of threads).
        error: The reason (rejected only).
        conflict: The conflict (conflict only).
    """

    op: PendingOp
    status: OpStatus
    resource: errors_pb2.ResourceSnapshot | None = None
    error: OpError | None = None
    conflict: ConflictInfo | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One change notification: what a reducer call changed.

    Attributes:
        kind: What caused it.
        thread_ids: Threads whose view changed (added, updated or removed).
        messages: Messages added or changed (the live objects).
        removed: Messages removed from `messages.by_thread` (moved to failed, dropped with their
            thread, or merged into another identity).
        events: The events that changed state (ignored duplicates are left out).
        outcomes: Operations that ended.
        connection: The new connection state (CONNECTION changes).
    """

    kind: ChangeKind
    thread_ids: frozenset[str] = frozenset()
    messages: tuple[LocalMessage, ...] = ()
    removed: tuple[LocalMessage, ...] = ()
    events: tuple[realtime_pb2.Event, ...] = ()
    outcomes: tuple[OpOutcome, ...] = ()
    connection: ConnectionState | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Server state loaded with unary RPCs (see `threadline_client.session.load_snapshot`).

    Attributes:
        summaries: Every thread of the caller (active and archived) with its read state.
        messages: Recent messages per thread id, oldest first.
        me: The caller's profile and preferences, if loaded.
    """

    summaries: Sequence[thread_pb2.ThreadSummary]
    messages: Mapping[str, Sequence[message_pb2.Message]]
    me: user_service_pb2.GetMeResponse | None = None


# -- state containers -----------------------------------------------------------------------------


@dataclass(slots=True)
class UserState:
    """The signed-in user.

    Attributes:
        id: The user id (from Welcome).
        current: The profile (from the snapshot's GetMe), if loaded.
        online: True while the session is online.
        preferences: The user's preferences, if loaded.
    """

    id: str = ""
    current: user_pb2.User | None = None
    online: bool = False
    preferences: user_pb2.UserPreferences | None = None


@dataclass(slots=True)
class ThreadsState:
    """The user's threads.

    Attributes:
        by_id: Every visible thread by id.
        active: Non-archived threads, most recently active first.
        archived: Archived threads, most recently active first.
        unread: Total unread messages over active threads.
    """

    by_id: dict[str, ThreadView] = field(default_factory=dict)
    active: list[ThreadView] = field(default_factory=list)
    archived: list[ThreadView] = field(default_factory=list)
    unread: int = 0


@dataclass(slots=True)
class MessagesState:
    """Messages.

    Attributes:
        by_thread: Per thread id: messages by `seq`, then pending sends in the order queued.
        pending: Messages with an operation awaiting the server (same objects as in by_thread).
        failed: Failed sends (removed from by_thread) and failed edit/delete records, in order.
    """

    by_thread: dict[str, list[LocalMessage]] = field(default_factory=dict)
    pending: list[LocalMessage] = field(default_factory=list)
    failed: list[LocalMessage] = field(default_factory=list)


@dataclass(slots=True)
class UiState:
    """UI state.

    Attributes:
        active_thread: The thread the user has open.
        loading_states: Loading flags, e.g. `snapshot` or `history:<thread_id>`.
        errors: Recent errors to show (at most 50, oldest dropped).
        typing: Per thread id, the other users typing now.
    """

    active_thread: str | None = None
    loading_states: dict[str, bool] = field(default_factory=dict)
    errors: list[UiError] = field(default_factory=list)
    typing: dict[str, set[str]] = field(default_factory=dict)


@dataclass(slots=True)
class SyncInfo:
    """What the session resumes from.

    Attributes:
        epoch: The server epoch the cursor belongs to.
        change_seq: The highest change cursor applied.
        synced: True when a snapshot or a successful resume backs the cursor (else the next
            connection starts fresh).
        last_synced_at: When the last sync completed (Unix seconds).
        session_id: The current stream's session id.
        recovered: How the last sync completed: True by replay, False by snapshot.
        resyncs: How many times the server required a reload.
        limits: The server's limits from the last Welcome.
    """

    epoch: str = ""
    change_seq: int = 0
    synced: bool = False
    last_synced_at: float | None = None
    session_id: str = ""
    recovered: bool | None = None
    resyncs: int = 0
    limits: realtime_pb2.Limits | None = None


@dataclass(slots=True)
class OpsState:
    """Operations.

    Attributes:
        pending: Unanswered operations, in submission order (sent in this order).
        failed: Rejected operations by op id, kept for `retry`.
    """

    pending: list[PendingOp] = field(default_factory=list)
    failed: dict[str, PendingOp] = field(default_factory=dict)


@dataclass(slots=True)
class ClientState:
    """Everything a client app shows, plus what it needs to resume."""

    user: UserState = field(default_factory=UserState)
    threads: ThreadsState = field(default_factory=ThreadsState)
    messages: MessagesState = field(default_factory=MessagesState)
    ui: UiState = field(default_factory=UiState)
    sync: SyncInfo = field(default_factory=SyncInfo)
    ops: OpsState = field(default_factory=OpsState)
    connection: ConnectionState = ConnectionState.OFFLINE


# -- canonical view -------------------------------------------------------------------------------


class ThreadRow(NamedTuple):
    """One thread in a `SnapshotView`."""

    title: str
    description: str
    tags: tuple[str, ...]
    archived: bool
    participants: tuple[str, ...]
    version: int
    last_seq: int


class MessageRow(NamedTuple):
    """One message in a `SnapshotView`."""

    id: str
    seq: int
    text: str
    deleted: bool
    version: int


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """The server state a client holds, in a canonical comparable form (no local overlays).

    Attributes:
        threads: Visible threads by id.
        messages: Per visible thread id, its known messages by `seq` (an empty tuple if none).
    """

    threads: dict[str, ThreadRow]
    messages: dict[str, tuple[MessageRow, ...]]


def snapshot_view(source: ClientState | Snapshot) -> SnapshotView:
    """Returns the canonical view of a client's state or of a freshly loaded snapshot.

    Only server copies count: pending sends, edits and updates are left out, so a client that
    has caught up compares equal to a fresh snapshot of the same user (with enough history).

    Args:
        source: A client's state, or a `Snapshot` (reduced into a new store first).
    """
    if isinstance(source, Snapshot):
        store = ClientStore()
        store.apply_snapshot(source, epoch="", change_seq=0)
        source = store.state
    threads: dict[str, ThreadRow] = {}
    messages: dict[str, tuple[MessageRow, ...]] = {}
    for tid, view in source.threads.by_id.items():
        s = view.server
        threads[tid] = ThreadRow(
            s.title,
            s.description,
            tuple(s.tags),
            s.archived,
            tuple(sorted(s.participant_ids)),
            s.version,
            view.last_seq,
        )
        rows = [
            MessageRow(m.server.id, m.server.seq, m.server.text, m.server.deleted, m.server.version)
            for m in source.messages.by_thread.get(tid, ())
            if m.server is not None
        ]
        messages[tid] = tuple(sorted(rows, key=lambda r: r.seq))
    return SnapshotView(threads, messages)


# -- helpers --------------------------------------------------------------------------------------


def _copy_message(m: message_pb2.Message) -> message_pb2.Message:
    out = message_pb2.Message()
    out.CopyFrom(m)
    return out


def _copy_thread(t: thread_pb2.Thread) -> thread_pb2.Thread:
    out = thread_pb2.Thread()
    out.CopyFrom(t)
    return out


def _dt(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, name)
    return ts.ToDatetime(tzinfo=UTC)


def _seconds(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def _snapshot_resource(snapshot: errors_pb2.ResourceSnapshot) -> Any:
    kind = snapshot.WhichOneof("resource")
    return getattr(snapshot, kind) if kind else None


class _Delta:
    """What one reducer call changed; becomes a `Change`."""

    __slots__ = ("events", "messages", "outcomes", "removed", "threads")

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.messages: dict[int, LocalMessage] = {}
        self.removed: dict[int, LocalMessage] = {}
        self.events: list[realtime_pb2.Event] = []
        self.outcomes: list[OpOutcome] = []

    def touch(self, message: LocalMessage) -> None:
        self.messages[id(message)] = message
        self.removed.pop(id(message), None)

    def drop(self, message: LocalMessage) -> None:
        self.removed[id(message)] = message
        self.messages.pop(id(message), None)

    def empty(self) -> bool:
        return not (self.threads or self.messages or self.removed or self.events or self.outcomes)

    def change(self, kind: ChangeKind) -> Change:
        return Change(
            kind,
            frozenset(self.threads),
            tuple(self.messages.values()),
            tuple(self.removed.values()),
            tuple(self.events),
            tuple(self.outcomes),
        )


# -- the reducer ----------------------------------------------------------------------------------


class ClientStore:
    """Holds a `ClientState` and applies everything that changes it; observable.

    Every public mutator is synchronous, does no I/O, and notifies subscribers (synchronously,
    in order) and `changes()` iterators once with a `Change`. Methods that only ignore their
    input (duplicates, stale versions) notify nothing.

    Args:
        user_id: The signed-in user, if known before the first Welcome (it decides which
            messages count as unread).
    """

    def __init__(self, user_id: str = "") -> None:
        self.state = ClientState()
        self.state.user.id = user_id
        self._messages: dict[str, LocalMessage] = {}  # local_id -> message in by_thread
        self._by_server_id: dict[str, LocalMessage] = {}
        # Server id -> local id for this client's own sends: keeps a message's identity when a
        # reload replaces the state (the snapshot does not carry client_op_ids).
        self._local_ids: dict[str, str] = {}
        self._ops: dict[str, PendingOp] = {}
        self._ops_by_key: dict[str, list[PendingOp]] = {}
        # Thread id -> version at removal: a stale create/update for it is ignored.
        self._removed_threads: dict[str, int] = {}
        self._subscribers: list[Callable[[Change], None]] = []
        self._queues: set[asyncio.Queue[Change]] = set()

    # -- observing --------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Calls `callback(change)` after every change, synchronously; returns an unsubscriber.

        An exception in a callback is logged and does not stop the others.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def changes(self) -> AsyncIterator[Change]:
        """Yields every change from the first iteration on (buffered without bound).

        Each iterator has its own buffer, released when the iterator is closed.
        """
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)

    def _notify(self, change: Change) -> None:
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:
                logger.exception("state subscriber failed")
        for queue in self._queues:
            queue.put_nowait(change)

    def _commit(self, delta: _Delta, kind: ChangeKind, *, always: bool = False) -> Change | None:
        if delta.threads:
            self._refresh_threads()
        if delta.empty() and not always:
            return None
        change = delta.change(kind)
        self._notify(change)
        return change

    # -- lookups ----------------------------------------------------------------------------

    def message(self, key: str) -> LocalMessage | None:
        """Returns the message with this local id or server id (in by_thread), if any."""
        return self._messages.get(key) or self._by_server_id.get(key)

    def thread(self, thread_id: str) -> ThreadView | None:
        """Returns a visible thread by id, if any."""
        return self.state.threads.by_id.get(thread_id)

    def pending_op(self, op_id: str) -> PendingOp | None:
        """Returns the pending operation with this id, if any."""
        return self._ops.get(op_id)

    def next_op(self) -> PendingOp | None:
        """Returns the oldest pending operation (the next one to send), if any."""
        return self.state.ops.pending[0] if self.state.ops.pending else None

    # -- sync -------------------------------------------------------------------------------

    def sync_state(self) -> realtime_pb2.SyncState:
        """The SyncState to resume with: epoch, cursor, per-thread seqs, unanswered op ids."""
        sync = self.state.sync
        out = realtime_pb2.SyncState(epoch=sync.epoch, change_seq=sync.change_seq)
        for tid, view in self.state.threads.by_id.items():
            if view.last_seq:
                out.thread_seqs[tid] = view.last_seq
        if sync.last_synced_at is not None:
            out.last_synced_at.FromNanoseconds(int(sync.last_synced_at * 1e9))
        out.pending_op_ids.extend(op.op_id for op in self.state.ops.pending if op.sent)
        return out

    def resume_state(self) -> realtime_pb2.SyncState | None:
        """`sync_state()` when the cursor is backed by a completed sync, else None (fresh)."""
        return self.sync_state() if self.state.sync.synced else None

    def apply_welcome(self, welcome: realtime_pb2.Welcome) -> None:
        """Records the session id, user id and limits of a new stream."""
        sync = self.state.sync
        sync.session_id = welcome.session_id
        if welcome.HasField("limits"):
            sync.limits = welcome.limits
        delta = _Delta()
        if welcome.user_id:
            self.state.user.id = welcome.user_id
            for msg in self.state.messages.pending:
                if not msg.author_id:  # queued before the first Welcome named the user
                    msg.author_id = welcome.user_id
                    delta.touch(msg)
        self._commit(delta, ChangeKind.UI, always=True)

    def apply_sync_complete(self, complete: realtime_pb2.SyncComplete) -> None:
        """Records a successful resume: the cursor is where the server says the client is."""
        sync = self.state.sync
        if complete.epoch:
            sync.epoch = complete.epoch
        sync.change_seq = max(sync.change_seq, complete.change_seq)
        sync.synced = True
        sync.recovered = True
        sync.last_synced_at = time.time()
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def note_resync(self, required: realtime_pb2.ResyncRequired) -> None:
        """The server cannot resume this client: the next sync must reload a snapshot.

        Local state is kept until the snapshot replaces it, so the UI does not go blank.
        """
        self.state.sync.synced = False
        self.state.sync.resyncs += 1
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def invalidate_sync(self) -> None:
        """Forgets that the cursor is usable: the next connection starts fresh."""
        self.state.sync.synced = False

    # -- connection and ui ------------------------------------------------------------------

    def set_connection(self, connection: ConnectionState) -> None:
        """Sets the connection state (and `user.online`); notifies only on a real change."""
        if self.state.connection is connection:
            return
        self.state.connection = connection
        self.state.user.online = connection is ConnectionState.ONLINE
        self._notify(Change(ChangeKind.CONNECTION, connection=connection))

    def set_active_thread(self, thread_id: str | None) -> None:
        """Sets the thread the user has open."""
        self.state.ui.active_thread = thread_id
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def set_loading(self, key: str, loading: bool) -> None:
        """Sets or clears a loading flag (`snapshot`, `history:<thread_id>`, ...)."""
        if loading:
            self.state.ui.loading_states[key] = True
        else:
            self.state.ui.loading_states.pop(key, None)
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def add_error(self, source: str, error: OpError) -> None:
        """Appends an error to `ui.errors` (the oldest beyond 50 are dropped)."""
        self._push_error(source, error)
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def _push_error(self, source: str, error: OpError) -> None:
        errors = self.state.ui.errors
        errors.append(UiError(source, error, time.time()))
        del errors[:-_MAX_UI_ERRORS]

    # -- snapshot ---------------------------------------------------------------------------

    def apply_snapshot(self, snapshot: Snapshot, *, epoch: str, change_seq: int) -> Change | None:
        """Replaces the server state with a snapshot taken at or after cursor `change_seq`.

        Threads missing from the snapshot are dropped; messages of a thread are replaced by the
        snapshot's (the same objects are reused for messages still present, so identities hold);
        pending operations stay and keep their overlays. Sets the cursor to `change_seq`.

        Args:
            snapshot: The snapshot.
            epoch: The epoch of `change_seq`.
            change_seq: The cursor the snapshot covers (SyncComplete.change_seq).
        """
        delta = _Delta()
        state = self.state
        if snapshot.me is not None:
            state.user.current = snapshot.me.user
            state.user.preferences = snapshot.me.preferences
            if snapshot.me.user.id:
                state.user.id = snapshot.me.user.id
        present = {s.thread.id for s in snapshot.summaries}
        for tid in [t for t in state.threads.by_id if t not in present]:
            self._drop_thread(tid, delta)
        for summary in snapshot.summaries:
            t = summary.thread
            view = state.threads.by_id.get(t.id)
            if view is None:
                view = ThreadView(id=t.id)
                state.threads.by_id[t.id] = view
            self._removed_threads.pop(t.id, None)
            view.server = _copy_thread(t)
            view.server_read_seq = summary.read_seq
            view.server_unread = summary.unread_count
            view.marker_change_seq = change_seq
            view.last_seq = t.last_seq
            view.last_message = (
                _copy_message(summary.last_message) if summary.HasField("last_message") else None
            )
            self._replace_messages(t.id, snapshot.messages.get(t.id, ()), delta)
            self._recompute_thread(view)
            delta.threads.add(t.id)
        sync = state.sync
        sync.epoch = epoch
        sync.change_seq = change_seq
        sync.synced = True
        sync.recovered = False
        sync.last_synced_at = time.time()
        return self._commit(delta, ChangeKind.SNAPSHOT, always=True)

    def apply_history(self, thread_id: str, messages: Iterable[message_pb2.Message]) -> None:
        """Merges older messages of a thread (e.g. a page loaded on scroll), by version rule."""
        delta = _Delta()
        for m in messages:
            self._upsert_message(m, delta, count_unread=False)
        self._commit(delta, ChangeKind.SNAPSHOT)

    def _replace_messages(
        self, thread_id: str, messages: Sequence[message_pb2.Message], delta: _Delta
    ) -> None:
        old = self.state.messages.by_thread.get(thread_id, [])
        keep_ids = {m.id for m in messages}
        pending_sends = [m for m in old if m.server is None]
        for gone in old:
            if gone.server is not None and gone.id not in keep_ids:
                self._forget_message(gone)
                delta.drop(gone)
        fresh: list[LocalMessage] = []
        for m in sorted(messages, key=lambda x: x.seq):
            msg = self._by_server_id.get(m.id)
            if msg is None:
                msg = self._new_message(m)
            else:
                msg.server = _copy_message(m)
            self._recompute_message(msg)
            fresh.append(msg)
            delta.touch(msg)
        self.state.messages.by_thread[thread_id] = fresh + pending_sends
        if not fresh and not pending_sends:
            del self.state.messages.by_thread[thread_id]
        view = self.state.threads.by_id.get(thread_id)
        if view is not None and fresh:
            view.last_seq = max(view.last_seq, fresh[-1].seq)

    # -- events -----------------------------------------------------------------------------

    def apply_events(
        self, events: Iterable[realtime_pb2.Event], *, replay: bool = False
    ) -> Change | None:
        """Applies events in order; duplicates and stale versions are ignored.

        Args:
            events: The events (one EventBatch, in change_seq order).
            replay: True for replayed events (informational).
        """
        delta = _Delta()
        sync = self.state.sync
        for event in events:
            seq = event.change_seq
            if seq and seq <= sync.change_seq and sync.synced:
                continue  # already applied (a replay overlapping the cursor)
            if self._apply_event(event, delta):
                delta.events.append(event)
            if seq:
                sync.change_seq = max(sync.change_seq, seq)
        return self._commit(delta, ChangeKind.EVENTS)

    def _apply_event(self, event: realtime_pb2.Event, delta: _Delta) -> bool:
        kind = event.kind
        if kind in (
            realtime_pb2.EVENT_KIND_MESSAGE_CREATED,
            realtime_pb2.EVENT_KIND_MESSAGE_UPDATED,
            realtime_pb2.EVENT_KIND_MESSAGE_DELETED,
        ):
            return self._apply_message_event(event, delta)
        if kind in (realtime_pb2.EVENT_KIND_THREAD_CREATED, realtime_pb2.EVENT_KIND_THREAD_UPDATED):
            changed = self._upsert_thread(event.thread, delta)
            op = self._ops.get(event.client_op_id) if event.client_op_id else None
            if op is not None and op.kind in (OpKind.UPDATE_THREAD, OpKind.CREATE_THREAD):
                self._confirm(op, errors_pb2.ResourceSnapshot(thread=event.thread), delta)
                changed = True
            return changed
        if kind == realtime_pb2.EVENT_KIND_THREAD_REMOVED:
            tid = event.thread.id or event.thread_id
            view = self.state.threads.by_id.get(tid)
            if view is not None and event.version and view.server.version > event.version:
                return False  # removed, then added again later: the view is newer
            self._removed_threads[tid] = event.version
            return self._drop_thread(tid, delta)
        if kind == realtime_pb2.EVENT_KIND_READ_MARKER_UPDATED:
            return self._merge_marker(event.read_marker, event.change_seq, delta)
        if kind == realtime_pb2.EVENT_KIND_TYPING:
            typing = event.typing
            users = self.state.ui.typing.setdefault(typing.thread_id or event.thread_id, set())
            if typing.active:
                users.add(typing.user_id)
            else:
                users.discard(typing.user_id)
            delta.threads.add(typing.thread_id or event.thread_id)
            return True
        return False

    def _apply_message_event(self, event: realtime_pb2.Event, delta: _Delta) -> bool:
        m = event.message
        op = self._ops.get(event.client_op_id) if event.client_op_id else None
        if op is not None and op.kind is OpKind.SEND_MESSAGE:
            self._bind_send(op, m, delta)
            self._confirm(op, errors_pb2.ResourceSnapshot(message=m), delta)
            return True
        changed = self._upsert_message(m, delta, count_unread=True)
        if op is not None and op.kind in _MESSAGE_OPS:
            self._confirm(op, errors_pb2.ResourceSnapshot(message=m), delta)
            changed = True
        return changed

    # -- messages ---------------------------------------------------------------------------

    def _counts_unread(self, view: ThreadView | None, m: message_pb2.Message) -> bool:
        return (
            view is not None
            and m.author_id != self.state.user.id
            and not m.deleted
            and m.seq > view.server_read_seq
        )

    def _new_message(self, m: message_pb2.Message) -> LocalMessage:
        local_id = self._local_ids.get(m.id, m.id)
        msg = LocalMessage(
            local_id=local_id,
            thread_id=m.thread_id,
            author_id=m.author_id,
            text=m.text,
            client_op_id=local_id if local_id != m.id else "",
            server=_copy_message(m),
        )
        self._messages[local_id] = msg
        self._by_server_id[m.id] = msg
        return msg

    def _forget_message(self, msg: LocalMessage) -> None:
        if self._messages.get(msg.local_id) is msg:
            del self._messages[msg.local_id]
        if msg.id and self._by_server_id.get(msg.id) is msg:
            del self._by_server_id[msg.id]
        self._set_pending(msg, False)

    def _upsert_message(self, m: message_pb2.Message, delta: _Delta, *, count_unread: bool) -> bool:
        """Applies a server copy of a message by the version rule; True if anything changed."""
        view = self.state.threads.by_id.get(m.thread_id)
        msg = self._by_server_id.get(m.id)
        if msg is not None:
            assert msg.server is not None
            if m.version <= msg.server.version:
                return False
            was_unread = self._counts_unread(view, msg.server)
            msg.server = _copy_message(m)
            if view is not None and was_unread and not self._counts_unread(view, m):
                view.server_unread = max(0, view.server_unread - 1)
            self._recompute_message(msg)
        else:
            if view is None and m.thread_id in self._removed_threads:
                return False  # a late event of a thread the user can no longer see
            msg = self._new_message(m)
            self._recompute_message(msg)
            self._insert_sorted(msg)
            if count_unread and self._counts_unread(view, m):
                assert view is not None
                view.server_unread += 1
        delta.touch(msg)
        self._note_thread_message(m, delta)
        return True

    def _note_thread_message(self, m: message_pb2.Message, delta: _Delta) -> None:
        view = self.state.threads.by_id.get(m.thread_id)
        if view is None:
            return
        view.last_seq = max(view.last_seq, m.seq)
        last = view.last_message
        if last is None or m.seq > last.seq or (m.seq == last.seq and m.version > last.version):
            view.last_message = _copy_message(m)
        self._recompute_thread(view)
        delta.threads.add(view.id)

    def _insert_sorted(self, msg: LocalMessage) -> None:
        """Puts a confirmed message at its `seq` position, before the pending sends."""
        items = self.state.messages.by_thread.setdefault(msg.thread_id, [])
        if msg in items:
            items.remove(msg)
        confirmed = len(items)
        while confirmed and items[confirmed - 1].server is None:
            confirmed -= 1
        index = bisect.bisect_right(items, msg.seq, 0, confirmed, key=lambda x: x.seq)
        items.insert(index, msg)

    def _bind_send(self, op: PendingOp, m: message_pb2.Message, delta: _Delta) -> LocalMessage:
        """Makes the pending message of a send the server's message, in place."""
        msg = self._messages.get(op.local_id)
        if msg is None:
            # Unknown locally (e.g. its thread was dropped meanwhile): show the server's copy.
            msg = LocalMessage(
                local_id=op.local_id,
                thread_id=m.thread_id,
                author_id=m.author_id,
                text=m.text,
                client_op_id=op.op_id,
            )
            self._messages[op.local_id] = msg
        other = self._by_server_id.get(m.id)
        if other is not None and other is not msg:
            # A reload showed this message before the send's outcome was known; keep the
            # identity the user saw first (the pending one) and drop the other.
            if other.server is not None and other.server.version > m.version:
                m = other.server
            self._remove_from_thread(other)
            self._forget_message(other)
            delta.drop(other)
        if msg.server is None or m.version > msg.server.version:
            msg.server = _copy_message(m)
        self._by_server_id[m.id] = msg
        self._local_ids[m.id] = msg.local_id
        self._recompute_message(msg)  # takes the server's seq before it is placed by seq
        self._insert_sorted(msg)
        delta.touch(msg)
        self._note_thread_message(m, delta)
        return msg

    def _remove_from_thread(self, msg: LocalMessage) -> None:
        items = self.state.messages.by_thread.get(msg.thread_id)
        if items is not None and msg in items:
            items.remove(msg)
            if not items:
                del self.state.messages.by_thread[msg.thread_id]

    def _set_pending(self, msg: LocalMessage, pending: bool) -> None:
        items = self.state.messages.pending
        present = msg in items
        if pending and not present:
            items.append(msg)
        elif not pending and present:
            items.remove(msg)

    def _recompute_message(self, msg: LocalMessage) -> None:
        """Server copy, then each pending operation's overlay in order."""
        s = msg.server
        if s is not None:
            msg.id = s.id
            msg.seq = s.seq
            msg.version = s.version
            msg.text = s.text
            msg.deleted = s.deleted
            msg.author_id = s.author_id
            msg.create_time = _dt(s, "create_time")
            msg.update_time = _dt(s, "update_time")
        pending = False
        for op in self._ops_by_key.get(_message_key(msg.local_id), ()):
            pending = True
            if op.kind is OpKind.EDIT_MESSAGE:
                msg.text = op.text
            elif op.kind is OpKind.DELETE_MESSAGE:
                msg.deleted = True
                msg.text = ""
        if pending:
            msg.status = MessageStatus.PENDING
            msg.error = None
        elif msg.status is not MessageStatus.FAILED:
            msg.status = MessageStatus.SENT
        if msg.server is not None and msg.op is OpKind.SEND_MESSAGE and not pending:
            msg.op = None
        self._set_pending(msg, pending)

    # -- threads ----------------------------------------------------------------------------

    def _upsert_thread(self, t: thread_pb2.Thread, delta: _Delta) -> bool:
        """Applies a server copy of a thread by the version rule; True if anything changed."""
        by_id = self.state.threads.by_id
        view = by_id.get(t.id)
        if view is not None:
            if t.version <= view.server.version:
                if t.last_seq > view.last_seq:
                    view.last_seq = t.last_seq
                    delta.threads.add(t.id)
                    return True
                return False
        else:
            removed_at = self._removed_threads.get(t.id)
            if removed_at is not None and t.version <= removed_at:
                return False
            view = ThreadView(id=t.id)
            by_id[t.id] = view
            self._removed_threads.pop(t.id, None)
        view.server = _copy_thread(t)
        view.last_seq = max(view.last_seq, t.last_seq)
        self._recompute_thread(view)
        delta.threads.add(t.id)
        return True

    def _drop_thread(self, thread_id: str, delta: _Delta) -> bool:
        view = self.state.threads.by_id.pop(thread_id, None)
        self.state.ui.typing.pop(thread_id, None)
        items = self.state.messages.by_thread.get(thread_id, [])
        for msg in [m for m in items if m.server is not None]:
            # Pending sends stay (the server will answer them); confirmed messages go.
            items.remove(msg)
            self._forget_message(msg)
            delta.drop(msg)
        if not items:
            self.state.messages.by_thread.pop(thread_id, None)
        if self.state.ui.active_thread == thread_id:
            self.state.ui.active_thread = None
        if view is None:
            return False
        delta.threads.add(thread_id)
        return True

    def _merge_marker(self, marker: thread_pb2.ReadMarker, change_seq: int, delta: _Delta) -> bool:
        """Read markers only move forward; the unread count comes with the newest marker."""
        view = self.state.threads.by_id.get(marker.thread_id)
        if view is None:
            return False
        newer = marker.read_seq > view.server_read_seq or (
            marker.read_seq == view.server_read_seq and change_seq > view.marker_change_seq
        )
        if not newer:
            return False
        view.server_read_seq = marker.read_seq
        view.server_unread = marker.unread_count
        view.marker_change_seq = max(view.marker_change_seq, change_seq)
        self._recompute_thread(view)
        delta.threads.add(view.id)
        return True

    def _recompute_thread(self, view: ThreadView) -> None:
        """Server copy, then pending updates and mark-reads in order."""
        s = view.server
        view.title = s.title
        view.description = s.description
        view.tags = tuple(s.tags)
        view.participant_ids = tuple(sorted(s.participant_ids))
        view.archived = s.archived
        view.creator_id = s.creator_id
        view.version = s.version
        view.create_time = _dt(s, "create_time")
        view.update_time = _dt(s, "update_time")
        read_seq = view.server_read_seq
        ops = self._ops_by_key.get(_thread_key(view.id), ())
        for op in ops:
            if op.kind is OpKind.UPDATE_THREAD:
                for path, value in op.fields.items():
                    setattr(view, path, tuple(value) if path == "tags" else value)
            elif op.kind is OpKind.MARK_READ:
                read_seq = max(read_seq, op.read_seq)
        view.pending = bool(ops)
        view.read_seq = read_seq
        if read_seq == view.server_read_seq:
            view.unread_count = view.server_unread
        elif read_seq >= view.last_seq:
            view.unread_count = 0
        else:
            # Optimistic estimate from the messages at hand; the server's count replaces it.
            view.unread_count = sum(
                1
                for m in self.state.messages.by_thread.get(view.id, ())
                if m.server is not None and self._counts_unread(view, m.server) and m.seq > read_seq
            )

    def _refresh_threads(self) -> None:
        threads = self.state.threads
        ordered = sorted(threads.by_id.values(), key=lambda v: (-_activity(v), v.id))
        threads.active = [v for v in ordered if not v.archived]
        threads.archived = [v for v in ordered if v.archived]
        threads.unread = sum(v.unread_count for v in threads.active)

    # -- operations -------------------------------------------------------------------------

    def _add_op(self, op: PendingOp) -> None:
        self._ops[op.op_id] = op
        self.state.ops.pending.append(op)
        self._ops_by_key.setdefault(_op_key(op), []).append(op)

    def _remove_op(self, op: PendingOp) -> None:
        if self._ops.pop(op.op_id, None) is None:
            return
        self.state.ops.pending.remove(op)
        key = _op_key(op)
        items = self._ops_by_key.get(key, [])
        if op in items:
            items.remove(op)
        if not items:
            self._ops_by_key.pop(key, None)

    def _refresh_target(self, op: PendingOp, delta: _Delta) -> None:
        if op.kind in _MESSAGE_OPS:
            msg = self._messages.get(op.local_id)
            if msg is not None:
                self._recompute_message(msg)
                delta.touch(msg)
        elif op.kind in _THREAD_OPS:
            view = self.state.threads.by_id.get(op.target_id)
            if view is not None:
                self._recompute_thread(view)
                delta.threads.add(view.id)

    def queue_send(self, thread_id: str, text: str, *, op_id: str | None = None) -> LocalMessage:
        """Shows a new message at once as pending and queues its send.

        Args:
            thread_id: The thread.
            text: The text.
            op_id: The `client_op_id` (and local id); fresh when None.

        Returns:
            The pending message; its `local_id` is the op id and never changes.
        """
        op_id = op_id or new_op_id()
        msg = LocalMessage(
            local_id=op_id,
            thread_id=thread_id,
            author_id=self.state.user.id,
            text=text,
            status=MessageStatus.PENDING,
            op=OpKind.SEND_MESSAGE,
            client_op_id=op_id,
            create_time=datetime.now(UTC),
        )
        op = PendingOp(op_id, OpKind.SEND_MESSAGE, thread_id, local_id=op_id, text=text)
        self._messages[op_id] = msg
        self.state.messages.by_thread.setdefault(thread_id, []).append(msg)
        self._add_op(op)
        self._set_pending(msg, True)
        delta = _Delta()
        delta.touch(msg)
        self._commit(delta, ChangeKind.LOCAL)
        return msg

    def _confirmed_message(self, key: str) -> LocalMessage:
        msg = self.message(key)
        if msg is None:
            raise KeyError(f"unknown message {key!r}")
        if msg.server is None:
            raise ValueError("the message is not confirmed yet; edit it once it is sent")
        return msg

    def queue_edit(
        self, message: str, text: str, *, base_version: int | None = None, op_id: str | None = None
    ) -> PendingOp:
        """Shows an edit at once and queues it.

        Args:
            message: The message's local id or server id.
            text: The new text.
            base_version: The version the edit was made from; the server copy's when None.
            op_id: The `client_op_id`; fresh when None.

        Raises:
            KeyError: Unknown message.
            ValueError: The message's send is still pending.
        """
        msg = self._confirmed_message(message)
        assert msg.server is not None
        op = PendingOp(
            op_id or new_op_id(),
            OpKind.EDIT_MESSAGE,
            msg.thread_id,
            target_id=msg.id,
            local_id=msg.local_id,
            text=text,
            base_version=msg.server.version if base_version is None else base_version,
        )
        return self._queue_on_target(op)

    def queue_delete(
        self, message: str, *, base_version: int | None = None, op_id: str | None = None
    ) -> PendingOp:
        """Shows a delete at once (as a tombstone) and queues it. Arguments as `queue_edit`."""
        msg = self._confirmed_message(message)
        assert msg.server is not None
        op = PendingOp(
            op_id or new_op_id(),
            OpKind.DELETE_MESSAGE,
            msg.thread_id,
            target_id=msg.id,
            local_id=msg.local_id,
            base_version=msg.server.version if base_version is None else base_version,
        )
        return self._queue_on_target(op)

    def queue_thread_update(
        self,
        thread_id: str,
        fields: Mapping[str, Any],
        *,
        base_version: int | None = None,
        op_id: str | None = None,
    ) -> PendingOp:
        """Shows new thread fields at once and queues the update.

        Args:
            thread_id: The thread.
            fields: New values of `title`, `description`, `tags` and/or `archived`.
            base_version: The version the change was made from; the server copy's when None.
            op_id: The `client_op_id`; fresh when None.

        Raises:
            KeyError: Unknown thread.
            ValueError: No fields, or a field that cannot be updated.
        """
        view = self.state.threads.by_id.get(thread_id)
        if view is None:
            raise KeyError(f"unknown thread {thread_id!r}")
        unknown = set(fields) - THREAD_UPDATE_FIELDS
        if unknown or not fields:
            raise ValueError(f"thread fields must be some of {sorted(THREAD_UPDATE_FIELDS)}")
        values = {k: (tuple(v) if k == "tags" else v) for k, v in fields.items()}
        op = PendingOp(
            op_id or new_op_id(),
            OpKind.UPDATE_THREAD,
            thread_id,
            target_id=thread_id,
            fields=values,
            base_version=view.server.version if base_version is None else base_version,
        )
        return self._queue_on_target(op)

    def queue_mark_read(
        self, thread_id: str, read_seq: int, *, op_id: str | None = None
    ) -> PendingOp | None:
        """Moves the read marker forward at once and queues it; None if it would not move.

        Raises:
            KeyError: Unknown thread.
        """
        view = self.state.threads.by_id.get(thread_id)
        if view is None:
            raise KeyError(f"unknown thread {thread_id!r}")
        if read_seq <= view.read_seq:
            return None  # markers only move forward: nothing to send
        op = PendingOp(
            op_id or new_op_id(),
            OpKind.MARK_READ,
            thread_id,
            target_id=thread_id,
            read_seq=read_seq,
        )
        return self._queue_on_target(op)

    def queue_create_thread(
        self,
        title: str,
        participant_ids: Iterable[str] = (),
        *,
        description: str = "",
        tags: Iterable[str] = (),
        op_id: str | None = None,
    ) -> PendingOp:
        """Queues a thread creation (not shown until the server confirms it)."""
        op = PendingOp(
            op_id or new_op_id(),
            OpKind.CREATE_THREAD,
            "",
            fields={"title": title, "description": description, "tags": tuple(tags)},
            participant_ids=tuple(participant_ids),
        )
        self._add_op(op)
        self._commit(_Delta(), ChangeKind.LOCAL, always=True)
        return op

    def _queue_on_target(self, op: PendingOp) -> PendingOp:
        self._add_op(op)
        delta = _Delta()
        self._refresh_target(op, delta)
        self._commit(delta, ChangeKind.LOCAL, always=True)
        return op

    def mark_sent(self, op_id: str) -> None:
        """Records that an operation is being sent (its outcome is unknown until answered)."""
        op = self._ops.get(op_id)
        if op is not None:
            op.sent = True
            op.attempts += 1

    def defer(self, op_id: str, delay: float, error: OpError) -> None:
        """Keeps a pending operation after a retryable rejection; resend after `delay` s."""
        op = self._ops.get(op_id)
        if op is None:
            return
        op.not_before = time.monotonic() + delay
        op.error = error
        self._commit(_Delta(), ChangeKind.RESULT, always=True)

    def fail(self, op_id: str, error: OpError) -> None:
        """Fails a pending operation locally (e.g. retries exhausted), as if rejected."""
        op = self._ops.get(op_id)
        if op is None:
            return
        delta = _Delta()
        self._reject(op, error, delta)
        self._commit(delta, ChangeKind.RESULT)

    def retry(self, local_id: str) -> PendingOp:
        """Queues a failed operation again with its original `client_op_id`.

        Args:
            local_id: The failed message's `local_id` (which is the op id), or any failed op id.

        Raises:
            KeyError: No failed operation has this id.
        """
        op = self.state.ops.failed.pop(local_id, None)
        if op is None:
            raise KeyError(f"no failed operation {local_id!r}")
        op.error = None
        op.attempts = 0
        op.not_before = 0.0
        delta = _Delta()
        records = [m for m in self.state.messages.failed if m.local_id == local_id]
        for record in records:
            self.state.messages.failed.remove(record)
            delta.drop(record)
        self._add_op(op)
        if op.kind is OpKind.SEND_MESSAGE:
            # The failed message itself goes back (same object, same local id) as pending.
            msg = (
                records[0]
                if records
                else LocalMessage(
                    local_id=op.local_id,
                    thread_id=op.thread_id,
                    author_id=self.state.user.id,
                    text=op.text,
                    client_op_id=op.op_id,
                )
            )
            msg.op = OpKind.SEND_MESSAGE
            msg.status = MessageStatus.PENDING
            msg.error = None
            self._messages[op.local_id] = msg
            self.state.messages.by_thread.setdefault(op.thread_id, []).append(msg)
            self._recompute_message(msg)
            delta.touch(msg)
        else:
            self._refresh_target(op, delta)
        self._commit(delta, ChangeKind.LOCAL, always=True)
        return op

    def dismiss_failed(self, local_id: str) -> None:
        """Forgets a failed operation and its failed record (the user gave up on it)."""
        self.state.ops.failed.pop(local_id, None)
        delta = _Delta()
        for record in [m for m in self.state.messages.failed if m.local_id == local_id]:
            self.state.messages.failed.remove(record)
            delta.drop(record)
        self._commit(delta, ChangeKind.LOCAL, always=True)

    # -- results ----------------------------------------------------------------------------

    def apply_result(self, result: realtime_pb2.OperationResult) -> Change | None:
        """Applies an operation's outcome.

        Confirmed: the pending item becomes the server's version in place. Rejected: the overlay
        is removed and the op lands in `ops.failed` (and `messages.failed` for message ops) with
        the server's reason. Conflict: the overlay is removed, the server's value applied, and
        the outcome (with a `ConflictInfo`) reported for the resolver. A result for an op that
        is no longer pending (a duplicate) only applies its resource by the version rule.
        """
        delta = _Delta()
        op = self._ops.get(result.client_op_id)
        outcome = result.WhichOneof("outcome")
        if outcome == "confirmed":
            snapshot = result.confirmed
            if op is not None and op.kind is OpKind.SEND_MESSAGE and snapshot.HasField("message"):
                self._bind_send(op, snapshot.message, delta)
            else:
                self._apply_resource(snapshot, result.change_seq, delta)
            if op is not None:
                self._confirm(op, snapshot, delta)
        elif outcome == "rejected" and op is not None:
            self._reject(op, OpError.from_status(result.rejected), delta)
        elif outcome == "conflict" and op is not None:
            self._apply_resource(result.conflict.server, 0, delta)
            self._remove_op(op)
            self._refresh_target(op, delta)
            delta.outcomes.append(
                OpOutcome(op, OpStatus.CONFLICT, conflict=ConflictInfo(op, result.conflict))
            )
        return self._commit(delta, ChangeKind.RESULT)

    def _apply_resource(
        self, snapshot: errors_pb2.ResourceSnapshot, change_seq: int, delta: _Delta
    ) -> None:
        kind = snapshot.WhichOneof("resource")
        if kind == "message":
            self._upsert_message(snapshot.message, delta, count_unread=True)
        elif kind == "thread":
            self._upsert_thread(snapshot.thread, delta)
        elif kind == "read_marker":
            self._merge_marker(snapshot.read_marker, change_seq, delta)

    def _confirm(self, op: PendingOp, snapshot: errors_pb2.ResourceSnapshot, delta: _Delta) -> None:
        if op.op_id not in self._ops:
            return
        self._remove_op(op)
        version = 0
        kind = snapshot.WhichOneof("resource")
        if kind == "message":
            version = snapshot.message.version
        elif kind == "thread":
            version = snapshot.thread.version
        if version and op.kind in (
            OpKind.EDIT_MESSAGE,
            OpKind.DELETE_MESSAGE,
            OpKind.UPDATE_THREAD,
        ):
            # Later edits of the same resource were made on top of this one (its overlay was
            # showing), so their real base is the version this one produced.
            for later in self._ops_by_key.get(_op_key(op), ()):
                if later.base_version == op.base_version and later.kind is not OpKind.MARK_READ:
                    later.base_version = version
        self._refresh_target(op, delta)
        delta.outcomes.append(OpOutcome(op, OpStatus.CONFIRMED, resource=snapshot))

    def _reject(self, op: PendingOp, error: OpError, delta: _Delta) -> None:
        self._remove_op(op)
        op.error = error
        self.state.ops.failed[op.op_id] = op
        self._push_error(f"op:{op.op_id}", error)
        if op.kind is OpKind.SEND_MESSAGE:
            msg = self._messages.pop(op.local_id, None)
            if msg is not None:
                self._remove_from_thread(msg)
                self._set_pending(msg, False)
                msg.status = MessageStatus.FAILED
                msg.error = error
                self.state.messages.failed.append(msg)
                delta.drop(msg)
        elif op.kind in (OpKind.EDIT_MESSAGE, OpKind.DELETE_MESSAGE):
            target = self._messages.get(op.local_id)
            self._refresh_target(op, delta)
            self.state.messages.failed.append(
                LocalMessage(
                    local_id=op.op_id,
                    thread_id=op.thread_id,
                    author_id=target.author_id if target is not None else "",
                    text=op.text,
                    id=op.target_id,
                    seq=target.seq if target is not None else 0,
                    version=op.base_version,
                    deleted=op.kind is OpKind.DELETE_MESSAGE,
                    status=MessageStatus.FAILED,
                    op=op.kind,
                    client_op_id=op.op_id,
                    error=error,
                )
            )
        else:
            self._refresh_target(op, delta)
        delta.outcomes.append(OpOutcome(op, OpStatus.REJECTED, error=error))

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, *, epoch: str = "", change_seq: int = 0, user_id: str = ""
    ) -> ClientStore:
        """A new store holding a snapshot."""
        store = cls(user_id)
        store.apply_snapshot(snapshot, epoch=epoch, change_seq=change_seq)
        return store


def _message_key(local_id: str) -> str:
    return f"m:{local_id}"


def _thread_key(thread_id: str) -> str:
    return f"t:{thread_id}"


def _op_key(op: PendingOp) -> str:
    if op.kind in _MESSAGE_OPS:
        return _message_key(op.local_id)
    if op.kind in _THREAD_OPS:
        return _thread_key(op.target_id)
    return f"o:{op.op_id}"


def _activity(view: ThreadView) -> float:
    last = view.last_message
    last_time = last.create_time.seconds if last is not None and last.HasField("create_time") else 0
    return max(float(last_time), _seconds(view.update_time), _seconds(view.create_time))
