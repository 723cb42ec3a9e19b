"""Row to record conversions shared by the storage modules."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Row

from threadline_server.domain.models import Message, Thread


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def message_from_row(row: Row[Any]) -> Message:
    created = aware(row.created_at)
    assert created is not None
    return Message(
        id=row.id,
        thread_id=row.thread_id,
        seq=row.seq,
        author_id=row.author_id,
        text=row.text,
        version=row.version,
        deleted=bool(row.deleted),
        created_at=created,
        updated_at=aware(row.updated_at),
    )


def thread_from_row(row: Row[Any], participant_ids: Iterable[str]) -> Thread:
    created, updated = aware(row.created_at), aware(row.updated_at)
    assert created is not None and updated is not None
    return Thread(
        id=row.id,
        title=row.title,
        description=row.description,
        tags=tuple(json.loads(row.tags)),
        participant_ids=tuple(sorted(participant_ids)),
        archived=bool(row.archived),
        creator_id=row.creator_id,
        last_seq=row.last_seq,
        version=row.version,
        created_at=created,
        updated_at=updated,
    )
