"""The state's data types: enums, value types (ops, messages, threads, changes) and containers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from google.protobuf import field_mask_pb2
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

THREAD_UPDATE_FIELDS = frozenset({"title", "description", "tags", "archived"})
"""Thread fields an UPDATE operation may name in its mask."""


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
        attachment_ids: Completed uploads the message carries (send).
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
    attachment_ids: tuple[str, ...] = ()
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
                client_op_id=self.op_id,
                thread_id=self.thread_id,
                text=self.text,
                attachment_ids=list(self.attachment_ids),
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
        online: Users who share a thread with this user and have a live stream now.
    """

    active_thread: str | None = None
    loading_states: dict[str, bool] = field(default_factory=dict)
    errors: list[UiError] = field(default_factory=list)
    typing: dict[str, set[str]] = field(default_factory=dict)
    online: set[str] = field(default_factory=set)


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


# -- helpers --------------------------------------------------------------------------------------


def _snapshot_resource(snapshot: errors_pb2.ResourceSnapshot) -> Any:
    kind = snapshot.WhichOneof("resource")
    return getattr(snapshot, kind) if kind else None
