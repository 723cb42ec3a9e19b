"""The store's state and indexes, lookups, commits, and the views recomputed from overlays."""

from __future__ import annotations

import bisect
import time

from threadline.v1 import message_pb2
from threadline_client.state._common import (
    _MAX_UI_ERRORS,
    _activity,
    _copy_message,
    _Delta,
    _dt,
    _message_key,
    _op_key,
    _thread_key,
)
from threadline_client.state.models import (
    _MESSAGE_OPS,
    _THREAD_OPS,
    Change,
    ChangeKind,
    ClientState,
    LocalMessage,
    MessageStatus,
    OpError,
    OpKind,
    PendingOp,
    ThreadView,
    UiError,
)
from threadline_client.state.notify import _Notifier


class _StoreCore(_Notifier):
    """A `ClientState` with its indexes; recomputes messages and threads as server + overlays."""

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
        super().__init__()

    # -- commits ----------------------------------------------------------------------------

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

    # -- ui errors --------------------------------------------------------------------------

    def _push_error(self, source: str, error: OpError) -> None:
        errors = self.state.ui.errors
        errors.append(UiError(source, error, time.time()))
        del errors[:-_MAX_UI_ERRORS]

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
