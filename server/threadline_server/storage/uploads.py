"""The `uploads` table and the SQL side of uploads: the domain's UploadStore port, plus the
functions the message paths call inside their own write transactions (`check_attachable`,
`attach`, `attachments_for`, `release_messages`, `release_thread`).

The table is defined on the shared `tables.metadata`; migration 0003 creates it. Alembic
autogenerate sees it only when this module is imported, so migrations/env.py must import it
(`import threadline_server.storage.uploads  # noqa: F401`) before `metadata` is used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    and_,
    delete,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from threadline_server.domain.models import Attachment
from threadline_server.domain.uploads import Upload, UploadState, not_usable, unusable_reason
from threadline_server.storage.db import Database
from threadline_server.storage.rows import aware
from threadline_server.storage.tables import BigInt, Stamp, messages, metadata, thread_members

# SQL IN lists are chunked: SQLite allows 32,766 bound parameters, asyncpg 32,767.
_CHUNK = 500

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("uploader_id", String(128), nullable=False),
    # Idempotency key of CreateUpload: unique per uploader; NULL (no key) never collides.
    Column("client_op_id", String(64), nullable=True),
    Column("file_name", String(255), nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("size_bytes", BigInt, nullable=False),
    Column("state", String(16), nullable=False),
    Column("sha256", String(64), nullable=False, server_default=""),
    Column("object_key", String(255), nullable=False),
    # SET NULL, not CASCADE: deleting a thread (which cascades to its messages) must not drop the
    # row silently, or its object would have no owner. The sweep removes attached rows whose
    # message is gone (NULL) or a tombstone, object first, like any other orphan.
    Column("message_id", String(32), ForeignKey("messages.id", ondelete="SET NULL"), nullable=True),
    # Order of the attachment on its message (the order given when it was sent).
    Column("attach_order", Integer, nullable=False, server_default="0"),
    Column("created_at", Stamp, nullable=False),
    Column("expires_at", Stamp, nullable=False),
    Column("version", BigInt, nullable=False, server_default="1"),
    UniqueConstraint("object_key"),
    UniqueConstraint("uploader_id", "client_op_id"),
    CheckConstraint(
        "state IN ('pending', 'ready', 'attached', 'deleting')", name="ck_uploads_state"
    ),
    # The sweep: pending/ready rows by expiry, and every `deleting` row.
    Index("ix_uploads_state_expires", "state", "expires_at"),
    # attachments_for / release_messages, and the FK's ON DELETE SET NULL lookups.
    Index("ix_uploads_message", "message_id", "attach_order"),
)


def _now() -> datetime:
    return datetime.now(UTC)


def upload_from_row(row: Row[Any]) -> Upload:
    created, expires = aware(row.created_at), aware(row.expires_at)
    assert created is not None and expires is not None
    state: UploadState = row.state
    return Upload(
        id=row.id,
        uploader_id=row.uploader_id,
        file_name=row.file_name,
        content_type=row.content_type,
        size_bytes=int(row.size_bytes),
        state=state,
        sha256=row.sha256,
        object_key=row.object_key,
        message_id=row.message_id,
        created_at=created,
        expires_at=expires,
        version=int(row.version),
    )


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _message_gone() -> ColumnElement[bool]:
    """Attached, but the message was deleted: removed with its thread (FK set NULL) or left as a
    tombstone (whose attachments are cleared by contract)."""
    tombstone = exists().where(messages.c.id == uploads.c.message_id, messages.c.deleted.is_(True))
    return and_(
        uploads.c.state == "attached",
        or_(uploads.c.message_id.is_(None), tombstone),
    )


def _orphan(now: datetime) -> ColumnElement[bool]:
    expired = and_(uploads.c.state.in_(("pending", "ready")), uploads.c.expires_at <= now)
    return or_(expired, _message_gone())


# ---- inside the caller's write transaction (message send / delete paths) ------------------


async def _lock_rows(
    conn: AsyncConnection, upload_ids: Sequence[str], *, for_update: bool
) -> dict[str, Upload]:
    if not upload_ids:
        return {}
    stmt = select(uploads).where(uploads.c.id.in_(list(upload_ids)))
    if for_update and conn.dialect.name != "sqlite":
        # Row locks: a concurrent attach or sweep on another node waits for our COMMIT.
        stmt = stmt.with_for_update()
    return {r.id: upload_from_row(r) for r in await conn.execute(stmt)}


async def check_attachable(
    conn: AsyncConnection,
    user_id: str,
    upload_ids: Sequence[str],
    *,
    taken: set[str] | None = None,
    now: datetime | None = None,
) -> tuple[Attachment, ...]:
    """Raises FailedPrecondition UPLOAD_NOT_USABLE (subject: the id) unless every upload is ready,
    the sender's, unattached and unexpired; writes nothing. For a group commit, pass one `taken`
    set per batch: ids claimed by earlier items of the batch count as attached elsewhere, so a
    failing item can be rejected alone before any row of the batch is written."""
    now = _now() if now is None else now
    found = await _lock_rows(conn, upload_ids, for_update=True)
    seen: set[str] = set()
    out = []
    for upload_id in upload_ids:
        if upload_id in seen or (taken is not None and upload_id in taken):
            raise not_usable(upload_id, "the upload is attached elsewhere or removed")
        seen.add(upload_id)
        upload = found.get(upload_id)
        why = unusable_reason(upload, user_id, now)
        if why is not None:
            raise not_usable(upload_id, why)
        assert upload is not None
        out.append(upload.attachment())
    if taken is not None:
        taken.update(upload_ids)
    return tuple(out)


async def attach(
    conn: AsyncConnection,
    user_id: str,
    message_id: str,
    upload_ids: Sequence[str],
    *,
    now: datetime | None = None,
) -> tuple[Attachment, ...]:
    """Attaches the uploads to `message_id` (already inserted in this transaction), in order.

    Checks first (as `check_attachable`), so a refusal raises before anything is written. Each
    UPDATE is also conditional on the upload still being ready and unattached: if another node
    won a race after our check, this raises UPLOAD_NOT_USABLE and the caller's transaction must
    roll back (the send path's retry-one-by-one isolates it, as for IntegrityError).
    """
    now = _now() if now is None else now
    attachments = await check_attachable(conn, user_id, upload_ids, now=now)
    for position, upload_id in enumerate(upload_ids):
        result = await conn.execute(
            update(uploads)
            .where(
                uploads.c.id == upload_id,
                uploads.c.uploader_id == user_id,
                uploads.c.state == "ready",
                uploads.c.message_id.is_(None),
            )
            .values(
                state="attached",
                message_id=message_id,
                attach_order=position,
                version=uploads.c.version + 1,
            )
        )
        if result.rowcount != 1:
            raise not_usable(upload_id, "the upload is attached elsewhere or removed")
    return attachments


async def attachments_for(
    conn: AsyncConnection, message_ids: Iterable[str]
) -> dict[str, tuple[Attachment, ...]]:
    """Attachments of each message, in send order; messages without any are absent. Uploads
    being removed (`deleting`) are left out, as the contract clears a tombstone's attachments."""
    ids = list(dict.fromkeys(message_ids))
    grouped: dict[str, list[Attachment]] = defaultdict(list)
    for chunk in _chunks(ids):
        rows = await conn.execute(
            select(uploads)
            .where(uploads.c.message_id.in_(list(chunk)), uploads.c.state == "attached")
            .order_by(uploads.c.message_id, uploads.c.attach_order)
        )
        for row in rows:
            grouped[row.message_id].append(upload_from_row(row).attachment())
    return {mid: tuple(items) for mid, items in grouped.items()}


async def release_messages(conn: AsyncConnection, message_ids: Sequence[str]) -> int:
    """In a message delete's transaction: its uploads become `deleting` (gone for every caller at
    the same COMMIT as the tombstone). The objects go at the next `Uploads.purge` / sweep."""
    count = 0
    for chunk in _chunks(list(message_ids)):
        result = await conn.execute(
            update(uploads)
            .where(uploads.c.message_id.in_(list(chunk)), uploads.c.state == "attached")
            .values(state="deleting", version=uploads.c.version + 1)
        )
        count += result.rowcount
    return count


async def release_thread(conn: AsyncConnection, thread_id: str) -> int:
    """In a thread delete's transaction, before the DELETE of the thread: every upload attached
    to one of its messages becomes `deleting`. (Without this call the FK sets their message_id to
    NULL and the sweep still finds them; this just makes them disappear at once.)"""
    in_thread = select(messages.c.id).where(messages.c.thread_id == thread_id)
    result = await conn.execute(
        update(uploads)
        .where(uploads.c.message_id.in_(in_thread), uploads.c.state == "attached")
        .values(state="deleting", version=uploads.c.version + 1)
    )
    return result.rowcount


# ---- the UploadStore port ------------------------------------------------------------------


class SqlUploadStore:
    """UploadStore on SQLAlchemy Core; each method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, upload: Upload, client_op_id: str) -> tuple[Upload, bool]:
        op_id = client_op_id or None
        if op_id is not None:
            existing = await self._by_op(upload.uploader_id, op_id)
            if existing is not None:
                return existing, False
        try:
            async with self._db.write() as tx:
                await tx.conn.execute(
                    insert(uploads).values(
                        id=upload.id,
                        uploader_id=upload.uploader_id,
                        client_op_id=op_id,
                        file_name=upload.file_name,
                        content_type=upload.content_type,
                        size_bytes=upload.size_bytes,
                        state=upload.state,
                        sha256=upload.sha256,
                        object_key=upload.object_key,
                        message_id=upload.message_id,
                        attach_order=0,
                        created_at=upload.created_at,
                        expires_at=upload.expires_at,
                        version=upload.version,
                    )
                )
        except IntegrityError:
            # Another node committed the same (uploader, op id) first: answer from its row.
            if op_id is not None:
                existing = await self._by_op(upload.uploader_id, op_id)
                if existing is not None:
                    return existing, False
            raise
        return upload, True

    async def _by_op(self, uploader_id: str, client_op_id: str) -> Upload | None:
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(uploads).where(
                        uploads.c.uploader_id == uploader_id,
                        uploads.c.client_op_id == client_op_id,
                    )
                )
            ).first()
        return upload_from_row(row) if row is not None else None

    async def get(self, upload_id: str) -> Upload | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(uploads).where(uploads.c.id == upload_id))).first()
        return upload_from_row(row) if row is not None else None

    async def get_many(self, upload_ids: Sequence[str]) -> dict[str, Upload]:
        async with self._db.read() as conn:
            return await _lock_rows(conn, upload_ids, for_update=False)

    async def mark_ready(self, upload_id: str, sha256: str, version: int) -> Upload | None:
        async with self._db.write() as tx:
            result = await tx.conn.execute(
                update(uploads)
                .where(
                    uploads.c.id == upload_id,
                    uploads.c.state == "pending",
                    uploads.c.version == version,
                )
                .values(state="ready", sha256=sha256, version=uploads.c.version + 1)
            )
            if result.rowcount != 1:
                return None
            row = (await tx.conn.execute(select(uploads).where(uploads.c.id == upload_id))).one()
        return upload_from_row(row)

    async def downloadable(self, upload_id: str, user_id: str) -> Upload | None:
        member = exists().where(
            thread_members.c.thread_id == messages.c.thread_id,
            thread_members.c.user_id == user_id,
        )
        live_message = (
            select(messages.c.id)
            .where(
                messages.c.id == uploads.c.message_id,
                messages.c.deleted.is_(False),
                or_(uploads.c.uploader_id == user_id, member),
            )
            .exists()
        )
        stmt = select(uploads).where(
            uploads.c.id == upload_id,
            or_(
                and_(uploads.c.state == "ready", uploads.c.uploader_id == user_id),
                and_(uploads.c.state == "attached", live_message),
            ),
        )
        async with self._db.read() as conn:
            row = (await conn.execute(stmt)).first()
        return upload_from_row(row) if row is not None else None

    async def mark_orphans(self, now: datetime) -> int:
        async with self._db.write() as tx:
            result = await tx.conn.execute(
                update(uploads)
                .where(_orphan(now))
                .values(state="deleting", version=uploads.c.version + 1)
            )
            return result.rowcount

    async def orphans(self, now: datetime) -> list[Upload]:
        stmt = (
            select(uploads)
            .where(or_(uploads.c.state == "deleting", _orphan(now)))
            .order_by(uploads.c.created_at, uploads.c.id)
        )
        async with self._db.read() as conn:
            return [upload_from_row(r) for r in await conn.execute(stmt)]

    async def deleting(self) -> list[Upload]:
        stmt = (
            select(uploads)
            .where(uploads.c.state == "deleting")
            .order_by(uploads.c.created_at, uploads.c.id)
        )
        async with self._db.read() as conn:
            return [upload_from_row(r) for r in await conn.execute(stmt)]

    async def remove(self, upload_ids: Sequence[str]) -> int:
        count = 0
        async with self._db.write() as tx:
            for chunk in _chunks(list(upload_ids)):
                result = await tx.conn.execute(
                    delete(uploads).where(
                        uploads.c.id.in_(list(chunk)), uploads.c.state == "deleting"
                    )
                )
                count += result.rowcount
        return count

    async def known_keys(self, keys: Sequence[str]) -> set[str]:
        known: set[str] = set()
        async with self._db.read() as conn:
            for chunk in _chunks(list(keys)):
                rows = await conn.execute(
                    select(uploads.c.object_key).where(uploads.c.object_key.in_(list(chunk)))
                )
                known.update(rows.scalars())
        return known

    async def attachments(self, message_ids: Iterable[str]) -> dict[str, tuple[Attachment, ...]]:
        """`attachments_for` in its own read transaction (for read paths such as ListMessages)."""
        async with self._db.read() as conn:
            return await attachments_for(conn, message_ids)
