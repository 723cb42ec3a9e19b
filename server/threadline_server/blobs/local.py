"""Local-disk blob store: objects under `data_dir/blobs`, reached through URLs the server signs.

Layout: `blobs/objects/{key}` holds the bytes, `blobs/meta/{key}.json` the content type, size and
SHA-256 computed while the bytes streamed in, `blobs/tmp/` the partial uploads (same file system,
so publishing one is an atomic link). The signing secret is `data_dir/keys/blob_url_hmac.key`
(mode 0600), created on first use and kept across restarts so URLs survive them.

A URL is `{public_url}/blobs/{key}?exp=..&ct=..&max=..&dn=..&sig=..`; `sig` is an HMAC-SHA256
over the method, key, content type, size limit, expiry and download name, so none of them can be
changed and a PUT URL is no GET URL. The HTTP handlers (`transport.blob_http`) call
`authorize`, then `open_sink` / `locate`; everything that touches the file system is here and
synchronous, and the handlers run it off the event loop. No aiohttp import: this module stays
usable from the CLI and tests without a web server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, ClassVar
from urllib.parse import quote, urlencode

from threadline_server.domain.uploads import ObjectInfo, SignedUrl, normalize_content_type
from threadline_server.durable import fsync_dir, write_new_file

logger = logging.getLogger(__name__)

HMAC_KEY_FILE = "blob_url_hmac.key"
MAX_KEY_CHARS = 512
_KEY = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")
_HASH_CHUNK = 1 << 20
# Partial uploads older than this at startup belong to a crashed process, not a live request.
_STALE_TMP_S = 3600.0


class BlobRefused(Exception):
    """A request the local blob endpoint refuses; `status` is the HTTP status to answer."""

    status: ClassVar[int] = 403

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadKey(BlobRefused):
    status = 400


class Forbidden(BlobRefused):
    """Missing, malformed or wrong signature, or a URL used for another method or object."""

    status = 403


class Expired(BlobRefused):
    status = 403


class ObjectMissing(BlobRefused):
    status = 404


class ObjectExists(BlobRefused):
    """Objects are written once: a second PUT to a key never replaces the first."""

    status = 409


class TooLarge(BlobRefused):
    status = 413


class WrongContentType(BlobRefused):
    status = 415


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified URL allows."""

    method: str
    key: str
    content_type: str
    max_size: int
    expires: int
    download_name: str


@dataclass(frozen=True, slots=True)
class LocalObject:
    """A stored object, as the GET handler serves it."""

    path: Path
    size: int
    content_type: str


def validate_key(key: str) -> str:
    """Keys are relative paths of [A-Za-z0-9_.-] segments: no `..`, no `.` segment, no leading,
    trailing or doubled slash, no backslash, at most 512 characters. Checked before any file
    system call, and the resolved path is checked to stay inside the root as well."""
    if not key or len(key) > MAX_KEY_CHARS or not _KEY.match(key) or ".." in key:
        raise BadKey("invalid object key")
    if any(segment == "." for segment in key.split("/")):
        raise BadKey("invalid object key")
    return key


def load_or_create_secret(path: Path) -> bytes:
    """The HMAC secret, 32 random bytes, written once with mode 0600 (two processes starting at
    once agree on the first one written: link() does not replace)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = base64.b64encode(secrets.token_bytes(32)) + b"\n"
        write_new_file(path, encoded, 0o600)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users; chmod 600 it", path)
    secret = base64.b64decode(path.read_bytes().strip(), validate=True)
    if len(secret) < 32:
        raise ValueError(f"{path} holds a secret shorter than 32 bytes")
    return secret


class LocalBlobStore:
    """BlobStore on the local file system, with HMAC-signed URLs served by the side listener."""

    def __init__(
        self,
        root: Path,
        secret: bytes,
        public_url: str | Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._root = root.resolve()
        self._objects = self._root / "objects"
        self._meta = self._root / "meta"
        self._tmp = self._root / "tmp"
        for directory in (self._objects, self._meta, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self._public_url = public_url
        self._clock = clock

    @classmethod
    def open(
        cls,
        data_dir: Path,
        public_url: str | Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> LocalBlobStore:
        """The store under `data_dir/blobs` with the secret from `data_dir/keys`; removes partial
        uploads a crashed process left behind."""
        secret = load_or_create_secret(Path(data_dir) / "keys" / HMAC_KEY_FILE)
        store = cls(Path(data_dir) / "blobs", secret, public_url, clock)
        store.remove_stale_partials(_STALE_TMP_S)
        return store

    # ---- signing --------------------------------------------------------------------------

    def _signature(self, method: str, key: str, ct: str, max_size: int, exp: int, dn: str) -> str:
        # JSON keeps the fields unambiguous (no separator can be smuggled inside a field).
        message = json.dumps(
            ["threadline-blob-v1", method, key, ct, max_size, exp, dn],
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _url(self, key: str, params: dict[str, str]) -> str:
        base = self._public_url() if callable(self._public_url) else self._public_url
        return f"{base.rstrip('/')}/blobs/{quote(key, safe='/')}?{urlencode(params)}"

    def _expiry(self, expires_in: float) -> int:
        return int(self._clock() + expires_in)

    async def sign_put(
        self, key: str, content_type: str, max_size: int, expires_in: float
    ) -> SignedUrl:
        validate_key(key)
        ct = normalize_content_type(content_type)
        exp = self._expiry(expires_in)
        sig = self._signature("PUT", key, ct, max_size, exp, "")
        url = self._url(key, {"exp": str(exp), "ct": ct, "max": str(max_size), "sig": sig})
        return SignedUrl(url, "PUT", {"Content-Type": ct}, datetime.fromtimestamp(exp, UTC))

    async def sign_get(self, key: str, expires_in: float, download_name: str = "") -> SignedUrl:
        validate_key(key)
        exp = self._expiry(expires_in)
        sig = self._signature("GET", key, "", 0, exp, download_name)
        params = {"exp": str(exp), "sig": sig}
        if download_name:
            params["dn"] = download_name
        return SignedUrl(self._url(key, params), "GET", {}, datetime.fromtimestamp(exp, UTC))

    def authorize(self, method: str, key: str, query: Mapping[str, str]) -> Grant:
        """Checks a request against its URL's signature; raises BlobRefused. HEAD is a GET."""
        method = "GET" if method == "HEAD" else method
        validate_key(key)
        try:
            exp = int(query.get("exp", ""))
            max_size = int(query.get("max", "0"))
        except ValueError as exc:
            raise Forbidden("malformed signed URL") from exc
        ct = query.get("ct", "")
        dn = query.get("dn", "")
        expected = self._signature(method, key, ct, max_size, exp, dn)
        if not hmac.compare_digest(expected.encode(), query.get("sig", "").encode()):
            raise Forbidden("signature does not match this request")
        if self._clock() > exp:
            raise Expired("the signed URL has expired")
        if method == "PUT" and (not ct or max_size < 1):
            raise Forbidden("not an upload URL")
        return Grant(method, key, ct, max_size, exp, dn)

    # ---- files ----------------------------------------------------------------------------

    def _path(self, base: Path, key: str, suffix: str = "") -> Path:
        validate_key(key)
        path = (base / (key + suffix)).resolve()
        if not path.is_relative_to(base):
            raise BadKey("invalid object key")
        return path

    def locate(self, key: str) -> LocalObject | None:
        """The stored object for a GET, or None."""
        path = self._path(self._objects, key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        meta = self._read_meta(key)
        content_type = meta.get("content_type") if meta else None
        return LocalObject(path, st.st_size, str(content_type or "application/octet-stream"))

    def exists(self, key: str) -> bool:
        return self.locate(key) is not None

    def open_sink(self, grant: Grant) -> LocalSink:
        """A partial upload for `grant` (a verified PUT) in the tmp directory."""
        if grant.method != "PUT":
            raise Forbidden("not an upload URL")
        target = self._path(self._objects, grant.key)
        meta = self._path(self._meta, grant.key, ".json")
        fd, tmp = tempfile.mkstemp(dir=self._tmp, suffix=".part")
        return LocalSink(grant, Path(tmp), os.fdopen(fd, "wb"), target, meta)

    def _read_meta(self, key: str) -> dict[str, object] | None:
        try:
            data = json.loads(self._path(self._meta, key, ".json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def head_sync(self, key: str) -> ObjectInfo | None:
        found = self.locate(key)
        if found is None:
            return None
        meta = self._read_meta(key)
        if meta is not None and meta.get("size") == found.size and meta.get("sha256"):
            return ObjectInfo(found.size, str(meta.get("content_type", "")), str(meta["sha256"]))
        # Only after a crash between publishing the bytes and their metadata: hash the file
        # and report no content type, so `complete` refuses it rather than trusting a guess.
        digest = hashlib.sha256()
        with found.path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        return ObjectInfo(found.size, "", digest.hexdigest())

    def delete_sync(self, key: str) -> None:
        # Metadata first: a crash in between leaves bytes without metadata, which list_keys
        # still finds (it lists objects), never metadata that nothing lists.
        for path in (self._path(self._meta, key, ".json"), self._path(self._objects, key)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                path.unlink()

    def list_keys_sync(self, prefix: str, older_than: datetime) -> list[str]:
        cutoff = older_than.timestamp()
        # Walk only the directory the prefix names (plus a partial last segment).
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._objects / directory if directory else self._objects
        if directory:
            validate_key(directory)
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(self._objects).as_posix()
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        keys.append(key)
        return sorted(keys)

    def remove_stale_partials(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._tmp.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    # ---- BlobStore (async) ----------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        return await asyncio.to_thread(self.head_sync, key)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.delete_sync, key)

    async def list_keys(self, prefix: str, older_than: datetime) -> list[str]:
        return await asyncio.to_thread(self.list_keys_sync, prefix, older_than)


class LocalSink:
    """One upload being written: bytes go to a temporary file, hashed as they arrive, and are
    published under the key only by `commit` (fsync, then an atomic no-replace link). Until then
    nothing is visible, and `abort` leaves nothing behind."""

    def __init__(self, grant: Grant, tmp: Path, out: IO[bytes], target: Path, meta: Path) -> None:
        self.grant = grant
        self.received = 0
        self._tmp = tmp
        self._out = out
        self._target = target
        self._meta = meta
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.grant.max_size:
            raise TooLarge(f"more than {self.grant.max_size} bytes")
        self._out.write(data)
        self._digest.update(data)
        self.received += len(data)

    def commit(self) -> ObjectInfo:
        """Publishes the object; ObjectExists if the key already holds one (never replaced)."""
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self._tmp, self._target)
            except FileExistsError as exc:
                raise ObjectExists("an object already exists under this key") from exc
            except (NotADirectoryError, IsADirectoryError) as exc:
                raise ObjectExists("the key conflicts with an existing object") from exc
            fsync_dir(self._target.parent)
            info = ObjectInfo(self.received, self.grant.content_type, self._digest.hexdigest())
            self._write_meta(info)
            return info
        finally:
            self._discard()

    def abort(self) -> None:
        self._discard()

    def _write_meta(self, info: ObjectInfo) -> None:
        self._meta.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(
            {"content_type": info.content_type, "size": info.size, "sha256": info.sha256}
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=self._meta.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self._meta)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(self._meta.parent)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
