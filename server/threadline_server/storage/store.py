"""The SQL implementation of the domain's Store port: threads, members, messages, the change log
and idempotency keys, with events published only after COMMIT."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import and_, delete, func, insert, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.merge import merge_fields, merge_text
from threadline_server.domain.models import (
    Event,
    EventKind,
    Message,
    Preferences,
    Principal,
    ReadMarker,
    Thread,
    ThreadSummary,
    User,
)
from threadline_server.domain.ports import (
    OpKey,
    SendItem,
    SendOutcome,
    StoredOp,
    ThreadChange,
    ThreadCursor,
)
from threadline_server.errors import (
    DomainError,
    FailedPrecondition,
    IdempotencyKeyReused,
    MergeConflict,
    NotFound,
    PermissionDenied,
    Unavailable,
    VersionMismatch,
)
from threadline_server.storage.db import Database, WriteTx
from threadline_server.storage.history import (
    message_at,
    prune,
    replay,
    save_message_revision,
    save_thread_revision,
    stored_ops,
    thread_at,
)
from threadline_server.storage.rows import aware, message_from_row, thread_from_row
from threadline_server.storage.tables import (
    changes,
    messages,
    operations,
    server_state,
    thread_members,
    threads,
    users,
)
from threadline_server.storage.uploads import (
    attach,
    attachments_for,
    check_attachable,
    release_messages,
    release_thread,
)

Publish = Callable[[list[Event]], None]
P = ParamSpec("P")
R = TypeVar("R")


def runs_to_completion(
    fn: Callable[Concatenate[SqlStore, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SqlStore, P], Coroutine[Any, Any, R]]:
    """A write that has started finishes, even if its caller is cancelled (a client hanging up,
    a server stopping): a transaction cut off between BEGIN IMMEDIATE and COMMIT can leave its
    connection holding the database's write lock. The caller's outcome is then "unknown", which
    the protocol already covers: retry with the same client_op_id. `SqlStore.drain` waits for
    these before the engine is disposed."""

    async def wrapper(self: SqlStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        task = asyncio.ensure_future(fn(self, *args, **kwargs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    # Not functools.wraps: mypy loses the Concatenate[SqlStore, P] signature through it.
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


class SqlStore:
    """Store port on SQLAlchemy Core. Every write runs in one transaction under the node's write
    lock; its events are handed to `publish` after COMMIT (see Database.write)."""

    def __init__(self, db: Database, publish: Publish) -> None:
        self._db = db
        self._publish = publish
        self._inflight: set[asyncio.Future[Any]] = set()

    async def drain(self) -> None:
        """Waits for writes whose callers went away (see runs_to_completion)."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    # ---- shared write helpers -------------------------------------------------------------

    async def _next_change_seqs(self, conn: AsyncConnection, count: int) -> int:
        """Reserves `count` change cursors; returns the first. Taken last in every transaction
        so that its row lock orders commits (and thus cursors) without gaps."""
        result = await conn.execute(
            update(server_state)
            .where(server_state.c.id == 1)
            .values(change_seq=server_state.c.change_seq + count)
            .returning(server_state.c.change_seq)
        )
        return int(result.scalar_one()) - count + 1

    async def _check_op(self, conn: AsyncConnection, key: OpKey | None) -> StoredOp | None:
        if key is None:
            return None
        row = (
            await conn.execute(
                select(operations).where(
                    operations.c.user_id == key.user_id,
                    operations.c.client_op_id == key.client_op_id,
                )
            )
        ).first()
        if row is None:
            return None
        if bytes(row.payload_hash) != key.payload_hash:
            raise IdempotencyKeyReused(key.client_op_id)
        return StoredOp(row.resource_kind, row.resource_id, row.change_seq, row.result_version)

    async def _record_op(
        self,
        conn: AsyncConnection,
        key: OpKey | None,
        kind: str,
        resource_id: str,
        seq: int,
        version: int = 0,
    ) -> None:
        if key is None:
            return
        await conn.execute(
            insert(operations).values(
                user_id=key.user_id,
                client_op_id=key.client_op_id,
                payload_hash=key.payload_hash,
                resource_kind=kind,
                resource_id=resource_id,
                change_seq=seq,
                result_version=version,
                created_at=_now(),
            )
        )

    async def _insert_changes(self, conn: AsyncConnection, events: Sequence[Event]) -> None:
        rows = [
            {
                "change_seq": e.change_seq,
                "thread_id": e.thread_id,
                "user_id": next(iter(e.recipients)) if e.personal else None,
                "kind": e.kind.value,
                "thread_seq": e.thread_seq,
                "version": e.version,
                "actor_id": e.actor_id,
                "resource_id": _resource_id(e),
                "client_op_id": e.client_op_id,
                "created_at": e.created_at,
            }
            for e in events
        ]
        if rows:
            await conn.execute(insert(changes), rows)

    def _publish_after(self, tx: WriteTx, events: list[Event]) -> None:
        if events:
            tx.after_commit(lambda: self._publish(events))

    async def _members(
        self, conn: AsyncConnection, thread_ids: Iterable[str]
    ) -> dict[str, set[str]]:
        ids = list(set(thread_ids))
        out: dict[str, set[str]] = {tid: set() for tid in ids}
        if not ids:
            return out
        rows = await conn.execute(
            select(thread_members.c.thread_id, thread_members.c.user_id).where(
                thread_members.c.thread_id.in_(ids)
            )
        )
        for thread_id, user_id in rows:
            out[thread_id].add(user_id)
        return out

    async def _thread_for_member(
        self, conn: AsyncConnection, user_id: str, thread_id: str, *, lock: bool = False
    ) -> tuple[Row[Any], set[str]]:
        """The thread row and its members; NotFound unless `user_id` participates."""
        stmt = select(threads).where(threads.c.id == thread_id)
        if lock and not self._db.is_sqlite:
            stmt = stmt.with_for_update()
        row = (await conn.execute(stmt)).first()
        members = (await self._members(conn, [thread_id]))[thread_id] if row else set()
        if row is None or user_id not in members:
            raise NotFound("thread", thread_id)
        return row, members

    async def _ensure_users(self, conn: AsyncConnection, user_ids: Iterable[str]) -> None:
        """Placeholder rows for users named before they ever signed in."""
        ids = list(set(user_ids))
        if not ids:
            return
        known = set((await conn.execute(select(users.c.id).where(users.c.id.in_(ids)))).scalars())
        missing = [
            {"id": uid, "created_at": _now(), "seen": False} for uid in ids if uid not in known
        ]
        if missing:
            await conn.execute(insert(users), missing)

    # ---- users ----------------------------------------------------------------------------

    @runs_to_completion
    async def upsert_user(self, principal: Principal) -> None:
        async with self._db.write() as tx:
            conn = tx.conn
            row = (await conn.execute(select(users).where(users.c.id == principal.user_id))).first()
            values = {
                "display_name": principal.display_name,
                "email": principal.email,
                "image_url": principal.image_url,
                "seen": True,
            }
            if row is None:
                await conn.execute(
                    insert(users).values(id=principal.user_id, created_at=_now(), **values)
                )
            elif any(getattr(row, k) != v for k, v in values.items()):
                await conn.execute(
                    update(users).where(users.c.id == principal.user_id).values(**values)
                )

    async def get_user(self, user_id: str) -> tuple[User, Preferences]:
        async with self._db.read() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        if row is None:
            raise NotFound("user", user_id)
        return _user(row), _prefs(row)

    @runs_to_completion
    async def update_preferences(
        self, user_id: str, values: dict[str, Any], expected_version: int
    ) -> Preferences:
        columns = {
            f"pref_{k}" if k != "notifications_enabled" else "pref_notifications": v
            for k, v in values.items()
        }
        async with self._db.write() as tx:
            row = (await tx.conn.execute(select(users).where(users.c.id == user_id))).first()
            if row is None:
                raise NotFound("user", user_id)
            if expected_version and row.pref_version != expected_version:
                raise VersionMismatch("preferences", f"users/{user_id}", row.pref_version)
            await tx.conn.execute(
                update(users)
                .where(users.c.id == user_id)
                .values(pref_version=users.c.pref_version + 1, **columns)
            )
            row = (await tx.conn.execute(select(users).where(users.c.id == user_id))).one()
        return _prefs(row)

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
            count = 1 + len(removed) + len(added)
            first = await self._next_change_seqs(conn, count)
            events = []
            if new_members:
                # Existing members see an update; newcomers see the thread appear.
                stay = frozenset(new_members - set(added))
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

    def _thread_event(
        self,
        seq: int,
        kind: EventKind,
        thread: Thread,
        actor: str,
        now: datetime,
        recipients: frozenset[str],
        op_id: str,
    ) -> Event:
        return Event(
            seq,
            kind,
            thread.id,
            thread.last_seq,
            thread.version,
            actor,
            now,
            thread,
            recipients,
            op_id,
        )

    def _removed_event(
        self,
        seq: int,
        thread_id: str,
        last_seq: int,
        version: int,
        actor: str,
        now: datetime,
        user: str,
        op_id: str,
    ) -> Event:
        return Event(
            seq,
            EventKind.THREAD_REMOVED,
            thread_id,
            last_seq,
            version,
            actor,
            now,
            None,
            frozenset([user]),
            op_id,
            personal=True,
        )

    async def _removal_events(
        self,
        conn: AsyncConnection,
        thread_id: str,
        last_seq: int,
        version: int,
        actor: str,
        members: list[str],
        now: datetime,
        op_id: str,
    ) -> list[Event]:
        first = await self._next_change_seqs(conn, len(members))
        events = [
            self._removed_event(first + i, thread_id, last_seq, version, actor, now, user, op_id)
            for i, user in enumerate(members)
        ]
        await self._insert_changes(conn, events)
        return events

    async def get_thread(self, user_id: str, thread_id: str) -> ThreadSummary:
        async with self._db.read() as conn:
            row, _ = await self._thread_for_member(conn, user_id, thread_id)
            return (await self._summaries(conn, user_id, [row]))[0]

    async def list_threads(
        self, user_id: str, archived: bool | None, limit: int, after: ThreadCursor | None
    ) -> tuple[list[ThreadSummary], ThreadCursor | None]:
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
        cursor = None
        if len(rows) > limit:
            last = page[-1]
            stamp = aware(last.last_activity_at)
            assert stamp is not None
            cursor = ThreadCursor(stamp, last.id)
        return summaries, cursor

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
            await self._thread_for_member(conn, user_id, thread_id)
            rows = list((await conn.execute(stmt)).all())
            page = [message_from_row(r) for r in rows[:limit]]
            files = await attachments_for(conn, [m.id for m in page])
        page = [replace(m, attachments=files[m.id]) if m.id in files else m for m in page]
        return page, len(rows) > limit

    async def send_messages(self, items: Sequence[SendItem]) -> list[SendOutcome | DomainError]:
        """Group commit: every item in one transaction; per-thread seqs stay gapless.

        Items that fail validation get their error and write nothing; the others commit
        together, and each sender's outcome resolves only after that COMMIT.
        """
        try:
            return await self._send_batch(items)
        except FailedPrecondition as exc:
            # An upload checked as free was attached by another node meanwhile.
            if len(items) == 1:
                return [exc]
            return [(await self.send_messages([item]))[0] for item in items]
        except IntegrityError:
            if len(items) == 1:
                # Another node committed the same op id first: answer from its record.
                return await self._send_batch(items)
            # Isolate the item that raced (e.g. on another node) so it cannot sink the others.
            return [(await self._send_batch([item]))[0] for item in items]

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
            current = message_from_row(row)
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

    # ---- sync -----------------------------------------------------------------------------

    async def resume_point(self) -> tuple[str, int, int]:
        """(epoch, current change cursor, highest pruned cursor)."""
        async with self._db.read() as conn:
            row = (await conn.execute(select(server_state).where(server_state.c.id == 1))).one()
        return str(row.epoch), int(row.change_seq), int(row.pruned_through)

    async def replay(
        self, user_id: str, after: int, upto: int, limit: int
    ) -> tuple[list[Event], int | None]:
        async with self._db.read() as conn:
            return await replay(conn, user_id, after, upto, limit)

    async def stored_results(
        self, user_id: str, op_ids: Sequence[str]
    ) -> list[tuple[str, StoredOp, Message | Thread | None]]:
        """Original outcomes of operations the client is unsure about (SyncState.pending)."""
        async with self._db.read() as conn:
            out: list[tuple[str, StoredOp, Message | Thread | None]] = []
            for row in await stored_ops(conn, user_id, op_ids):
                op = StoredOp(
                    row.resource_kind, row.resource_id, row.change_seq, row.result_version
                )
                resource: Message | Thread | None
                if op.resource_kind == "message":
                    resource = await message_at(conn, op.resource_id, op.result_version or 1)
                else:
                    resource = await thread_at(conn, op.resource_id, op.result_version)
                out.append((row.client_op_id, op, resource))
            return out

    @runs_to_completion
    async def prune(self, retention_s: int, idempotency_window_s: int) -> tuple[int, int]:
        async with self._db.write() as tx:
            return await prune(tx.conn, _now(), retention_s, idempotency_window_s)

    async def current_change_seq(self) -> tuple[str, int]:
        async with self._db.read() as conn:
            row = (await conn.execute(select(server_state).where(server_state.c.id == 1))).one()
        return str(row.epoch), int(row.change_seq)

    async def thread_members(self, thread_id: str) -> set[str]:
        async with self._db.read() as conn:
            return (await self._members(conn, [thread_id]))[thread_id]


def _field_values(thread: Thread, fields: dict[str, Any]) -> dict[str, Any]:
    return {name: _record_fields({name: getattr(thread, name)})[name] for name in fields}


def _record_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Field values as the Thread record holds them (tags as a tuple)."""
    return {k: tuple(v) if k == "tags" else v for k, v in fields.items()}


def _resource_id(event: Event) -> str:
    payload = event.payload
    if isinstance(payload, Message):
        return payload.id
    return event.thread_id


def _user(row: Row[Any]) -> User:
    created = aware(row.created_at)
    assert created is not None
    return User(row.id, row.display_name, row.email, row.image_url, created)


def _prefs(row: Row[Any]) -> Preferences:
    return Preferences(
        theme=row.pref_theme,
        locale=row.pref_locale,
        time_zone=row.pref_time_zone,
        notifications_enabled=bool(row.pref_notifications),
        version=row.pref_version,
    )


__all__ = ["DomainError", "SqlStore", "new_id"]
