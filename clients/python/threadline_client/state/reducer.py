"""The reducer for server data: welcome and sync, snapshots, history, events and op results."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from threadline.v1 import errors_pb2, message_pb2, realtime_pb2, thread_pb2
from threadline_client.state._common import _copy_message, _copy_thread, _Delta, _op_key
from threadline_client.state.core import _StoreCore
from threadline_client.state.models import (
    _MESSAGE_OPS,
    Change,
    ChangeKind,
    ConflictInfo,
    LocalMessage,
    MessageStatus,
    OpError,
    OpKind,
    OpOutcome,
    OpStatus,
    PendingOp,
    Snapshot,
    ThreadView,
)


class _ServerReducer(_StoreCore):
    """Applies what the server sends, by the version rule, to the state."""

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
        # Presence arrives afresh on every stream (a snapshot after SyncComplete): whoever went
        # offline while this client was disconnected must not stay online here.
        self.state.ui.online.clear()
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

    def apply_joined(
        self, summary: thread_pb2.ThreadSummary, messages: Iterable[message_pb2.Message]
    ) -> None:
        """Fills in a thread the user was just added to: a THREAD_CREATED event carries only the
        thread, so its read state, unread count, newest message and recent history are fetched
        afterwards (see ThreadlineSession) and merged here by the version rule."""
        t = summary.thread
        view = self.state.threads.by_id.get(t.id)
        if view is None:  # removed again before the fetch came back
            return
        delta = _Delta()
        if view.server.version <= t.version:
            view.server = _copy_thread(t)
        newest = summary.last_message if summary.HasField("last_message") else None
        current = view.last_message
        if newest is not None and (
            current is None or (newest.seq, newest.version) > (current.seq, current.version)
        ):
            # A live edit may already have given us a newer version of the same message.
            view.last_message = _copy_message(newest)
        for m in messages:
            self._upsert_message(m, delta, count_unread=False)
        view.last_seq = max(view.last_seq, t.last_seq)
        if view.server_read_seq <= summary.read_seq:
            view.server_read_seq = summary.read_seq
            held = [
                local.server
                for local in self.state.messages.by_thread.get(t.id, [])
                if local.server is not None
            ]
            seqs = {m.seq for m in held}
            if all(seq in seqs for seq in range(summary.read_seq + 1, t.last_seq + 1)):
                # Every message after the marker is here, as it is now (deleted ones as
                # tombstones): count them directly. The summary and the page come from two
                # reads, so a delete between them would otherwise be counted once too often.
                view.server_unread = sum(1 for m in held if self._counts_unread(view, m))
            else:
                # Only part of the unread range was loaded: the summary counted what existed up
                # to its last_seq; later messages are here (from live events, or from the page,
                # whose events are then dropped as duplicates) and count on top of it.
                view.server_unread = summary.unread_count + sum(
                    1 for m in held if m.seq > t.last_seq and self._counts_unread(view, m)
                )
        self._recompute_thread(view)
        delta.threads.add(t.id)
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
        if kind == realtime_pb2.EVENT_KIND_PRESENCE:
            if event.presence.online:
                self.state.ui.online.add(event.presence.user_id)
            else:
                self.state.ui.online.discard(event.presence.user_id)
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
