"""Sending messages: validation, then group commit through one writer task.

Messages arriving together from many streams share one transaction (see SqlStore.send_messages);
each sender's result resolves only after that COMMIT, so an acknowledgement always means durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from threadline_server.config import LimitsSettings
from threadline_server.domain.ports import OpKey, SendItem, SendOutcome, Store
from threadline_server.domain.uploads import Uploads
from threadline_server.domain.validation import (
    Violations,
    check_id,
    check_op_id,
    check_text,
    payload_hash,
)
from threadline_server.errors import DomainError, Unavailable

logger = logging.getLogger(__name__)


class GroupCommitter:
    """Collects pending sends and writes whatever has queued up in one transaction."""

    def __init__(
        self,
        store: Store,
        max_batch: int,
        observe_batch: Callable[[int], None] = lambda _size: None,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._observe_batch = observe_batch
        self._queue: asyncio.Queue[tuple[SendItem, asyncio.Future[SendOutcome]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-committer")

    async def stop(self) -> None:
        """Finishes everything queued, then stops."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def submit(self, item: SendItem) -> SendOutcome:
        if self._task is None:
            raise Unavailable("SERVER_DRAINING", "server is shutting down")
        future: asyncio.Future[SendOutcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        # Shielded: a sender that hangs up mid-commit must not cancel its neighbours' batch.
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._observe_batch(len(batch))
            try:
                outcomes: Sequence[SendOutcome | DomainError] = await self._store.send_messages(
                    [item for item, _ in batch]
                )
            except DomainError as exc:
                outcomes = [exc] * len(batch)
            except Exception:
                logger.exception("group commit failed")
                outcomes = [Unavailable("BACKEND_UNAVAILABLE", "write failed")] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    if isinstance(outcome, DomainError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                self._queue.task_done()


class Messaging:
    """Message use cases."""

    def __init__(
        self, committer: GroupCommitter, store: Store, uploads: Uploads, limits: LimitsSettings
    ) -> None:
        self._committer = committer
        self._store = store
        self._uploads = uploads
        self._limits = limits

    async def send(
        self,
        actor: str,
        *,
        client_op_id: str,
        thread_id: str,
        text: str,
        attachment_ids: Sequence[str],
        field_prefix: str = "",
    ) -> SendOutcome:
        """Validates, then commits through the group committer. Idempotent on client_op_id."""
        v = Violations()
        check_op_id(v, f"{field_prefix}client_op_id", client_op_id, required=True)
        check_id(v, f"{field_prefix}thread_id", thread_id, "thread_id")
        check_text(
            v,
            f"{field_prefix}text",
            text,
            max_bytes=self._limits.max_message_bytes,
            allow_empty=bool(attachment_ids),
        )
        if len(attachment_ids) > self._limits.max_attachments:
            v.add(f"{field_prefix}attachment_ids", f"at most {self._limits.max_attachments}")
        if len(set(attachment_ids)) != len(attachment_ids):
            v.add(f"{field_prefix}attachment_ids", "attachment ids must be unique")
        for i, upload_id in enumerate(attachment_ids):
            check_id(v, f"{field_prefix}attachment_ids[{i}]", upload_id, "upload id")
        v.raise_if_any()
        # Whether each upload is ready, the sender's and free is decided inside the commit
        # transaction (storage.uploads.check_attachable): a repeated send must find its original
        # result there, not fail because its uploads are attached (to itself) by now.
        item = SendItem(
            user_id=actor,
            client_op_id=client_op_id,
            thread_id=thread_id,
            text=text,
            payload_hash=payload_hash(
                "send", thread_id=thread_id, text=text, attachments=list(attachment_ids)
            ),
            attachment_ids=tuple(attachment_ids),
        )
        return await self._committer.submit(item)

    async def edit(
        self,
        actor: str,
        *,
        client_op_id: str,
        message_id: str,
        text: str,
        base_version: int,
        field_prefix: str = "",
    ) -> SendOutcome:
        """Edits the actor's own message; an edit from an older version is merged three-way."""
        v = Violations()
        check_op_id(v, f"{field_prefix}client_op_id", client_op_id, required=True)
        check_id(v, f"{field_prefix}message.id", message_id, "message id")
        check_text(v, f"{field_prefix}message.text", text, max_bytes=self._limits.max_message_bytes)
        if base_version < 0:
            v.add(f"{field_prefix}base_version", "base_version must not be negative")
        v.raise_if_any()
        key = OpKey(
            actor,
            client_op_id,
            payload_hash("edit", message_id=message_id, text=text, base_version=base_version),
        )
        message, seq, replayed = await self._store.change_message(
            actor, message_id, text=text, base_version=base_version, op=key
        )
        return SendOutcome(message, seq, replayed)

    async def delete(
        self, actor: str, *, client_op_id: str, message_id: str, field_prefix: str = ""
    ) -> SendOutcome:
        """Deletes the actor's own message, leaving a tombstone that keeps its seq."""
        v = Violations()
        check_op_id(v, f"{field_prefix}client_op_id", client_op_id, required=True)
        check_id(v, f"{field_prefix}message.id", message_id, "message id")
        v.raise_if_any()
        key = OpKey(actor, client_op_id, payload_hash("delete_message", message_id=message_id))
        message, seq, replayed = await self._store.change_message(
            actor, message_id, text=None, base_version=0, op=key
        )
        return SendOutcome(message, seq, replayed)
