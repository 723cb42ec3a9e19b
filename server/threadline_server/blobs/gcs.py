"""Google Cloud Storage blob store: V4 signed URLs for the client's direct PUT and GET, metadata
read back to verify an upload.

The google-cloud-storage client is synchronous; every call runs in a worker thread
(`asyncio.to_thread`) so the event loop never blocks on the network.

Credentials, three ways:

* `credentials_file` (a service-account JSON key): used for API calls and to sign URLs locally.
* nothing: Application Default Credentials for API calls. If they can sign (a key file via
  GOOGLE_APPLICATION_CREDENTIALS) they sign locally; otherwise (Cloud Run, GKE, GCE) URLs are
  signed by the IAM signBlob API with the runtime service account's email and access token,
  which needs `roles/iam.serviceAccountTokenCreator` on itself.
* `anonymous=True` (emulators only): API calls without credentials, URLs still signed with the
  key in `credentials_file`.

Upload URLs carry two signed headers the client must send, so GCS itself enforces them:
`x-goog-if-generation-match: 0` (create only: a URL can never replace an object, even one it
wrote) and `x-goog-content-length-range: 0,{max}` (nothing larger is stored).

SHA-256: GCS records MD5 and CRC32C itself but not SHA-256, and metadata a client could set is
not evidence. `head` therefore streams the object once and hashes it (25 MB at most by default),
pinned to the generation whose size and content type it reports; the download is CRC32C-checked
by the client library. `complete` stores the result, so this happens once per upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import google.auth
import google.auth.transport.requests
from google.api_core.exceptions import NotFound, PreconditionFailed
from google.auth.credentials import AnonymousCredentials, Credentials, Signing
from google.cloud import storage  # type: ignore[import-untyped]  # no py.typed
from google.oauth2 import service_account

from threadline_server.domain.uploads import (
    ObjectInfo,
    SignedUrl,
    content_disposition,
    normalize_content_type,
)

SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
# Seconds per storage API call (connect, read); the library retries idempotent calls itself.
TIMEOUT = (10.0, 60.0)


class _HashingSink:
    """A file-like target for download_to_file that keeps only a running SHA-256."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


class GcsBlobStore:
    """BlobStore on one GCS bucket."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        signing: Callable[[], dict[str, Any]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not bucket:
            raise ValueError("storage.bucket is required for the gcs backend")
        self._client = client
        self._bucket = client.bucket(bucket)
        self._signing = signing
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        bucket: str,
        *,
        endpoint: str = "",
        credentials_file: str = "",
        anonymous: bool = False,
        project: str = "",
    ) -> GcsBlobStore:
        """Builds the client and the signer as described in the module docstring. `endpoint`
        overrides the API (and signed URL) base, e.g. http://127.0.0.1:9023 for an emulator."""
        options = {"api_endpoint": endpoint} if endpoint else None
        if anonymous:
            if not credentials_file:
                raise ValueError("anonymous GCS access still needs a key file to sign URLs")
            signer = _key_file(credentials_file)
            client = storage.Client(
                project=project or "threadline",
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options=options,
            )
            return cls(client, bucket, lambda: {"credentials": signer})
        if credentials_file:
            key = _key_file(credentials_file)
            client = storage.Client(
                project=project or key.project_id, credentials=key, client_options=options
            )
            return cls(client, bucket, lambda: {"credentials": key})
        adc, adc_project = google.auth.default(scopes=SCOPES)
        client = storage.Client(
            project=project or adc_project, credentials=adc, client_options=options
        )
        return cls(client, bucket, _adc_signer(adc))

    # ---- BlobStore ------------------------------------------------------------------------

    async def sign_put(
        self, key: str, content_type: str, max_size: int, expires_in: float
    ) -> SignedUrl:
        ct = normalize_content_type(content_type)
        headers = {
            "Content-Type": ct,
            "x-goog-if-generation-match": "0",
            "x-goog-content-length-range": f"0,{max_size}",
        }
        return await asyncio.to_thread(self._sign, key, "PUT", expires_in, headers, "")

    async def sign_get(self, key: str, expires_in: float, download_name: str = "") -> SignedUrl:
        return await asyncio.to_thread(self._sign, key, "GET", expires_in, {}, download_name)

    async def head(self, key: str) -> ObjectInfo | None:
        return await asyncio.to_thread(self._head, key)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    async def list_keys(self, prefix: str, older_than: datetime) -> list[str]:
        return await asyncio.to_thread(self._list, prefix, older_than)

    # ---- blocking halves ------------------------------------------------------------------

    def _sign(
        self,
        key: str,
        method: str,
        expires_in: float,
        headers: dict[str, str],
        download_name: str,
    ) -> SignedUrl:
        expires_at = self._clock() + timedelta(seconds=expires_in)
        extra: dict[str, Any] = {}
        if download_name:
            extra["response_disposition"] = content_disposition(download_name)
        url = self._bucket.blob(key).generate_signed_url(
            version="v4",
            method=method,
            expiration=timedelta(seconds=expires_in),
            # The library adds Content-Type and Host to the dict it is given: pass a copy.
            headers={k: v for k, v in headers.items() if k != "Content-Type"} or None,
            content_type=headers.get("Content-Type"),
            **extra,
            **self._signing(),
        )
        return SignedUrl(str(url), method, dict(headers), expires_at)

    def _head(self, key: str) -> ObjectInfo | None:
        blob = self._bucket.get_blob(key, timeout=TIMEOUT)
        if blob is None:
            return None
        sink = _HashingSink()
        try:
            blob.download_to_file(
                sink, if_generation_match=blob.generation, timeout=TIMEOUT, checksum="auto"
            )
        except (NotFound, PreconditionFailed):
            return None  # deleted or replaced while we read it: report what is certain
        size = int(blob.size or 0)
        if sink.size != size:
            return None
        return ObjectInfo(size, str(blob.content_type or ""), sink.digest.hexdigest())

    def _delete(self, key: str) -> None:
        with contextlib.suppress(NotFound):  # idempotent: already gone is the goal
            self._bucket.delete_blob(key, timeout=TIMEOUT)

    def _list(self, prefix: str, older_than: datetime) -> list[str]:
        keys = []
        for blob in self._client.list_blobs(self._bucket, prefix=prefix, timeout=TIMEOUT):
            created = blob.time_created
            if created is not None and created < older_than:
                keys.append(str(blob.name))
        return sorted(keys)


def _key_file(path: str) -> service_account.Credentials:
    credentials: service_account.Credentials = (
        service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            path, scopes=SCOPES
        )
    )
    return credentials


def _adc_signer(credentials: Credentials) -> Callable[[], dict[str, Any]]:
    """Signing arguments for Application Default Credentials (see the module docstring)."""
    if isinstance(credentials, Signing):
        return lambda: {"credentials": credentials}

    def iam_sign_blob() -> dict[str, Any]:
        if not credentials.valid:
            credentials.refresh(google.auth.transport.requests.Request())  # type: ignore[no-untyped-call]
        return {
            "service_account_email": getattr(credentials, "service_account_email", None),
            "access_token": credentials.token,
        }

    return iam_sign_blob
