"""Threads in the SQL store: creating, changing, listing and reading them, read markers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.merge import merge_fields
from threadline_server.domain.models import Event, EventKind, ReadMarker, Thread, ThreadSummary
from threadline_server.domain.ports import OpKey, ThreadChange, ThreadCursor
from threadline_server.errors import MergeConflict, NotFound, PermissionDenied, VersionMismatch
from threadline_server.storage.history import save_thread_revision
from threadline_server.storage.rows import aware, message_from_row, thread_from_row
from threadline_server.storage.store_base import _now, new_id, runs_to_completion
from threadline_server.storage.store_users import UserStore
from threadline_server.storage.tables import messages, thread_members, threads
from threadline_server.storage.uploads import attachments_for, release_thread
from threadline_server.storage.versions import thread_at


class ThreadStore(UserStore):
    """Threads, their members and read markers."""

    # ---- threads --------------------------------------------------------------------------

    @runs_to_completion
    async def create_thread(
        self,
        actor: str,
        title: str,
        description: str,
        tags: Sequence[str],
        participant_ids: Sequence[str],
        op: OpKey | None,
    ) -> tuple[Thread, bool]:
        """Returns the thread and whether it was a replay of an earlier identical request."""
        async with self._db.write() as tx:
            conn = tx.conn
            stored = await self._check_op(conn, op)
            if stored is not None:
                row, members = await self._thread_for_member(conn, actor, stored.resource_id)
                return thread_from_row(row, members), True
            now = _now()
            thread_id = new_id()
            member_ids = sorted(set(participant_ids) | {actor})
            await self._ensure_users(conn, member_ids)
            await conn.execute(
                insert(threads).values(
                    id=thread_id,
                    title=title,
                    description=description,
                    tags=json.dumps(list(tags)),
                    archived=False,
                    creator_id=actor,
                    last_seq=0,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    last_activity_at=now,
                )
            )
            await conn.execute(
                insert(thread_members),
                [
                    {"thread_id": thread_id, "user_id": m, "read_seq": 0, "joined_at": now}
                    for m in member_ids
                ],
            )
            row = (await conn.execute(select(threads).where(threads.c.id == thread_id))).one()
            thread = thread_from_row(row, member_ids)
            seq = await self._next_change_seqs(conn, 1)
            event = Event(
                change_seq=seq,
                kind=EventKind.THREAD_CREATED,
                thread_id=thread_id,
                thread_seq=0,
                version=1,
                actor_id=actor,
                created_at=now,
                payload=thread,
                recipients=frozenset(member_ids),
                client_op_id=op.client_op_id if op else "",
            )
            await self._insert_changes(conn, [event])
            await self._record_op(conn, op, "thread", thread_id, seq)
            self._publish_after(tx, [event])
            return thread, False

    @runs_to_completion
    async def change_thread(
        self, actor: str, thread_id: str, change: ThreadChange, op: OpKey | None
    ) -> tuple[Thread | None, bool]:
        """Applies one change to a thread's fields or members in one transaction.

        Returns the thread after the change (None when it was deleted or the actor removed
        itself) and whether this was a replay.
        """
        async with self._db.write() as tx:
            conn = tx.conn
            stored = await self._check_op(conn, op)
            if stored is not None:
                try:
                    await self._thread_for_member(conn, actor, thread_id)
                except NotFound:
                    return None, True
                return await thread_at(conn, thread_id, stored.result_version), True
            row, members = await self._thread_for_member(conn, actor, thread_id, lock=True)
            if change.expected_version and row.version != change.expected_version:
                raise VersionMismatch("thread", f"threads/{thread_id}", row.version)
            now = _now()
            fields = dict(change.fields)
            if change.base_version and change.base_version != row.version and fields:
                fields = await self._merged_fields(conn, row, members, change, fields)
            await save_thread_revision(conn, row, sorted(members), now)
            op_id = op.client_op_id if op else ""
            if change.delete:
                if row.creator_id != actor:
                    raise PermissionDenied("only the thread's creator can delete it")
                await release_thread(conn, thread_id)
                await conn.execute(delete(threads).where(threads.c.id == thread_id))
                events = await self._removal_events(
                    conn,
                    thread_id,
                    row.last_seq,
                    row.version + 1,
                    actor,
                    sorted(members),
                    now,
                    op_id,
                )
                await self._record_op(conn, op, "thread", thread_id, events[0].change_seq)
                self._publish_after(tx, events)
                return None, False
            others = set(change.remove_participants) - {actor}
            if others & members and row.creator_id != actor:
                raise PermissionDenied("only the thread's creator can remove other participants")
            new_members: set[str] = set(members)
            new_members |= set(change.add_participants)
            new_members -= set(change.remove_participants)
            removed = sorted(members - new_members)
            added = sorted(new_members - members)
            values: dict[str, Any] = fields
            if "tags" in values:
                values["tags"] = json.dumps(list(values["tags"]))
            await conn.execute(
                update(threads)
                .where(threads.c.id == thread_id)
                .values(version=threads.c.version + 1, updated_at=now, **values)
            )
            if added:
                await self._ensure_users(conn, added)
                await conn.execute(
                    insert(thread_members),
                    [
                        {"thread_id": thread_id, "user_id": u, "read_seq": 0, "joined_at": now}
                        for u in added
                    ],
                )
            if removed:
                await conn.execute(
                    delete(thread_members).where(
                        thread_members.c.thread_id == thread_id,
                        thread_members.c.user_id.in_(removed),
                    )
                )
            row = (await conn.execute(select(threads).where(threads.c.id == thread_id))).one()
            thread = thread_from_row(row, new_members)
            # Existing members see an update; newcomers see the thread appear. One cursor per
            # event: a cursor without its change row would be a hole every node of a cluster
            # waits out (cluster.delivery) before reading past it.
            stay = frozenset(new_members - set(added))
            count = (1 if stay else 0) + len(added) + len(removed)
            first = await self._next_change_seqs(conn, count) if count else 0
            events = []
            if new_members:
                if stay:
                    events.append(
                        self._thread_event(
                            first, EventKind.THREAD_UPDATED, thread, actor, now, stay, op_id
                        )
                    )
                    first += 1
                for user in added:
                    joined = self._thread_event(
                        first,
                        EventKind.THREAD_CREATED,
                        thread,
                        actor,
                        now,
                        frozenset([user]),
                        op_id,
                    )
                    events.append(replace(joined, personal=True))
                    first += 1
            for user in removed:
                events.append(
                    self._removed_event(
                        first, thread_id, row.last_seq, row.version, actor, now, user, op_id
                    )
                )
                first += 1
            await self._insert_changes(conn, events)
            await self._record_op(
                conn, op, "thread", thread_id, events[0].change_seq if events else 0, row.version
            )
            if not new_members:
                await release_thread(conn, thread_id)
                await conn.execute(delete(threads).where(threads.c.id == thread_id))
            self._publish_after(tx, events)
            return (thread if actor in new_members else None), False

    async def _merged_fields(
        self,
        conn: AsyncConnection,
        row: Row[Any],
        members: set[str],
        change: ThreadChange,
        fields: dict[str, Any],
    ) -> dict[str, Any]:
        """Three-way merge of the client's fields (made from change.base_version) with the
        thread as it is now; raises MergeConflict on overlaps."""
        current = thread_from_row(row, members)
        base = await thread_at(conn, row.id, change.base_version)
        if base is None:  # unknown or pruned base: everything the client set is an overlap
            wanted = replace(current, **_record_fields(fields))
            raise MergeConflict(current, current, wanted, row.version, sorted(fields))
        outcome = merge_fields(_field_values(base, fields), _field_values(current, fields), fields)
        if outcome.conflicts:
            wanted = replace(base, **_record_fields(fields))
            raise MergeConflict(base, current, wanted, row.version, outcome.conflicts)
        return outcome.values

    async def get_thread(self, user_id: str, thread_id: str) -> ThreadSummary:
        async with self._db.read() as conn:
            row, _ = await self._thread_for_member(conn, user_id, thread_id)
            return (await self._summaries(conn, user_id, [row]))[0]

    async def list_threads(
        self, user_id: str, archived: bool | None, limit: int, after: ThreadCursor | None
    ) -> tuple[list[tuple[ThreadSummary, ThreadCursor]], bool]:
        stmt = (
            select(threads)
            .join(thread_members, thread_members.c.thread_id == threads.c.id)
            .where(thread_members.c.user_id == user_id)
            .order_by(threads.c.last_activity_at.desc(), threads.c.id.desc())
            .limit(limit + 1)
        )
        if archived is not None:
            stmt = stmt.where(threads.c.archived == archived)
        if after is not None:
            stmt = stmt.where(
                tuple_(threads.c.last_activity_at, threads.c.id)
                < tuple_(after.last_activity_at, after.thread_id)
            )
        async with self._db.read() as conn:
            rows = list((await conn.execute(stmt)).all())
            page = rows[:limit]
            summaries = await self._summaries(conn, user_id, page)
        positions = []
        for row in page:
            stamp = aware(row.last_activity_at)
            assert stamp is not None
            positions.append(ThreadCursor(stamp, row.id))
        return list(zip(summaries, positions, strict=True)), len(rows) > limit

    async def _summaries(
        self, conn: AsyncConnection, user_id: str, rows: Sequence[Row[Any]]
    ) -> list[ThreadSummary]:
        """Read state, unread counts and newest messages for a page: four queries, no N+1."""
        ids = [r.id for r in rows]
        if not ids:
            return []
        members = await self._members(conn, ids)
        reads = dict(
            (
                await conn.execute(
                    select(thread_members.c.thread_id, thread_members.c.read_seq).where(
                        thread_members.c.user_id == user_id, thread_members.c.thread_id.in_(ids)
                    )
                )
            ).all()
        )
        unread = await self._unread_counts(conn, user_id, ids)
        last_rows = await conn.execute(
            select(messages)
            .join(
                threads,
                and_(threads.c.id == messages.c.thread_id, threads.c.last_seq == messages.c.seq),
            )
            .where(threads.c.id.in_(ids))
        )
        last = {r.thread_id: message_from_row(r) for r in last_rows}
        files = await attachments_for(conn, [m.id for m in last.values()])
        last = {t: replace(m, attachments=files.get(m.id, ())) for t, m in last.items()}
        return [
            ThreadSummary(
                thread=thread_from_row(r, members[r.id]),
                read_seq=int(reads.get(r.id, 0)),
                unread_count=unread.get(r.id, 0),
                last_message=last.get(r.id),
            )
            for r in rows
        ]

    async def _unread_counts(
        self, conn: AsyncConnection, user_id: str, thread_ids: Sequence[str]
    ) -> dict[str, int]:
        rows = await conn.execute(
            select(messages.c.thread_id, func.count())
            .join(
                thread_members,
                and_(
                    thread_members.c.thread_id == messages.c.thread_id,
                    thread_members.c.user_id == user_id,
                ),
            )
            .where(
                messages.c.thread_id.in_(thread_ids),
                messages.c.seq > thread_members.c.read_seq,
                messages.c.author_id != user_id,
                messages.c.deleted.is_(False),
            )
            .group_by(messages.c.thread_id)
        )
        return {tid: int(n) for tid, n in rows}

    @runs_to_completion
    async def mark_read(self, user_id: str, thread_id: str, read_seq: int) -> ReadMarker:
        async with self._db.write() as tx:
            conn = tx.conn
            row, _ = await self._thread_for_member(conn, user_id, thread_id)
            target = min(read_seq, row.last_seq)
            # Max-merge: a stale device can never move the marker back.
            result = await conn.execute(
                update(thread_members)
                .where(
                    thread_members.c.thread_id == thread_id,
                    thread_members.c.user_id == user_id,
                    thread_members.c.read_seq < target,
                )
                .values(read_seq=target)
            )
            current = (
                await conn.execute(
                    select(thread_members.c.read_seq).where(
                        thread_members.c.thread_id == thread_id, thread_members.c.user_id == user_id
                    )
                )
            ).scalar_one()
            unread = (await self._unread_counts(conn, user_id, [thread_id])).get(thread_id, 0)
            marker = ReadMarker(thread_id, user_id, int(current), unread)
            if result.rowcount:
                seq = await self._next_change_seqs(conn, 1)
                event = Event(
                    seq,
                    EventKind.READ_MARKER_UPDATED,
                    thread_id,
                    row.last_seq,
                    int(current),
                    user_id,
                    _now(),
                    marker,
                    frozenset([user_id]),
                    personal=True,
                )
                await self._insert_changes(conn, [event])
                self._publish_after(tx, [event])
            return marker


def _field_values(thread: Thread, fields: dict[str, Any]) -> dict[str, Any]:
    return {name: _record_fields({name: getattr(thread, name)})[name] for name in fields}


def _record_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Field values as the Thread record holds them (tags as a tuple)."""
    return {k: tuple(v) if k == "tags" else v for k, v in fields.items()}
