"""The upload lifecycle: the `Uploads` use cases over `SqlUploadStore` on a freshly migrated
database (SQLite file; PostgreSQL when THREADLINE_TEST_DATABASE_URL is set), with an in-memory
blob store for the rules and the real backends (local disk over HTTP, GCS emulator) for the
flows, the sweep, and the crash-order proof."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import delete, insert, select, text, update

from tests.contract.conftest import Backend
from threadline_server.config import StorageSettings
from threadline_server.domain.models import Attachment
from threadline_server.domain.uploads import (
    KEY_PREFIX,
    BlobStore,
    ObjectInfo,
    SignedUrl,
    Upload,
    Uploads,
)
from threadline_server.errors import (
    FailedPrecondition,
    IdempotencyKeyReused,
    InvalidArgument,
    NotFound,
    reason_of,
)
from threadline_server.storage.db import Database, alembic_config, migrate
from threadline_server.storage.tables import messages, thread_members, threads
from threadline_server.storage.uploads import (
    SqlUploadStore,
    attach,
    attachments_for,
    check_attachable,
    release_messages,
    release_thread,
    uploads,
)

TTL = timedelta(seconds=StorageSettings().orphan_ttl_s)


# ---- test doubles and fixtures ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class MemoryBlobs:
    """A BlobStore in a dict, for the rules; the real backends are exercised further down."""

    objects: dict[str, tuple[bytes, str, datetime]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def put(self, key: str, data: bytes, content_type: str, at: datetime | None = None) -> None:
        self.objects[key] = (data, content_type, at or datetime.now(UTC))

    async def sign_put(
        self, key: str, content_type: str, max_size: int, expires_in: float
    ) -> SignedUrl:
        expires = datetime.now(UTC) + timedelta(seconds=expires_in)
        return SignedUrl(
            f"memory://{key}?max={max_size}", "PUT", {"Content-Type": content_type}, expires
        )

    async def sign_get(self, key: str, expires_in: float, download_name: str = "") -> SignedUrl:
        expires = datetime.now(UTC) + timedelta(seconds=expires_in)
        return SignedUrl(f"memory://{key}?dn={download_name}", "GET", {}, expires)

    async def head(self, key: str) -> ObjectInfo | None:
        if key not in self.objects:
            return None
        data, content_type, _ = self.objects[key]
        return ObjectInfo(len(data), content_type, hashlib.sha256(data).hexdigest())

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)
        self.deleted.append(key)

    async def list_keys(self, prefix: str, older_than: datetime) -> list[str]:
        return sorted(
            k for k, (_, _, at) in self.objects.items() if k.startswith(prefix) and at < older_than
        )


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


class CrashingBlobs:
    """Delegates to a real backend and dies after `survive` deletions."""

    def __init__(self, inner: BlobStore, survive: int, error: BaseException | None = None) -> None:
        self.inner = inner
        self.survive = survive
        self.error = error or Crash()

    async def sign_put(
        self, key: str, content_type: str, max_size: int, expires_in: float
    ) -> SignedUrl:
        return await self.inner.sign_put(key, content_type, max_size, expires_in)

    async def sign_get(self, key: str, expires_in: float, download_name: str = "") -> SignedUrl:
        return await self.inner.sign_get(key, expires_in, download_name)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        if self.survive <= 0:
            raise self.error
        self.survive -= 1
        await self.inner.delete(key)

    async def list_keys(self, prefix: str, older_than: datetime) -> list[str]:
        return await self.inner.list_keys(prefix, older_than)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    await migrate(db_url)
    database = Database(db_url)
    async with database.write() as tx:
        # PostgreSQL runs share one schema; SQLite gets a fresh file per test anyway.
        await tx.conn.execute(delete(uploads))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory() -> MemoryBlobs:
    return MemoryBlobs()


@pytest.fixture
def store(db: Database) -> SqlUploadStore:
    return SqlUploadStore(db)


@pytest.fixture
def uploads_uc(store: SqlUploadStore, memory: MemoryBlobs, clock: Clock) -> Uploads:
    return Uploads(store, memory, StorageSettings(), clock)


async def make_message(
    db: Database, members: list[str], author: str, *, thread_id: str = "", seq: int = 1
) -> tuple[str, str]:
    """A thread with `members` and one message by `author`: (thread id, message id)."""
    now = datetime.now(UTC)
    thread_id = thread_id or os.urandom(8).hex()
    message_id = os.urandom(8).hex()
    async with db.write() as tx:
        exists = (
            await tx.conn.execute(select(threads.c.id).where(threads.c.id == thread_id))
        ).first()
        if exists is None:
            await tx.conn.execute(
                insert(threads).values(
                    id=thread_id,
                    title="t",
                    creator_id=author,
                    created_at=now,
                    updated_at=now,
                    last_activity_at=now,
                )
            )
            await tx.conn.execute(
                insert(thread_members),
                [{"thread_id": thread_id, "user_id": m, "joined_at": now} for m in members],
            )
        await tx.conn.execute(
            insert(messages).values(
                id=message_id,
                thread_id=thread_id,
                seq=seq,
                author_id=author,
                text="",
                created_at=now,
            )
        )
    return thread_id, message_id


async def attach_to(
    db: Database, user: str, message_id: str, ids: list[str]
) -> tuple[Attachment, ...]:
    async with db.write() as tx:
        return await attach(tx.conn, user, message_id, ids)


async def ready_upload(
    uc: Uploads, memory: MemoryBlobs, user: str = "alice", body: bytes = b"\x89PNG data"
) -> Upload:
    upload, _ = await uc.create(user, "cat.png", "image/png", len(body))
    memory.put(upload.object_key, body, "image/png")
    return await uc.complete(user, upload.id)


async def rows(db: Database) -> dict[str, Any]:
    async with db.read() as conn:
        return {r.id: r for r in await conn.execute(select(uploads))}


def assert_failed(exc: pytest.ExceptionInfo[FailedPrecondition], reason: str, subject: str) -> None:
    assert reason_of(exc.value) == reason
    assert exc.value.subject == subject


# ---- CreateUpload -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_name", "content_type", "size", "fields"),
    [
        ("", "image/png", 10, {"file_name"}),
        ("   ", "image/png", 10, {"file_name"}),
        ("a" * 256, "image/png", 10, {"file_name"}),
        ("../../etc/passwd", "image/png", 10, {"file_name"}),
        ("dir/cat.png", "image/png", 10, {"file_name"}),
        ("dir\\cat.png", "image/png", 10, {"file_name"}),
        ("cat\n.png", "image/png", 10, {"file_name"}),
        ("cat\x00.png", "image/png", 10, {"file_name"}),
        ("gnp\u202e.exe", "image/png", 10, {"file_name"}),
        ("cat.png", "text/html", 10, {"content_type"}),
        ("cat.png", "", 10, {"content_type"}),
        ("cat.png", "image/png; charset=x", 10, {"content_type"}),
        ("cat.png", "image/png", 0, {"size_bytes"}),
        ("cat.png", "image/png", -5, {"size_bytes"}),
        ("cat.png", "image/png", 25_000_001, {"size_bytes"}),
        ("", "text/html", 0, {"file_name", "content_type", "size_bytes"}),
    ],
)
async def test_create_refuses_bad_declarations(
    uploads_uc: Uploads,
    db: Database,
    file_name: str,
    content_type: str,
    size: int,
    fields: set[str],
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await uploads_uc.create("alice", file_name, content_type, size)
    assert {v.field for v in exc.value.violations} == fields
    assert await rows(db) == {}


async def test_create_accepts_limits_and_builds_the_key_server_side(
    uploads_uc: Uploads, clock: Clock
) -> None:
    name = "ünïcode résumé " + "x" * 240
    upload, url = await uploads_uc.create("alice", name, "IMAGE/PNG", 25_000_000)
    assert upload.state == "pending" and upload.version == 1
    assert upload.content_type == "image/png"
    assert upload.expires_at == clock.now + TTL
    owner = hashlib.sha256(b"alice").hexdigest()[:16]
    assert re.fullmatch(rf"uploads/{owner}/[0-9a-f]{{32}}", upload.object_key)
    assert url.method == "PUT" and url.headers == {"Content-Type": "image/png"}
    assert "max=25000000" in url.url
    other, _ = await uploads_uc.create("alice", name, "image/png", 1)
    assert other.object_key != upload.object_key


async def test_create_is_idempotent_on_client_op_id(uploads_uc: Uploads, db: Database) -> None:
    first, _ = await uploads_uc.create("alice", "a.pdf", "application/pdf", 10, "op-1")
    again, url = await uploads_uc.create("alice", "a.pdf", "application/pdf", 10, "op-1")
    assert again.id == first.id and url.method == "PUT"
    # The same key for another user is another operation.
    bobs, _ = await uploads_uc.create("bob", "a.pdf", "application/pdf", 10, "op-1")
    assert bobs.id != first.id
    with pytest.raises(IdempotencyKeyReused):
        await uploads_uc.create("alice", "b.pdf", "application/pdf", 10, "op-1")
    assert len(await rows(db)) == 2


# ---- CompleteUpload -----------------------------------------------------------------------


async def test_complete_without_bytes_is_a_mismatch_and_changes_nothing(
    uploads_uc: Uploads, db: Database
) -> None:
    upload, _ = await uploads_uc.create("alice", "a.png", "image/png", 10)
    with pytest.raises(FailedPrecondition) as exc:
        await uploads_uc.complete("alice", upload.id)
    assert_failed(exc, "UPLOAD_MISMATCH", upload.id)
    assert (await rows(db))[upload.id].state == "pending"


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"123456789", "image/png"), (b"12345678901", "image/png"), (b"1234567890", "text/plain")],
    ids=["short", "long", "other-type"],
)
async def test_complete_with_mismatched_bytes_deletes_them_and_stays_pending(
    uploads_uc: Uploads, memory: MemoryBlobs, db: Database, data: bytes, content_type: str
) -> None:
    upload, _ = await uploads_uc.create("alice", "a.png", "image/png", 10)
    memory.put(upload.object_key, data, content_type)
    with pytest.raises(FailedPrecondition) as exc:
        await uploads_uc.complete("alice", upload.id)
    assert_failed(exc, "UPLOAD_MISMATCH", upload.id)
    assert upload.object_key not in memory.objects
    assert (await rows(db))[upload.id].state == "pending"
    # The client may PUT again (its URL is still valid) and complete.
    memory.put(upload.object_key, b"1234567890", "image/png")
    assert (await uploads_uc.complete("alice", upload.id)).state == "ready"


async def test_complete_records_the_checksum_and_is_idempotent(
    uploads_uc: Uploads, memory: MemoryBlobs
) -> None:
    upload, _ = await uploads_uc.create("alice", "a.png", "image/png", 10)
    memory.put(upload.object_key, b"1234567890", "image/png")
    ready = await uploads_uc.complete("alice", upload.id)
    assert ready.state == "ready" and ready.version == 2
    assert ready.sha256 == hashlib.sha256(b"1234567890").hexdigest()
    assert await uploads_uc.complete("alice", upload.id) == ready


async def test_complete_is_only_for_the_uploader_and_live_uploads(
    uploads_uc: Uploads, memory: MemoryBlobs, clock: Clock
) -> None:
    upload, _ = await uploads_uc.create("alice", "a.png", "image/png", 10)
    memory.put(upload.object_key, b"1234567890", "image/png")
    with pytest.raises(NotFound):
        await uploads_uc.complete("bob", upload.id)
    with pytest.raises(NotFound):
        await uploads_uc.complete("alice", "nope")
    with pytest.raises(InvalidArgument):
        await uploads_uc.complete("alice", "../x")
    clock.advance(TTL)
    with pytest.raises(NotFound):
        await uploads_uc.complete("alice", upload.id)


# ---- GetDownloadUrl -----------------------------------------------------------------------


async def test_download_url_access(uploads_uc: Uploads, memory: MemoryBlobs, db: Database) -> None:
    pending, _ = await uploads_uc.create("alice", "p.png", "image/png", 10)
    with pytest.raises(NotFound):
        await uploads_uc.download_url("alice", pending.id)

    ready = await ready_upload(uploads_uc, memory)
    url = await uploads_uc.download_url("alice", ready.id)
    assert url.method == "GET" and "dn=cat.png" in url.url
    for outsider in ("bob", "carol"):
        with pytest.raises(NotFound):
            await uploads_uc.download_url(outsider, ready.id)

    _, message_id = await make_message(db, ["alice", "bob"], "alice")
    await attach_to(db, "alice", message_id, [ready.id])
    assert (await uploads_uc.download_url("bob", ready.id)).method == "GET"
    assert (await uploads_uc.download_url("alice", ready.id)).method == "GET"
    with pytest.raises(NotFound):
        await uploads_uc.download_url("carol", ready.id)


async def test_no_download_once_the_message_or_thread_is_deleted(
    uploads_uc: Uploads, memory: MemoryBlobs, db: Database
) -> None:
    first = await ready_upload(uploads_uc, memory)
    second = await ready_upload(uploads_uc, memory)
    thread_id, m1 = await make_message(db, ["alice", "bob"], "alice")
    _, m2 = await make_message(db, ["alice", "bob"], "alice", thread_id=thread_id, seq=2)
    await attach_to(db, "alice", m1, [first.id])
    await attach_to(db, "alice", m2, [second.id])
    async with db.write() as tx:  # a tombstone, as SqlStore.change_message leaves it
        await tx.conn.execute(update(messages).where(messages.c.id == m1).values(deleted=True))
    for user in ("alice", "bob"):
        with pytest.raises(NotFound):
            await uploads_uc.download_url(user, first.id)
    async with db.write() as tx:
        await tx.conn.execute(delete(threads).where(threads.c.id == thread_id))
    assert (await rows(db))[second.id].message_id is None  # ON DELETE SET NULL
    for user in ("alice", "bob"):
        with pytest.raises(NotFound):
            await uploads_uc.download_url(user, second.id)


# ---- attachments --------------------------------------------------------------------------


async def test_attachments_must_be_ready_own_and_unattached(
    uploads_uc: Uploads, memory: MemoryBlobs, db: Database, clock: Clock
) -> None:
    pending, _ = await uploads_uc.create("alice", "p.png", "image/png", 10)
    mine = await ready_upload(uploads_uc, memory)
    bobs = await ready_upload(uploads_uc, memory, "bob")
    _, message_id = await make_message(db, ["alice", "bob"], "alice")

    for bad in (pending.id, bobs.id, "unknown"):
        with pytest.raises(FailedPrecondition) as exc:
            await uploads_uc.validate_attachments("alice", [mine.id, bad])
        assert_failed(exc, "UPLOAD_NOT_USABLE", bad)
        with pytest.raises(FailedPrecondition) as exc:
            await attach_to(db, "alice", message_id, [mine.id, bad])
        assert_failed(exc, "UPLOAD_NOT_USABLE", bad)
    # A refused attach wrote nothing: the good upload is still ready.
    assert (await rows(db))[mine.id].state == "ready"
    with pytest.raises(InvalidArgument):
        await uploads_uc.validate_attachments("alice", [mine.id, mine.id])

    expected = (mine.attachment(),)
    assert await uploads_uc.validate_attachments("alice", [mine.id]) == expected
    assert await attach_to(db, "alice", message_id, [mine.id]) == expected
    row = (await rows(db))[mine.id]
    assert (row.state, row.message_id) == ("attached", message_id)

    _, other_message = await make_message(db, ["alice"], "alice")
    with pytest.raises(FailedPrecondition) as exc:
        await uploads_uc.validate_attachments("alice", [mine.id])
    assert_failed(exc, "UPLOAD_NOT_USABLE", mine.id)
    with pytest.raises(FailedPrecondition):
        await attach_to(db, "alice", other_message, [mine.id])

    late = await ready_upload(uploads_uc, memory)
    clock.advance(TTL)
    with pytest.raises(FailedPrecondition) as exc:
        await uploads_uc.validate_attachments("alice", [late.id])
    assert_failed(exc, "UPLOAD_NOT_USABLE", late.id)


async def test_attachments_keep_their_order_and_batches_cannot_share_one(
    uploads_uc: Uploads, memory: MemoryBlobs, db: Database
) -> None:
    a, b, c = [await ready_upload(uploads_uc, memory, body=bytes([i]) * 5) for i in (1, 2, 3)]
    _, m1 = await make_message(db, ["alice"], "alice")
    _, m2 = await make_message(db, ["alice"], "alice")
    async with db.write() as tx:
        # A group commit: the second item claims an upload the first already took.
        taken: set[str] = set()
        await check_attachable(tx.conn, "alice", [c.id, a.id], taken=taken)
        with pytest.raises(FailedPrecondition) as exc:
            await check_attachable(tx.conn, "alice", [b.id, a.id], taken=taken)
        assert_failed(exc, "UPLOAD_NOT_USABLE", a.id)
        await attach(tx.conn, "alice", m1, [c.id, a.id])
    async with db.read() as conn:
        found = await attachments_for(conn, [m1, m2, "none"])
    assert found == {m1: (c.attachment(), a.attachment())}
    assert await SqlUploadStore(db).attachments([m1]) == found


# ---- deleting messages and threads --------------------------------------------------------


async def test_releasing_a_message_or_thread_removes_its_files(
    uploads_uc: Uploads, memory: MemoryBlobs, db: Database
) -> None:
    a, b, keep = [await ready_upload(uploads_uc, memory) for _ in range(3)]
    _, m1 = await make_message(db, ["alice", "bob"], "alice")
    thread_id, m2 = await make_message(db, ["alice", "bob"], "alice")
    _, m3 = await make_message(db, ["alice", "bob"], "alice")
    for upload, message_id in ((a, m1), (b, m2), (keep, m3)):
        await attach_to(db, "alice", message_id, [upload.id])
    async with db.write() as tx:  # the message delete's own transaction
        assert await release_messages(tx.conn, [m1]) == 1
    async with db.write() as tx:  # the thread delete's own transaction
        assert await release_thread(tx.conn, thread_id) == 1
        await tx.conn.execute(delete(threads).where(threads.c.id == thread_id))
    with pytest.raises(NotFound):
        await uploads_uc.download_url("bob", a.id)
    async with db.read() as conn:
        assert await attachments_for(conn, [m1, m3]) == {m3: (keep.attachment(),)}
    removed, failed = await uploads_uc.purge()
    assert {u.id for u in removed} == {a.id, b.id} and failed == []
    assert set(memory.objects) == {keep.object_key}
    assert set(await rows(db)) == {keep.id}


# ---- the sweep ----------------------------------------------------------------------------


async def test_sweep_removes_orphans_and_keeps_what_is_attached_or_young(
    uploads_uc: Uploads, memory: MemoryBlobs, db: Database, clock: Clock
) -> None:
    stale_pending, _ = await uploads_uc.create("alice", "p.png", "image/png", 10)
    memory.put(stale_pending.object_key, b"partial", "image/png")
    stale_ready = await ready_upload(uploads_uc, memory)
    attached = await ready_upload(uploads_uc, memory)
    _, message_id = await make_message(db, ["alice"], "alice")
    await attach_to(db, "alice", message_id, [attached.id])
    tombstoned = await ready_upload(uploads_uc, memory)
    _, dead_message = await make_message(db, ["alice"], "alice")
    await attach_to(db, "alice", dead_message, [tombstoned.id])
    async with db.write() as tx:
        await tx.conn.execute(
            update(messages).where(messages.c.id == dead_message).values(deleted=True)
        )
    clock.advance(TTL - timedelta(hours=1))
    young = await ready_upload(uploads_uc, memory)
    clock.advance(timedelta(hours=1))
    # Bytes PUT after their row was swept: an object no row knows, old enough to be garbage...
    memory.put(f"{KEY_PREFIX}feedfeedfeedfeed/stray", b"x", "image/png", clock.now - TTL * 2)
    # ... and one too young to judge, and one outside the uploads prefix (never ours).
    memory.put(f"{KEY_PREFIX}feedfeedfeedfeed/fresh", b"x", "image/png", clock.now)
    memory.put("backups/db.tar", b"x", "application/x-tar", clock.now - TTL * 2)

    before_rows, before_objects = await rows(db), dict(memory.objects)
    dry = await uploads_uc.sweep(clock.now, dry_run=True)
    assert {u.id for u in dry.uploads} == {stale_pending.id, stale_ready.id, tombstoned.id}
    assert dry.stray_keys == [f"{KEY_PREFIX}feedfeedfeedfeed/stray"]
    assert await rows(db) == before_rows and memory.objects == before_objects

    result = await uploads_uc.sweep(clock.now)
    assert {u.id for u in result.uploads} == {stale_pending.id, stale_ready.id, tombstoned.id}
    assert result.stray_keys == dry.stray_keys and result.failed == []
    assert set(await rows(db)) == {attached.id, young.id}
    assert set(memory.objects) == {
        attached.object_key,
        young.object_key,
        f"{KEY_PREFIX}feedfeedfeedfeed/fresh",
        "backups/db.tar",
    }
    assert (await uploads_uc.sweep(clock.now)).uploads == []


async def test_a_failed_object_delete_keeps_the_row_deleting_and_invisible(
    store: SqlUploadStore, memory: MemoryBlobs, db: Database, clock: Clock
) -> None:
    healthy = Uploads(store, memory, StorageSettings(), clock)
    upload = await ready_upload(healthy, memory)
    clock.advance(TTL)
    outage = CrashingBlobs(memory, survive=0, error=OSError("storage unavailable"))
    flaky = Uploads(store, outage, StorageSettings(), clock)
    result = await flaky.sweep(clock.now)
    assert [u.id for u in result.failed] == [upload.id] and result.uploads == []
    assert (await rows(db))[upload.id].state == "deleting"
    assert upload.object_key in memory.objects
    result = await healthy.sweep(clock.now)
    assert [u.id for u in result.uploads] == [upload.id]
    assert await rows(db) == {} and memory.objects == {}


# ---- end to end on both backends, through the real HTTP path ------------------------------


@pytest.fixture
def real(blob_backend: Backend, store: SqlUploadStore, clock: Clock) -> Uploads:
    return Uploads(store, blob_backend.store, StorageSettings(), clock)


async def put_bytes(backend: Backend, url: SignedUrl, body: bytes) -> int:
    response = await backend.http.request(
        url.method, url.url, content=body, headers=dict(url.headers)
    )
    return response.status_code


async def test_upload_attach_and_download_on_both_backends(
    real: Uploads, blob_backend: Backend, db: Database
) -> None:
    body = os.urandom(200_000)
    upload, url = await real.create("alice", "photo.jpg", "image/jpeg", len(body), "op-up")
    assert await put_bytes(blob_backend, url, body) in (200, 201)
    ready = await real.complete("alice", upload.id)
    assert ready.sha256 == hashlib.sha256(body).hexdigest()

    _, message_id = await make_message(db, ["alice", "bob"], "alice")
    attachments = await real.validate_attachments("alice", [upload.id])
    assert await attach_to(db, "alice", message_id, [upload.id]) == attachments
    assert attachments[0].sha256 == ready.sha256

    download = await real.download_url("bob", upload.id)
    response = await blob_backend.http.get(download.url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == attachments[0].sha256
    with pytest.raises(NotFound):
        await real.download_url("carol", upload.id)


async def test_short_upload_is_caught_at_complete_then_retried(
    real: Uploads, blob_backend: Backend, db: Database
) -> None:
    body = b"%PDF-1.7 " + b"z" * 991
    upload, url = await real.create("alice", "doc.pdf", "application/pdf", len(body))
    assert await put_bytes(blob_backend, url, body[:500]) in (200, 201)
    with pytest.raises(FailedPrecondition) as exc:
        await real.complete("alice", upload.id)
    assert_failed(exc, "UPLOAD_MISMATCH", upload.id)
    assert await blob_backend.store.head(upload.object_key) is None
    assert (await rows(db))[upload.id].state == "pending"
    assert await put_bytes(blob_backend, url, body) in (200, 201)
    assert (await real.complete("alice", upload.id)).state == "ready"


async def test_oversized_upload_is_never_kept(real: Uploads, blob_backend: Backend) -> None:
    upload, url = await real.create("alice", "a.png", "image/png", 1000)
    status = await put_bytes(blob_backend, url, b"\x89PNG" + b"0" * 1500)
    if blob_backend.name == "local":
        assert status == 413  # refused by our own endpoint while streaming
    else:
        # Real GCS refuses this via the signed x-goog-content-length-range header; the emulator
        # does not, so the server's own check at complete is what is shown here.
        assert status in (200, 201)
        with pytest.raises(FailedPrecondition) as exc:
            await real.complete("alice", upload.id)
        assert_failed(exc, "UPLOAD_MISMATCH", upload.id)
    assert await blob_backend.store.head(upload.object_key) is None


async def test_sweep_on_both_backends(
    real: Uploads, blob_backend: Backend, db: Database, clock: Clock
) -> None:
    orphan, url = await real.create("alice", "o.png", "image/png", 4)
    assert await put_bytes(blob_backend, url, b"\x89PNG") in (200, 201)
    kept, url = await real.create("alice", "k.png", "image/png", 4)
    assert await put_bytes(blob_backend, url, b"\x89PNG") in (200, 201)
    await real.complete("alice", kept.id)
    _, message_id = await make_message(db, ["alice"], "alice")
    await attach_to(db, "alice", message_id, [kept.id])
    clock.advance(TTL + timedelta(seconds=5))

    dry = await real.sweep(clock.now, dry_run=True)
    assert [u.id for u in dry.uploads] == [orphan.id]
    assert await blob_backend.store.head(orphan.object_key) is not None
    result = await real.sweep(clock.now)
    assert [u.id for u in result.uploads] == [orphan.id]
    assert await blob_backend.store.head(orphan.object_key) is None
    assert await blob_backend.store.head(kept.object_key) is not None
    assert set(await rows(db)) == {kept.id}


# ---- crash safety of the deletion order ---------------------------------------------------


async def assert_consistent(db: Database, blobs: BlobStore, now: datetime) -> None:
    """The two promises: no live (ready/attached) row points at a missing object, and every
    object is named by some row. `deleting` rows are allowed either way: no client sees them."""
    found = await rows(db)
    for row in found.values():
        if row.state in ("ready", "attached"):
            assert await blobs.head(row.object_key) is not None, row.id
    keys = set(await blobs.list_keys(KEY_PREFIX, now + timedelta(days=365)))
    assert keys <= {row.object_key for row in found.values()}


async def seed_orphans(
    real: Uploads, backend: Backend, db: Database, clock: Clock
) -> tuple[list[Upload], Upload]:
    orphans = []
    for i in range(4):
        upload, url = await real.create("alice", f"{i}.png", "image/png", 3)
        assert await put_bytes(backend, url, b"PNG") in (200, 201)
        if i % 2:
            upload = await real.complete("alice", upload.id)
        orphans.append(upload)
    kept, url = await real.create("alice", "k.png", "image/png", 3)
    assert await put_bytes(backend, url, b"PNG") in (200, 201)
    await real.complete("alice", kept.id)
    _, message_id = await make_message(db, ["alice"], "alice")
    await attach_to(db, "alice", message_id, [kept.id])
    clock.advance(TTL + timedelta(seconds=5))
    return orphans, kept


@pytest.mark.parametrize("crash_after", [0, 1, 3])
async def test_crash_during_object_deletion_is_finished_by_the_next_sweep(
    real: Uploads,
    blob_backend: Backend,
    store: SqlUploadStore,
    db: Database,
    clock: Clock,
    crash_after: int,
) -> None:
    orphans, kept = await seed_orphans(real, blob_backend, db, clock)
    dying = Uploads(store, CrashingBlobs(blob_backend.store, crash_after), StorageSettings(), clock)
    with pytest.raises(Crash):
        await dying.sweep(clock.now)

    # Between the crash and the next sweep: every orphan row is `deleting` (some objects gone,
    # some not), nothing a client can reach points at nothing, no object is unowned.
    await assert_consistent(db, blob_backend.store, clock.now)
    states = {row.id: row.state for row in (await rows(db)).values()}
    assert states == {**{u.id: "deleting" for u in orphans}, kept.id: "attached"}
    for upload in orphans:
        with pytest.raises(NotFound):
            await real.download_url("alice", upload.id)
        with pytest.raises(FailedPrecondition):
            await real.validate_attachments("alice", [upload.id])
        with pytest.raises(NotFound):
            await real.complete("alice", upload.id)

    result = await real.sweep(clock.now)
    assert {u.id for u in result.uploads} == {u.id for u in orphans}
    assert set(await rows(db)) == {kept.id}
    for upload in orphans:
        assert await blob_backend.store.head(upload.object_key) is None
    assert await blob_backend.store.head(kept.object_key) is not None
    await assert_consistent(db, blob_backend.store, clock.now)


async def test_crash_between_steps_is_finished_by_the_next_sweep(
    real: Uploads, blob_backend: Backend, store: SqlUploadStore, db: Database, clock: Clock
) -> None:
    orphans, kept = await seed_orphans(real, blob_backend, db, clock)
    # Step (a) alone, then the process dies.
    assert await store.mark_orphans(clock.now) == len(orphans)
    await assert_consistent(db, blob_backend.store, clock.now)
    # Step (b) alone (objects deleted), then the process dies before (c).
    for upload in await store.deleting():
        await blob_backend.store.delete(upload.object_key)
    await assert_consistent(db, blob_backend.store, clock.now)
    assert {r.state for r in (await rows(db)).values() if r.id != kept.id} == {"deleting"}

    result = await real.sweep(clock.now)
    assert {u.id for u in result.uploads} == {u.id for u in orphans}
    assert set(await rows(db)) == {kept.id}
    await assert_consistent(db, blob_backend.store, clock.now)


async def test_rows_are_never_removed_before_their_objects(
    real: Uploads, blob_backend: Backend, store: SqlUploadStore, db: Database, clock: Clock
) -> None:
    orphans, _ = await seed_orphans(real, blob_backend, db, clock)
    # remove() only takes `deleting` rows, so a row can never vanish while still live...
    assert await store.remove([u.id for u in orphans]) == 0
    await store.mark_orphans(clock.now)
    # ...and the sweep deletes the object before the row; with the object delete failing, the
    # row stays.
    broken = CrashingBlobs(blob_backend.store, 0, OSError("down"))
    result = await Uploads(store, broken, StorageSettings(), clock).sweep(clock.now)
    assert result.uploads == [] and len(result.failed) == len(orphans)
    assert set(await rows(db)) >= {u.id for u in orphans}
    await assert_consistent(db, blob_backend.store, clock.now)


async def test_migration_0003_downgrades_and_upgrades(db_url: str, db: Database) -> None:
    if db.dialect != "sqlite":
        pytest.skip("schema round trip on the throwaway SQLite file only")
    await asyncio.to_thread(command.downgrade, alembic_config(db_url), "0002")
    async with db.read() as conn:
        names = set((await conn.execute(text("SELECT name FROM sqlite_master"))).scalars())
    assert "uploads" not in names and "messages" in names
    await migrate(db_url)
    async with db.read() as conn:
        names = set((await conn.execute(text("SELECT name FROM sqlite_master"))).scalars())
    assert "uploads" in names
