"""Superseded versions of messages and threads, replay of the change log, and pruning."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.models import Event, EventKind, Message, ReadMarker, Thread
from threadline_server.storage.cache import MessageCache
from threadline_server.storage.rows import aware, message_from_row, thread_from_row
from threadline_server.storage.tables import (
    changes,
    message_revisions,
    messages,
    operations,
    server_state,
    thread_members,
    thread_revisions,
    threads,
)
from threadline_server.storage.uploads import attachments_for

_MESSAGE_KINDS = {
    EventKind.MESSAGE_CREATED.value,
    EventKind.MESSAGE_UPDATED.value,
    EventKind.MESSAGE_DELETED.value,
}
_THREAD_KINDS = {EventKind.THREAD_CREATED.value, EventKind.THREAD_UPDATED.value}


async def save_message_revision(conn: AsyncConnection, row: Row[Any], now: datetime) -> None:
    """Keeps the version about to be superseded (merge base, exact replay)."""
    await conn.execute(
        insert(message_revisions).values(
            message_id=row.id,
            version=row.version,
            text=row.text,
            deleted=row.deleted,
            updated_at=row.updated_at,
            superseded_at=now,
        )
    )


async def save_thread_revision(
    conn: AsyncConnection, row: Row[Any], members: Sequence[str], now: datetime
) -> None:
    await conn.execute(
        insert(thread_revisions).values(
            thread_id=row.id,
            version=row.version,
            title=row.title,
            description=row.description,
            tags=row.tags,
            archived=row.archived,
            participants=json.dumps(sorted(members)),
            last_seq=row.last_seq,
            updated_at=row.updated_at,
            superseded_at=now,
        )
    )


async def message_at(
    conn: AsyncConnection, message_id: str, version: int, cache: MessageCache | None = None
) -> Message | None:
    """The message as it was at `version` (None if unknown or pruned). With a cache, the
    current version is served from and remembered in it."""
    if cache is not None and version > 0:
        hit = cache.get(message_id, version)
        if hit is not None:
            return hit
    row = (await conn.execute(select(messages).where(messages.c.id == message_id))).first()
    if row is None:
        return None
    current = message_from_row(row)
    files = (await attachments_for(conn, [message_id])).get(message_id, ())
    current = replace(current, attachments=files)
    if version in (0, current.version):
        if cache is not None:
            cache.fill(current)
        return current
    rev = (
        await conn.execute(
            select(message_revisions).where(
                message_revisions.c.message_id == message_id,
                message_revisions.c.version == version,
            )
        )
    ).first()
    if rev is None:
        return None
    return Message(
        current.id,
        current.thread_id,
        current.seq,
        current.author_id,
        rev.text,
        version,
        bool(rev.deleted),
        current.created_at,
        aware(rev.updated_at),
        current.attachments,
    )


async def thread_at(
    conn: AsyncConnection, thread_id: str, version: int, members: Sequence[str] | None = None
) -> Thread | None:
    """The thread as it was at `version` (None if unknown or pruned)."""
    row = (await conn.execute(select(threads).where(threads.c.id == thread_id))).first()
    if row is None:
        return None
    if version in (0, row.version):
        if members is None:
            members = list(
                (
                    await conn.execute(
                        select(thread_members.c.user_id).where(
                            thread_members.c.thread_id == thread_id
                        )
                    )
                ).scalars()
            )
        return thread_from_row(row, members)
    rev = (
        await conn.execute(
            select(thread_revisions).where(
                thread_revisions.c.thread_id == thread_id, thread_revisions.c.version == version
            )
        )
    ).first()
    if rev is None:
        return None
    updated = aware(rev.updated_at)
    created = aware(row.created_at)
    assert updated is not None and created is not None
    return Thread(
        id=thread_id,
        title=rev.title,
        description=rev.description,
        tags=tuple(json.loads(rev.tags)),
        participant_ids=tuple(json.loads(rev.participants)),
        archived=bool(rev.archived),
        creator_id=row.creator_id,
        last_seq=rev.last_seq,
        version=version,
        created_at=created,
        updated_at=updated,
    )


async def replay(
    conn: AsyncConnection,
    user_id: str,
    after: int,
    upto: int,
    limit: int,
    cache: MessageCache | None = None,
    max_bytes: int = 0,
) -> tuple[list[Event], int | None]:
    """The user's changes in (after, upto], oldest first, each with its payload as it was then.

    A user sees changes of the threads it belongs to now, plus changes addressed to it alone
    (read markers, removals, being added). Changes whose resource is gone (a deleted thread)
    are skipped: the user also has the THREAD_REMOVED change that explains it. Also returns the
    last change cursor scanned, so paging advances past skipped rows.

    With `max_bytes`, loading stops once the payloads read reach about that many bytes (at least
    one change is always taken): 300 changes of 100 KB messages would hold 30 MB per resuming
    stream. The transport still cuts frames by exact encoded size; this bounds memory.
    """
    mine = select(thread_members.c.thread_id).where(thread_members.c.user_id == user_id)
    rows = (
        await conn.execute(
            select(changes)
            .where(
                changes.c.change_seq > after,
                changes.c.change_seq <= upto,
                or_(
                    changes.c.user_id == user_id,
                    and_(changes.c.user_id.is_(None), changes.c.thread_id.in_(mine)),
                ),
            )
            .order_by(changes.c.change_seq)
            .limit(limit)
        )
    ).all()
    events: list[Event] = []
    loaded = 0
    last_scanned: int | None = None
    for r in rows:
        if max_bytes and loaded >= max_bytes:
            break
        last_scanned = r.change_seq
        created = aware(r.created_at)
        assert created is not None
        payload: Message | Thread | ReadMarker | None = None
        if r.kind in _MESSAGE_KINDS:
            payload = await message_at(conn, r.resource_id, r.version, cache)
            if payload is None:
                continue
        elif r.kind in _THREAD_KINDS:
            payload = await thread_at(conn, r.thread_id, r.version)
            if payload is None:
                continue
        elif r.kind == EventKind.READ_MARKER_UPDATED.value:
            unread = await _unread_between(conn, user_id, r.thread_id, r.version, r.thread_seq)
            payload = ReadMarker(r.thread_id, user_id, r.version, unread)
        events.append(
            Event(
                change_seq=r.change_seq,
                kind=EventKind(r.kind),
                thread_id=r.thread_id,
                thread_seq=r.thread_seq,
                version=r.version,
                actor_id=r.actor_id,
                created_at=created,
                payload=payload,
                recipients=frozenset([user_id]),
                client_op_id=r.client_op_id if r.actor_id == user_id else "",
            )
        )
        loaded += approx_bytes(payload)
    return events, last_scanned


_EVENT_OVERHEAD = 256  # ids, cursors, timestamps and tags around a payload


def approx_bytes(payload: Message | Thread | ReadMarker | None) -> int:
    """About the encoded size of an event with this payload (for memory bounds, not limits)."""
    size = _EVENT_OVERHEAD
    if isinstance(payload, Message):
        size += len(payload.text.encode()) + sum(
            128 + len(a.file_name.encode()) + len(a.content_type) for a in payload.attachments
        )
    elif isinstance(payload, Thread):
        size += len(payload.title.encode()) + len(payload.description.encode())
        size += sum(len(p) + 2 for p in (*payload.participant_ids, *payload.tags))
    return size


async def _unread_between(
    conn: AsyncConnection, user_id: str, thread_id: str, read_seq: int, last_seq: int
) -> int:
    """Unread messages as of a marker change: after the marker, up to the thread's newest
    message at that time (later messages are replayed as their own events)."""
    return int(
        (
            await conn.execute(
                select(func.count()).where(
                    messages.c.thread_id == thread_id,
                    messages.c.seq > read_seq,
                    messages.c.seq <= last_seq,
                    messages.c.author_id != user_id,
                    messages.c.deleted.is_(False),
                )
            )
        ).scalar_one()
    )


async def stored_ops(conn: AsyncConnection, user_id: str, op_ids: Sequence[str]) -> list[Row[Any]]:
    if not op_ids:
        return []
    return list(
        (
            await conn.execute(
                select(operations).where(
                    tuple_(operations.c.user_id, operations.c.client_op_id).in_(
                        [(user_id, op) for op in op_ids]
                    )
                )
            )
        ).all()
    )


async def prune(
    conn: AsyncConnection, now: datetime, retention_s: int, idempotency_window_s: int
) -> tuple[int, int]:
    """Drops change rows and revisions past retention, and idempotency keys past their window.
    Returns (changes removed, keys removed)."""
    horizon = now - timedelta(seconds=retention_s)
    last = (
        await conn.execute(
            select(changes.c.change_seq)
            .where(changes.c.created_at < horizon)
            .order_by(changes.c.change_seq.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    removed = 0
    if last is not None:
        result = await conn.execute(delete(changes).where(changes.c.change_seq <= last))
        removed = result.rowcount or 0
        await conn.execute(
            update(server_state).where(server_state.c.id == 1).values(pruned_through=last)
        )
        await conn.execute(
            delete(message_revisions).where(message_revisions.c.superseded_at < horizon)
        )
        await conn.execute(
            delete(thread_revisions).where(thread_revisions.c.superseded_at < horizon)
        )
    keys = await conn.execute(
        delete(operations).where(
            operations.c.created_at < now - timedelta(seconds=idempotency_window_s)
        )
    )
    return removed, keys.rowcount or 0
