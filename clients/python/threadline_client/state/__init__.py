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

from threadline_client.state.models import (
    THREAD_UPDATE_FIELDS,
    Change,
    ChangeKind,
    ClientState,
    ConflictInfo,
    ConnectionState,
    LocalMessage,
    MessagesState,
    MessageStatus,
    OpError,
    OpKind,
    OpOutcome,
    OpsState,
    OpStatus,
    PendingOp,
    Snapshot,
    SyncInfo,
    ThreadsState,
    ThreadView,
    UiError,
    UiState,
    UserState,
)
from threadline_client.state.store import ClientStore
from threadline_client.state.views import MessageRow, SnapshotView, ThreadRow, snapshot_view

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
