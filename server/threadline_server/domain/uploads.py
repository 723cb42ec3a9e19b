"""Uploads: the life of a file from CreateUpload to cleanup, over two ports.

An upload is a database row (`UploadStore`) plus an object in a blob store (`BlobStore`). The
client sends the bytes straight to the blob store with a signed URL; the server only checks them
afterwards (`complete`). This module holds every rule and the order of every side effect; the
adapters (`storage.uploads`, `blobs.local`, `blobs.gcs`) only execute them.

States: ``pending`` (row written, bytes not verified) -> ``ready`` (verified, attachable by its
uploader) -> ``attached`` (part of exactly one message). ``deleting`` is internal: the row is on
its way out and counts as gone for every caller (never downloadable, never attachable).

Deletion order (why the sweep cannot strand anything):

1. one transaction moves every orphan row to ``deleting``;
2. each object of a ``deleting`` row is deleted (idempotent: a missing object is fine);
3. the rows whose object is gone are deleted.

A crash after 1 leaves ``deleting`` rows whose objects still exist: invisible to clients, and the
next sweep resumes at 2. A crash after 2 leaves ``deleting`` rows pointing at nothing: still
invisible, and the next sweep's step 2 is a no-op for them before step 3 removes them. So no
usable row ever points at a missing object, and no object outlives the row that names it. The
one way to get an object with no row at all is a PUT with a still-valid URL after its row was
removed; the sweep lists objects older than the orphan TTL and deletes those no row knows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol
from urllib.parse import quote

from threadline_server.config import StorageSettings
from threadline_server.domain.models import Attachment
from threadline_server.domain.validation import Violations, check_id, check_op_id
from threadline_server.errors import (
    FailedPrecondition,
    IdempotencyKeyReused,
    NotFound,
)

logger = logging.getLogger(__name__)

UploadState = Literal["pending", "ready", "attached", "deleting"]

# Every object key starts with this; the stray-object sweep lists only under it, so nothing else
# in a shared bucket is ever touched.
KEY_PREFIX = "uploads/"
MAX_FILE_NAME_CHARS = 255
UPLOAD_NOT_USABLE = "UPLOAD_NOT_USABLE"
UPLOAD_MISMATCH = "UPLOAD_MISMATCH"
# Blob deletions in flight at once during a sweep: enough to hide latency, few enough that a
# large backlog does not flood the storage API.
SWEEP_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Upload:
    """One upload row. `sha256` is empty until the bytes are verified; `message_id` is set only
    while attached."""

    id: str
    uploader_id: str
    file_name: str
    content_type: str
    size_bytes: int
    state: UploadState
    sha256: str
    object_key: str
    message_id: str | None
    created_at: datetime
    expires_at: datetime
    version: int

    def attachment(self) -> Attachment:
        """The metadata a message carries for this upload."""
        return Attachment(self.id, self.file_name, self.content_type, self.size_bytes, self.sha256)


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """A URL that grants one method on one object until `expires_at`. The request must carry
    `headers` exactly (they are part of the signature)."""

    url: str
    method: str
    headers: Mapping[str, str]
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the blob store holds under a key: the facts `complete` checks."""

    size: int
    content_type: str
    sha256: str  # lowercase hex, computed by the server from the stored bytes


class BlobStore(Protocol):
    """Object storage with signed URLs (local disk or Google Cloud Storage)."""

    async def sign_put(
        self, key: str, content_type: str, max_size: int, expires_in: float
    ) -> SignedUrl:
        """A URL for one PUT of at most `max_size` bytes of `content_type` to `key`; it never
        overwrites an existing object."""
        ...

    async def sign_get(self, key: str, expires_in: float, download_name: str = "") -> SignedUrl:
        """A URL for GET of `key`; `download_name` becomes the Content-Disposition file name."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """The stored object's size, content type and SHA-256, or None if there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Deletes the object; deleting a missing object succeeds."""
        ...

    async def list_keys(self, prefix: str, older_than: datetime) -> list[str]:
        """Keys under `prefix` of objects written before `older_than`."""
        ...


class UploadStore(Protocol):
    """Upload rows. Every state change is conditional on the state the caller saw, so two racing
    writers (complete vs. sweep, attach vs. sweep) never both win."""

    async def create(self, upload: Upload, client_op_id: str) -> tuple[Upload, bool]:
        """Inserts `upload`, or returns the row an earlier call with the same
        (uploader, client_op_id) created; the flag says whether this call created it."""
        ...

    async def get(self, upload_id: str) -> Upload | None: ...

    async def get_many(self, upload_ids: Sequence[str]) -> dict[str, Upload]: ...

    async def mark_ready(self, upload_id: str, sha256: str, version: int) -> Upload | None:
        """pending -> ready if the row is still at `version`; None if it changed meanwhile."""
        ...

    async def downloadable(self, upload_id: str, user_id: str) -> Upload | None:
        """The upload if `user_id` may download it: its uploader while ready; its uploader or a
        participant of the thread while attached to a message that is not deleted."""
        ...

    async def mark_orphans(self, now: datetime) -> int:
        """Moves every orphan to `deleting` in one transaction: pending or ready rows whose
        `expires_at` passed, and attached rows whose message was deleted (tombstone or gone)."""
        ...

    async def orphans(self, now: datetime) -> list[Upload]:
        """What `mark_orphans` would move, plus the rows already `deleting` (for dry runs)."""
        ...

    async def deleting(self) -> list[Upload]:
        """Rows in state `deleting`."""
        ...

    async def remove(self, upload_ids: Sequence[str]) -> int:
        """Deletes these rows if they are `deleting` (never a live row)."""
        ...

    async def known_keys(self, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` some row (in any state) names."""
        ...


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep removed (or, in a dry run, would remove)."""

    uploads: list[Upload] = field(default_factory=list)
    # Objects no row knew about (older than the orphan TTL).
    stray_keys: list[str] = field(default_factory=list)
    # Rows left `deleting` because their object could not be deleted; the next sweep retries.
    failed: list[Upload] = field(default_factory=list)


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ---- pure rules ----------------------------------------------------------------------------


def check_file_name(v: Violations, field_name: str, name: str) -> None:
    """File names are shown to people, never used as paths: 1-255 characters, no separators, no
    `..`, no control or bidirectional-formatting characters (which can disguise an extension)."""
    if not name or not name.strip():
        v.add(field_name, "file_name is required")
        return
    if len(name) > MAX_FILE_NAME_CHARS:
        v.add(field_name, f"file_name is {len(name)} characters; the limit is 255")
    if "/" in name or "\\" in name:
        v.add(field_name, "file_name must not contain path separators")
    if ".." in name:
        v.add(field_name, "file_name must not contain '..'")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        v.add(field_name, "file_name must not contain control or formatting characters")


def normalize_content_type(value: str) -> str:
    """Media types compare case-insensitively; parameters are not accepted (the signed header
    must match byte for byte, so one canonical form is kept)."""
    return value.strip().lower()


def check_create(
    v: Violations,
    settings: StorageSettings,
    file_name: str,
    content_type: str,
    size_bytes: int,
) -> None:
    """Every rule of CreateUpload's declaration, collected into `v`."""
    check_file_name(v, "file_name", file_name)
    allowed = {normalize_content_type(t) for t in settings.allowed_content_types}
    if not content_type:
        v.add("content_type", "content_type is required")
    elif normalize_content_type(content_type) not in allowed:
        v.add("content_type", f"content type {content_type!r} is not allowed")
    if size_bytes < 1:
        v.add("size_bytes", "size_bytes must be at least 1")
    elif size_bytes > settings.max_upload_bytes:
        v.add(
            "size_bytes",
            f"size_bytes is {size_bytes}; the limit is {settings.max_upload_bytes}",
        )


def new_object_key(uploader_id: str) -> str:
    """`uploads/{hash of uploader}/{random}`. Nothing the client chose goes into a key: the file
    name never does, and the user id only hashed (ids may hold characters keys do not allow, and
    bucket listings should not reveal who uploaded what)."""
    owner = hashlib.sha256(uploader_id.encode()).hexdigest()[:16]
    return f"{KEY_PREFIX}{owner}/{secrets.token_hex(16)}"


def content_disposition(name: str) -> str:
    """`attachment` always (downloads are never rendered inline by the storage origin), with an
    ASCII fallback file name and the exact one as RFC 6266 / 5987 `filename*`."""
    if not name:
        return "attachment"
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def unusable_reason(upload: Upload | None, user_id: str, now: datetime) -> str | None:
    """Why `upload` cannot be attached to a message `user_id` sends now, or None if it can. The
    single rule behind `Uploads.validate_attachments` and the storage layer's `attach`."""
    if upload is None or upload.uploader_id != user_id:
        return "not an upload of the sender"
    if upload.state == "pending":
        return "the upload is not complete"
    if upload.state != "ready" or upload.message_id is not None:
        return "the upload is attached elsewhere or removed"
    if upload.expires_at <= now:
        return "the upload expired"
    return None


def not_usable(upload_id: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(UPLOAD_NOT_USABLE, f"upload {upload_id}: {why}", subject=upload_id)


# ---- use cases -----------------------------------------------------------------------------


class Uploads:
    """Upload use cases: create, complete, download, attachment checks and the orphan sweep."""

    def __init__(
        self,
        store: UploadStore,
        blobs: BlobStore,
        settings: StorageSettings,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if settings.orphan_ttl_s <= settings.url_expiry_s:
            # Otherwise a row could be swept while its upload URL still works, and the bytes PUT
            # afterwards would sit unowned until the stray-object pass.
            raise ValueError("storage.orphan_ttl_s must be longer than storage.url_expiry_s")
        self._store = store
        self._blobs = blobs
        self._settings = settings
        self._clock = clock

    async def create(
        self,
        principal_user_id: str,
        file_name: str,
        content_type: str,
        size: int,
        client_op_id: str = "",
    ) -> tuple[Upload, SignedUrl]:
        """A pending upload and a URL to PUT its bytes to. With a `client_op_id`, a retry returns
        the same upload (with a freshly signed URL); the same id with a different declaration is
        IDEMPOTENCY_KEY_REUSED."""
        v = Violations()
        check_create(v, self._settings, file_name, content_type, size)
        check_op_id(v, "client_op_id", client_op_id, required=False)
        v.raise_if_any()
        now = self._clock()
        wanted = Upload(
            id=secrets.token_hex(16),
            uploader_id=principal_user_id,
            file_name=file_name,
            content_type=normalize_content_type(content_type),
            size_bytes=size,
            state="pending",
            sha256="",
            object_key=new_object_key(principal_user_id),
            message_id=None,
            created_at=now,
            expires_at=now + timedelta(seconds=self._settings.orphan_ttl_s),
            version=1,
        )
        upload, created = await self._store.create(wanted, client_op_id)
        if not created:
            same = (upload.file_name, upload.content_type, upload.size_bytes) == (
                wanted.file_name,
                wanted.content_type,
                wanted.size_bytes,
            )
            if not same:
                raise IdempotencyKeyReused(client_op_id)
            if upload.state == "deleting":
                raise NotFound("upload", upload.id)
        # Signed only after the row is committed: every URL in a client's hands names a key that
        # some row owns, so bytes PUT through it are always found by the sweep.
        url = await self._blobs.sign_put(
            upload.object_key, upload.content_type, upload.size_bytes, self._settings.url_expiry_s
        )
        return upload, url

    async def complete(self, user_id: str, upload_id: str) -> Upload:
        """Verifies the stored bytes against the declaration and makes the upload ready.

        Missing bytes: UPLOAD_MISMATCH, nothing changes (the client may still PUT). Wrong size or
        content type: the object is deleted, the row stays pending, UPLOAD_MISMATCH; the client
        may PUT again while its URL is valid, otherwise the sweep removes the row at its expiry.
        Completing a ready or attached upload again returns it unchanged; a pending upload past
        its `expires_at` is NOT_FOUND (the sweep is about to remove it).
        """
        _check_upload_id(upload_id)
        upload = await self._store.get(upload_id)
        now = self._clock()
        if upload is None or upload.uploader_id != user_id or upload.state == "deleting":
            raise NotFound("upload", upload_id)
        if upload.state != "pending":
            return upload
        if upload.expires_at <= now:
            raise NotFound("upload", upload_id)
        info = await self._blobs.head(upload.object_key)
        if info is None:
            raise FailedPrecondition(
                UPLOAD_MISMATCH, "no bytes were uploaded for this upload", subject=upload_id
            )
        problem = _mismatch(upload, info)
        if problem:
            await self._blobs.delete(upload.object_key)
            raise FailedPrecondition(UPLOAD_MISMATCH, problem, subject=upload_id)
        ready = await self._store.mark_ready(upload_id, info.sha256, upload.version)
        if ready is not None:
            return ready
        # Changed between our read and our write: a concurrent complete (fine, same answer) or
        # the sweep (then it is gone).
        current = await self._store.get(upload_id)
        if current is not None and current.state in ("ready", "attached"):
            return current
        raise NotFound("upload", upload_id)

    async def download_url(self, user_id: str, upload_id: str) -> SignedUrl:
        """A short-lived GET URL for the uploader or a participant of the thread it is attached
        in; NOT_FOUND for everyone else, and for uploads not complete or being removed."""
        _check_upload_id(upload_id)
        upload = await self._store.downloadable(upload_id, user_id)
        if upload is None:
            raise NotFound("upload", upload_id)
        return await self._blobs.sign_get(
            upload.object_key, self._settings.download_url_expiry_s, upload.file_name
        )

    async def validate_attachments(
        self, user_id: str, upload_ids: Sequence[str], field_name: str = "attachment_ids"
    ) -> tuple[Attachment, ...]:
        """Early check for a send: every id ready, the sender's, not attached elsewhere, not
        repeated. The authoritative check is `attach` inside the send transaction."""
        v = Violations()
        for i, upload_id in enumerate(upload_ids):
            check_id(v, f"{field_name}[{i}]", upload_id, "upload id")
        if len(set(upload_ids)) != len(upload_ids):
            v.add(field_name, "an upload can be attached only once")
        v.raise_if_any()
        if not upload_ids:
            return ()
        found = await self._store.get_many(upload_ids)
        now = self._clock()
        out = []
        for upload_id in upload_ids:
            upload = found.get(upload_id)
            why = unusable_reason(upload, user_id, now)
            if why is not None:
                raise not_usable(upload_id, why)
            assert upload is not None
            out.append(upload.attachment())
        return tuple(out)

    # ---- cleanup --------------------------------------------------------------------------

    async def sweep(self, now: datetime | None = None, *, dry_run: bool = False) -> SweepResult:
        """Removes orphaned uploads (rows and objects) and stray objects; see the module
        docstring for the order. A dry run reports the same and changes nothing."""
        now = self._clock() if now is None else now
        if dry_run:
            uploads = await self._store.orphans(now)
            return SweepResult(uploads, await self._stray_keys(now), [])
        await self._store.mark_orphans(now)
        removed, failed = await self.purge()
        strays = await self.remove_stray_objects(now)
        return SweepResult(removed, strays, failed)

    async def purge(self) -> tuple[list[Upload], list[Upload]]:
        """Steps 2 and 3 for every `deleting` row: delete its object, then the row. Returns the
        uploads removed and those whose object could not be deleted (kept for the next run).
        Cheap when nothing is `deleting`, so it can run right after a message or thread delete.
        """
        doomed = await self._store.deleting()
        if not doomed:
            return [], []
        gate = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def delete_object(upload: Upload) -> bool:
            async with gate:
                try:
                    await self._blobs.delete(upload.object_key)
                except Exception:
                    # The row stays `deleting` (invisible to clients); the next sweep retries.
                    logger.warning("could not delete object of upload %s", upload.id, exc_info=True)
                    return False
                return True

        done = await asyncio.gather(*(delete_object(u) for u in doomed))
        removed = [u for u, ok in zip(doomed, done, strict=True) if ok]
        failed = [u for u, ok in zip(doomed, done, strict=True) if not ok]
        if removed:
            await self._store.remove([u.id for u in removed])
        return removed, failed

    async def remove_stray_objects(self, now: datetime) -> list[str]:
        """Deletes objects older than the orphan TTL that no row names (bytes PUT after their row
        was removed). Younger ones are left: their row may be in the middle of its life."""
        strays = await self._stray_keys(now)
        for key in strays:
            try:
                await self._blobs.delete(key)
            except Exception:
                logger.warning("could not delete stray object %s", key, exc_info=True)
        return strays

    async def _stray_keys(self, now: datetime) -> list[str]:
        cutoff = now - timedelta(seconds=self._settings.orphan_ttl_s)
        keys = await self._blobs.list_keys(KEY_PREFIX, cutoff)
        if not keys:
            return []
        known = await self._store.known_keys(keys)
        return [k for k in keys if k not in known]


def _check_upload_id(upload_id: str) -> None:
    v = Violations()
    check_id(v, "upload_id", upload_id, "upload_id")
    v.raise_if_any()


def _mismatch(upload: Upload, info: ObjectInfo) -> str:
    if info.size != upload.size_bytes:
        return f"uploaded {info.size} bytes; {upload.size_bytes} were declared"
    if normalize_content_type(info.content_type) != upload.content_type:
        return f"uploaded as {info.content_type!r}; {upload.content_type!r} was declared"
    return ""
