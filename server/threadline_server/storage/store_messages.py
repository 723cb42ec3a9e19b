"""Messages in the SQL store: listing, group-committed sends with attachments, edits."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.merge import merge_text
from threadline_server.domain.models import Event, EventKind, Message
from threadline_server.domain.ports import OpKey, SendItem, SendOutcome
from threadline_server.errors import (
    DomainError,
    FailedPrecondition,
    IdempotencyKeyReused,
    MergeConflict,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from threadline_server.storage.history import save_message_revision
from threadline_server.storage.hot import SendWriter
from threadline_server.storage.hot import plan as hot_plan
from threadline_server.storage.hot.errors import WriteRaced
from threadline_server.storage.rows import message_from_row
from threadline_server.storage.store_base import _now, new_id, runs_to_completion
from threadline_server.storage.store_threads import ThreadStore
from threadline_server.storage.tables import messages, operations, threads
from threadline_server.storage.uploads import (
    attach,
    attachments_for,
    check_attachable,
    release_messages,
)
from threadline_server.storage.versions import message_at

logger = logging.getLogger(__name__)


class MessageStore(ThreadStore):
    """Messages and their attachments."""

    # ---- messages -------------------------------------------------------------------------

    async def list_messages(
        self, user_id: str, thread_id: str, *, forward: bool, start_seq: int, limit: int
    ) -> tuple[list[Message], bool]:
        """Messages after (forward) or before (backward) `start_seq`; and whether more exist."""
        stmt = select(messages).where(messages.c.thread_id == thread_id).limit(limit + 1)
        if forward:
            stmt = stmt.where(messages.c.seq > start_seq).order_by(messages.c.seq.asc())
        else:
            if start_seq > 0:
                stmt = stmt.where(messages.c.seq < start_seq)
            stmt = stmt.order_by(messages.c.seq.desc())
        async with self._db.read() as conn:
            await self._require_member(conn, user_id, thread_id)
            rows = list((await conn.execute(stmt)).all())
            page = [message_from_row(r) for r in rows[:limit]]
            files = await attachments_for(conn, [m.id for m in page])
        page = [replace(m, attachments=files[m.id]) if m.id in files else m for m in page]
        return page, len(rows) > limit

    async def send_messages(self, items: Sequence[SendItem]) -> list[SendOutcome | DomainError]:
        """Group commit: every item in one transaction; per-thread seqs stay gapless.

        Items that fail validation get their error and write nothing; the others commit
        together, and each sender's outcome resolves only after that COMMIT. Batches without
        attachments take the driver-level writer (storage.hot), the others the engine.
        """
        try:
            return await self._send_once(items)
        except FailedPrecondition as exc:
            # An upload checked as free was attached by another node meanwhile.
            if len(items) == 1:
                return [exc]
            return [(await self.send_messages([item]))[0] for item in items]
        except (IntegrityError, WriteRaced):
            if len(items) == 1:
                # Another node committed the same op id first: answer from its record.
                return await self._send_once(items)
            # Isolate the item that raced (e.g. on another node) so it cannot sink the others.
            return [(await self._send_once([item]))[0] for item in items]

    async def _send_once(self, items: Sequence[SendItem]) -> list[SendOutcome | DomainError]:
        writer = self._db.send_writer
        if writer is None or any(item.attachment_ids for item in items):
            return await self._send_batch(items)
        return await self._send_direct(writer, items)

    async def _send_direct(
        self, writer: SendWriter, items: Sequence[SendItem]
    ) -> list[SendOutcome | DomainError]:
        started = time.perf_counter()
        async with self._db.write_lock:
            plan, written = await writer.write(items, _now())
            if written.events:  # under the lock: delivery order is commit order
                self._committed(written.events)
        elapsed = time.perf_counter() - started
        if elapsed >= self._db.slow_query_s:
            self._db.on_slow_query()
            logger.warning("slow send transaction (%.3f s, %d messages)", elapsed, len(items))
        earlier: dict[str, Message] = {}
        replayed = hot_plan.replayed_ids(plan)
        if replayed:  # the original result: the message as it was sent, even if edited since
            async with self._db.read() as conn:
                for message_id in replayed:
                    first_version = await message_at(conn, message_id, 1)
                    if first_version is not None:
                        earlier[message_id] = first_version
        return hot_plan.finish(plan, earlier)

    async def _send_batch(self, items: Sequence[SendItem]) -> list[SendOutcome | DomainError]:
        async with self._db.write() as tx:
            conn = tx.conn
            keys = {(i.user_id, i.client_op_id) for i in items}
            existing = {
                (r.user_id, r.client_op_id): r
                for r in await conn.execute(
                    select(operations).where(
                        tuple_(operations.c.user_id, operations.c.client_op_id).in_(list(keys))
                    )
                )
            }
            members = await self._members(conn, {i.thread_id for i in items})
            outcomes: list[SendOutcome | DomainError | None] = [None] * len(items)
            accepted: list[int] = []
            first_of: dict[tuple[str, str], int] = {}
            replays: dict[int, str] = {}
            taken: set[str] = set()  # uploads claimed by earlier items of this batch
            now = _now()
            for idx, item in enumerate(items):
                key = (item.user_id, item.client_op_id)
                prior = existing.get(key)
                if prior is not None:
                    if bytes(prior.payload_hash) != item.payload_hash:
                        outcomes[idx] = IdempotencyKeyReused(item.client_op_id)
                    else:
                        replays[idx] = prior.resource_id
                elif key in first_of:
                    first = items[first_of[key]]
                    if first.payload_hash != item.payload_hash:
                        outcomes[idx] = IdempotencyKeyReused(item.client_op_id)
                    else:
                        replays[idx] = f"@{first_of[key]}"
                elif item.user_id not in members.get(item.thread_id, ()):
                    outcomes[idx] = NotFound("thread", item.thread_id)
                else:
                    if item.attachment_ids:
                        try:
                            await check_attachable(
                                conn, item.user_id, item.attachment_ids, taken=taken, now=now
                            )
                        except FailedPrecondition as exc:
                            outcomes[idx] = exc
                            continue
                    first_of[key] = idx
                    accepted.append(idx)

            now = _now()
            by_thread: dict[str, list[int]] = defaultdict(list)
            for idx in accepted:
                by_thread[items[idx].thread_id].append(idx)
            seq_of: dict[int, int] = {}
            # Lock thread rows in id order: two batches never wait on each other in a cycle.
            for thread_id in sorted(by_thread):
                idxs = by_thread[thread_id]
                last = (
                    await conn.execute(
                        update(threads)
                        .where(threads.c.id == thread_id)
                        .values(last_seq=threads.c.last_seq + len(idxs), last_activity_at=now)
                        .returning(threads.c.last_seq)
                    )
                ).scalar_one_or_none()
                if last is None:  # deleted between the member check and now
                    for idx in idxs:
                        outcomes[idx] = NotFound("thread", thread_id)
                    continue
                for offset, idx in enumerate(idxs):
                    seq_of[idx] = int(last) - len(idxs) + 1 + offset
            written = [idx for idx in accepted if idx in seq_of]
            events: list[Event] = []
            if written:
                change = await self._next_change_seqs(conn, len(written))
                message_rows, op_rows = [], []
                for idx in written:
                    item = items[idx]
                    msg = Message(
                        new_id(),
                        item.thread_id,
                        seq_of[idx],
                        item.user_id,
                        item.text,
                        1,
                        False,
                        now,
                        None,
                    )
                    message_rows.append(
                        {
                            "id": msg.id,
                            "thread_id": msg.thread_id,
                            "seq": msg.seq,
                            "author_id": msg.author_id,
                            "text": msg.text,
                            "version": 1,
                            "deleted": False,
                            "created_at": now,
                        }
                    )
                    op_rows.append(
                        {
                            "user_id": item.user_id,
                            "client_op_id": item.client_op_id,
                            "payload_hash": item.payload_hash,
                            "resource_kind": "message",
                            "resource_id": msg.id,
                            "change_seq": change,
                            "result_version": 1,
                            "created_at": now,
                        }
                    )
                    event = Event(
                        change,
                        EventKind.MESSAGE_CREATED,
                        msg.thread_id,
                        msg.seq,
                        1,
                        msg.author_id,
                        now,
                        msg,
                        frozenset(members[msg.thread_id]),
                        item.client_op_id,
                    )
                    events.append(event)
                    outcomes[idx] = SendOutcome(msg, change, False)
                    change += 1
                await conn.execute(insert(messages), message_rows)
                for pos, idx in enumerate(written):
                    item = items[idx]
                    if item.attachment_ids:
                        await self._attach(conn, item, events, pos, outcomes, idx, now)
                await conn.execute(insert(operations), op_rows)
                await self._insert_changes(conn, events)
            if replays:
                ids = [rid for rid in replays.values() if not rid.startswith("@")]
                # The original result: the message as it was sent (version 1), even if edited since.
                found = {}
                for rid in ids:
                    first_version = await message_at(conn, rid, 1)
                    if first_version is not None:
                        found[rid] = first_version
                for idx, rid in replays.items():
                    if rid.startswith("@"):
                        original = outcomes[int(rid[1:])]
                        if isinstance(original, SendOutcome):
                            outcomes[idx] = SendOutcome(original.message, original.change_seq, True)
                        else:
                            outcomes[idx] = original
                    elif rid in found:
                        prior = existing[(items[idx].user_id, items[idx].client_op_id)]
                        outcomes[idx] = SendOutcome(found[rid], int(prior.change_seq), True)
                    else:  # the message's thread was deleted since
                        outcomes[idx] = NotFound("message", rid)
            self._publish_after(tx, events)
        return [o if o is not None else Unavailable("INTERNAL", "lost outcome") for o in outcomes]

    @runs_to_completion
    async def change_message(
        self,
        actor: str,
        message_id: str,
        *,
        text: str | None,
        base_version: int,
        op: OpKey | None,
    ) -> tuple[Message, int, bool]:
        """Edits (`text`) or deletes (`text is None`) the actor's own message.

        An edit made from an older version is merged word by word with what changed since;
        overlapping edits raise MergeConflict and write nothing. Returns the message after the
        change, the change cursor of its event, and whether this was a replay.
        """
        async with self._db.write() as tx:
            conn = tx.conn
            stored = await self._check_op(conn, op)
            if stored is not None:
                old = await message_at(conn, stored.resource_id, stored.result_version)
                if old is None:
                    raise NotFound("message", message_id)
                return old, stored.change_seq, True
            stmt = select(messages).where(messages.c.id == message_id)
            if not self._db.is_sqlite:
                stmt = stmt.with_for_update()
            row = (await conn.execute(stmt)).first()
            members = (await self._members(conn, [row.thread_id]))[row.thread_id] if row else set()
            if row is None or actor not in members:
                raise NotFound("message", message_id)
            if row.author_id != actor:
                raise PermissionDenied("only the author can change a message")
            if row.deleted:
                raise FailedPrecondition(
                    "RESOURCE_DELETED", "the message was deleted", subject=message_id
                )
            # An edit keeps the message's files: its event, result and cached copy carry them.
            files = (await attachments_for(conn, [message_id])).get(message_id, ())
            current = replace(message_from_row(row), attachments=files)
            now = _now()
            if text is not None and base_version and base_version != row.version:
                base = await message_at(conn, message_id, base_version)
                merged = merge_text(base.text, row.text, text) if base is not None else None
                if not isinstance(merged, str):
                    wanted = replace(current, text=text)
                    raise MergeConflict(base or current, current, wanted, row.version, ["text"])
                text = merged
            await save_message_revision(conn, row, now)
            deleted = text is None
            if deleted:  # its files go with it, at the same COMMIT
                await release_messages(conn, [message_id])
            await conn.execute(
                update(messages)
                .where(messages.c.id == message_id)
                .values(
                    text="" if deleted else text,
                    deleted=deleted,
                    version=messages.c.version + 1,
                    updated_at=now,
                )
            )
            after = replace(
                current,
                text="" if text is None else text,
                deleted=deleted,
                version=row.version + 1,
                updated_at=now,
                attachments=() if deleted else current.attachments,
            )
            seq = await self._next_change_seqs(conn, 1)
            kind = EventKind.MESSAGE_DELETED if deleted else EventKind.MESSAGE_UPDATED
            event = Event(
                seq,
                kind,
                row.thread_id,
                row.seq,
                after.version,
                actor,
                now,
                after,
                frozenset(members),
                op.client_op_id if op else "",
            )
            await self._insert_changes(conn, [event])
            await self._record_op(conn, op, "message", message_id, seq, after.version)
            self._publish_after(tx, [event])
            return after, seq, False

    @staticmethod
    async def _attach(
        conn: AsyncConnection,
        item: SendItem,
        events: list[Event],
        pos: int,
        outcomes: list[SendOutcome | DomainError | None],
        idx: int,
        now: datetime,
    ) -> None:
        """Attaches a new message's uploads in its commit transaction; the event and the result
        then carry the attachment metadata."""
        event = events[pos]
        assert isinstance(event.payload, Message)
        attachments = await attach(
            conn, item.user_id, event.payload.id, item.attachment_ids, now=now
        )
        message = replace(event.payload, attachments=attachments)
        events[pos] = replace(event, payload=message)
        outcomes[idx] = SendOutcome(message, event.change_seq, False)
