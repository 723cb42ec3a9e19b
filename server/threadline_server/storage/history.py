"""Superseded versions of messages and threads, replay of the change log, and pruning."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from threadline_server.domain.models import Event, EventKind, Message, ReadMarker, Thread
from threadline_server.storage.cache import MessageCache
from threadline_server.storage.rows import aware
from threadline_server.storage.tables import (
    changes,
    message_revisions,
    messages,
    operations,
    server_state,
    thread_members,
    thread_revisions,
)
from threadline_server.storage.versions import messages_at, threads_at

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


def _replay_page() -> Select[Any]:
    """A user's next page of changes, with each message's current text length.

    Two index walks, each O(what this user missed): the changes addressed to the user
    (ix_changes_user), and those of the threads it belongs to (ix_changes_thread, one range per
    thread). As one OR, both databases walked every thread-wide change in the window, everyone's,
    to keep this user's: a reconnect storm after a busy hour read the whole hour per user.
    (`coalesce` keeps the planner off ix_changes_user for "user_id IS NULL".) The text length lets
    the page be cut to its byte bound before any payload is loaded.

    Built once: constructing this statement (its subqueries' column proxies) cost more than
    running it, for every resuming stream.
    """
    user_id = bindparam("user_id", type_=String)
    limit = bindparam("limit", type_=Integer)
    mine = select(thread_members.c.thread_id).where(thread_members.c.user_id == user_id)
    window = and_(
        changes.c.change_seq > bindparam("after", type_=BigInteger),
        changes.c.change_seq <= bindparam("upto", type_=BigInteger),
    )
    own = select(changes).where(window, changes.c.user_id == user_id)
    shared = select(changes).where(
        window, changes.c.thread_id.in_(mine), func.coalesce(changes.c.user_id, "") == ""
    )
    both = union_all(
        *(select(q.order_by(changes.c.change_seq).limit(limit).subquery()) for q in (own, shared))
    ).subquery()
    # The text of the version each change refers to: a revision's, else the current row's (a
    # deleted message's current text is empty, while its creation replays the original).
    revision = message_revisions.alias("revision")
    is_message = both.c.kind.in_(_MESSAGE_KINDS)
    text_bytes = func.coalesce(ByteLength(revision.c.text), ByteLength(messages.c.text), 0).label(
        "text_bytes"
    )
    return (
        select(both, text_bytes)
        .select_from(
            both.outerjoin(
                messages, and_(is_message, messages.c.id == both.c.resource_id)
            ).outerjoin(
                revision,
                and_(
                    is_message,
                    revision.c.message_id == both.c.resource_id,
                    revision.c.version == both.c.version,
                ),
            )
        )
        .order_by(both.c.change_seq)
        .limit(limit)
    )


class ByteLength(FunctionElement[int]):
    """The UTF-8 length of a text column in bytes (SQL's length() counts characters)."""

    type = Integer()
    inherit_cache = True


@compiles(ByteLength)
def _octet_length(element: ByteLength, compiler: Any, **kw: Any) -> str:
    return f"octet_length({compiler.process(element.clauses, **kw)})"


@compiles(ByteLength, "sqlite")
def _sqlite_byte_length(element: ByteLength, compiler: Any, **kw: Any) -> str:
    # SQLite before 3.43 has no octet_length; a text cast to BLOB keeps its UTF-8 bytes.
    return f"length(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


_REPLAY_PAGE = _replay_page()


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

    With `max_bytes`, the page ends once its payloads reach about that many bytes (at least one
    change is always taken): 300 changes of 100 KB messages would hold 30 MB per resuming
    stream. The page is cut before loading, from the byte length of the text each change refers
    to (its revision's or the current one), and again after, from the payloads as loaded (with
    attachments and thread fields); the transport still cuts frames by exact encoded size.
    """
    rows = (
        await conn.execute(
            _REPLAY_PAGE, {"user_id": user_id, "after": after, "upto": upto, "limit": limit}
        )
    ).all()
    page: list[Row[Any]] = []
    estimate = 0
    for r in rows:
        if max_bytes and estimate >= max_bytes:
            break
        page.append(r)
        estimate += _EVENT_OVERHEAD + int(r.text_bytes)
    if not page:
        return [], None
    me = frozenset([user_id])
    return await events_of(
        conn,
        page,
        recipients=lambda _r: me,
        reader=lambda _r: user_id,
        own_op_ids_only=user_id,
        cache=cache,
        max_bytes=max_bytes,
    )


async def events_of(
    conn: AsyncConnection,
    page: Sequence[Row[Any]],
    *,
    recipients: Callable[[Row[Any]], frozenset[str]],
    reader: Callable[[Row[Any]], str],
    own_op_ids_only: str = "",
    cache: MessageCache | None = None,
    max_bytes: int = 0,
) -> tuple[list[Event], int | None]:
    """The events of these change rows (oldest first), each with its payload as it was then:
    for one user's replay, or for the cluster's feed (cluster.delivery), which addresses each to
    its thread's members. Rows whose resource is gone (a deleted thread) are skipped. Also
    returns the last cursor scanned: with `max_bytes`, loading stops once the payloads reach
    about that many bytes (at least one change is always taken)."""
    found_messages = await messages_at(
        conn, [(r.resource_id, r.version) for r in page if r.kind in _MESSAGE_KINDS], cache
    )
    found_threads = await threads_at(
        conn, [(r.thread_id, r.version) for r in page if r.kind in _THREAD_KINDS]
    )
    events: list[Event] = []
    loaded = 0
    last_scanned = page[0].change_seq
    for r in page:
        if max_bytes and loaded >= max_bytes:
            break
        last_scanned = r.change_seq
        created = aware(r.created_at)
        assert created is not None
        payload: Message | Thread | ReadMarker | None = None
        if r.kind in _MESSAGE_KINDS:
            payload = found_messages.get((r.resource_id, r.version))
            if payload is None:
                continue
        elif r.kind in _THREAD_KINDS:
            payload = found_threads.get((r.thread_id, r.version))
            if payload is None:
                continue
        elif r.kind == EventKind.READ_MARKER_UPDATED.value:
            who = reader(r)
            unread = await _unread_between(conn, who, r.thread_id, r.version, r.thread_seq)
            payload = ReadMarker(r.thread_id, who, r.version, unread)
        op_id = r.client_op_id or ""
        if own_op_ids_only and r.actor_id != own_op_ids_only:
            op_id = ""
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
                recipients=recipients(r),
                client_op_id=op_id,
                personal=r.user_id is not None,
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
