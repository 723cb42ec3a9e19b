"""Messages and threads as they were at a given version, loaded in batches: the current row when
the version is current, else the superseded revision. Replay asks for a whole page at once, so
a page costs a few queries whatever its length, not a few per change."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.models import Message, Thread
from threadline_server.storage.cache import MessageCache
from threadline_server.storage.rows import aware, message_from_row, thread_from_row
from threadline_server.storage.tables import (
    message_revisions,
    messages,
    thread_members,
    thread_revisions,
    threads,
)
from threadline_server.storage.uploads import attachments_for

# Bound on the ids of one IN list (SQLite allows 32,766 host parameters; a replay page is 300).
_CHUNK = 500

VersionKey = tuple[str, int]  # (resource id, version); version 0 means the current one


def _chunks(keys: Sequence[VersionKey]) -> list[Sequence[VersionKey]]:
    return [keys[i : i + _CHUNK] for i in range(0, len(keys), _CHUNK)]


async def messages_at(
    conn: AsyncConnection, wanted: Sequence[VersionKey], cache: MessageCache | None = None
) -> dict[VersionKey, Message]:
    """Each wanted (message id, version) that still exists; unknown or pruned ones are absent.
    With a cache, current versions are served from and remembered in it."""
    found: dict[VersionKey, Message] = {}
    missing: list[VersionKey] = []
    for key in dict.fromkeys(wanted):
        if cache is not None and key[1] > 0:
            hit = cache.get(*key)
            if hit is not None:
                found[key] = hit
                continue
        missing.append(key)
    if not missing:
        return found
    ids = list(dict.fromkeys(mid for mid, _ in missing))
    current: dict[str, Message] = {}
    for chunk in _chunks([(mid, 0) for mid in ids]):
        rows = await conn.execute(select(messages).where(messages.c.id.in_([m for m, _ in chunk])))
        for row in rows:
            current[row.id] = message_from_row(row)
    files = await attachments_for(conn, list(current))
    older: list[VersionKey] = []
    for key in missing:
        message = current.get(key[0])
        if message is None:
            continue
        message = replace(message, attachments=files.get(message.id, ()))
        current[message.id] = message
        if key[1] in (0, message.version):
            found[key] = message
            if cache is not None:
                cache.fill(message)
        else:
            older.append(key)
    for chunk in _chunks(older):
        revs = await conn.execute(
            select(message_revisions).where(
                tuple_(message_revisions.c.message_id, message_revisions.c.version).in_(chunk)
            )
        )
        for rev in revs:
            now = current[rev.message_id]
            found[(rev.message_id, rev.version)] = replace(
                now,
                text=rev.text,
                version=rev.version,
                deleted=bool(rev.deleted),
                updated_at=aware(rev.updated_at),
            )
    return found


async def message_at(
    conn: AsyncConnection, message_id: str, version: int, cache: MessageCache | None = None
) -> Message | None:
    """The message as it was at `version` (None if unknown or pruned)."""
    return (await messages_at(conn, [(message_id, version)], cache)).get((message_id, version))


async def threads_at(
    conn: AsyncConnection, wanted: Sequence[VersionKey]
) -> dict[VersionKey, Thread]:
    """Each wanted (thread id, version) that still exists; unknown or pruned ones are absent. The
    participants of a current version are today's members; a revision kept its own."""
    keys = list(dict.fromkeys(wanted))
    rows = {}
    for chunk in _chunks(keys):
        ids = list({tid for tid, _ in chunk})
        rows.update(
            {r.id: r for r in await conn.execute(select(threads).where(threads.c.id.in_(ids)))}
        )
    current = [k for k in keys if k[0] in rows and k[1] in (0, rows[k[0]].version)]
    members: dict[str, list[str]] = defaultdict(list)
    distinct = list(dict.fromkeys(tid for tid, _ in current))
    for start in range(0, len(distinct), _CHUNK):
        pairs = await conn.execute(
            select(thread_members.c.thread_id, thread_members.c.user_id).where(
                thread_members.c.thread_id.in_(distinct[start : start + _CHUNK])
            )
        )
        for thread_id, user_id in pairs:
            members[thread_id].append(user_id)
    found = {key: thread_from_row(rows[key[0]], members[key[0]]) for key in current}
    older = [k for k in keys if k[0] in rows and k not in found]
    for chunk in _chunks(older):
        revs = await conn.execute(
            select(thread_revisions).where(
                tuple_(thread_revisions.c.thread_id, thread_revisions.c.version).in_(chunk)
            )
        )
        for rev in revs:
            row = rows[rev.thread_id]
            updated, created = aware(rev.updated_at), aware(row.created_at)
            assert updated is not None and created is not None
            found[(rev.thread_id, rev.version)] = Thread(
                id=rev.thread_id,
                title=rev.title,
                description=rev.description,
                tags=tuple(json.loads(rev.tags)),
                participant_ids=tuple(json.loads(rev.participants)),
                archived=bool(rev.archived),
                creator_id=row.creator_id,
                last_seq=rev.last_seq,
                version=rev.version,
                created_at=created,
                updated_at=updated,
            )
    return found


async def thread_at(conn: AsyncConnection, thread_id: str, version: int) -> Thread | None:
    """The thread as it was at `version` (None if unknown or pruned)."""
    return (await threads_at(conn, [(thread_id, version)])).get((thread_id, version))
