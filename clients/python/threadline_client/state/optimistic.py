"""Optimistic local operations: queue_* overlays, send bookkeeping, defer, fail and retry."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from threadline_client.ids import new_op_id
from threadline_client.state._common import _Delta
from threadline_client.state.models import (
    THREAD_UPDATE_FIELDS,
    ChangeKind,
    LocalMessage,
    MessageStatus,
    OpError,
    OpKind,
    PendingOp,
)
from threadline_client.state.reducer import _ServerReducer


class _OptimisticOps(_ServerReducer):
    """Queues local operations, shown at once as overlays until the server answers them."""

    # -- queueing ---------------------------------------------------------------------------

    def queue_send(
        self,
        thread_id: str,
        text: str,
        *,
        op_id: str | None = None,
        attachment_ids: Sequence[str] = (),
    ) -> LocalMessage:
        """Shows a new message at once as pending and queues its send.

        Args:
            thread_id: The thread.
            text: The text.
            op_id: The `client_op_id` (and local id); fresh when None.
            attachment_ids: Completed uploads to attach (`complete_upload` first).

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
        op = PendingOp(
            op_id,
            OpKind.SEND_MESSAGE,
            thread_id,
            local_id=op_id,
            text=text,
            attachment_ids=tuple(attachment_ids),
        )
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

    # -- sending, failure and retry ---------------------------------------------------------

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
