"""One BlobStore contract, run on both backends with a plain HTTP client, as a browser would.

What is verified where: on local disk the server itself enforces every signed URL (signature,
method, key, expiry, content type, size, no overwrite; see tests/unit/test_blobs_local.py). The
GCS emulator accepts any signature and ignores the precondition headers, so for GCS these tests
prove that the URLs work against a GCS-compatible server with the real client library, and
check the V4 signature cryptographically against the service-account key (that it covers the
method, the object, the content type and the create-only and size-range headers). That real GCS
then enforces what is signed is Google's part and cannot be shown offline.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.contract.conftest import Backend
from tests.support.blob_servers import GcsEmulator
from threadline_server.blobs import create_blob_store
from threadline_server.blobs.gcs import GcsBlobStore
from threadline_server.blobs.local import LocalBlobStore
from threadline_server.domain.uploads import SignedUrl

KEY = "uploads/00aa11bb22cc33dd/0123456789abcdef0123456789abcdef"


async def upload(backend: Backend, key: str, body: bytes, content_type: str = "image/png") -> None:
    url = await backend.store.sign_put(key, content_type, len(body), 900)
    response = await backend.http.request(
        url.method, url.url, content=body, headers=dict(url.headers)
    )
    assert response.status_code in (200, 201), response.text


async def test_put_with_the_signed_url_then_head_reports_the_bytes(blob_backend: Backend) -> None:
    body = os.urandom(300_000)
    url = await blob_backend.store.sign_put(KEY, "application/pdf", len(body), 900)
    assert url.method == "PUT"
    assert url.headers["Content-Type"] == "application/pdf"
    now = datetime.now(UTC)
    assert now + timedelta(seconds=890) <= url.expires_at <= now + timedelta(seconds=910)
    response = await blob_backend.http.put(url.url, content=body, headers=dict(url.headers))
    assert response.status_code in (200, 201), response.text

    info = await blob_backend.store.head(KEY)
    assert info is not None
    assert info.size == len(body)
    assert info.content_type == "application/pdf"
    assert info.sha256 == hashlib.sha256(body).hexdigest()


async def test_get_with_the_signed_url_returns_the_same_bytes(blob_backend: Backend) -> None:
    body = b"hello, threadline\n" * 1000
    await upload(blob_backend, KEY, body, "text/plain")
    url = await blob_backend.store.sign_get(KEY, 300, "notes 2026.txt")
    assert url.method == "GET" and not url.headers
    response = await blob_backend.http.get(url.url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == hashlib.sha256(body).hexdigest()
    assert response.headers["content-type"].startswith("text/plain")
    assert "notes%202026.txt" in response.headers["content-disposition"]


async def test_head_of_a_missing_object_is_none(blob_backend: Backend) -> None:
    assert await blob_backend.store.head(KEY) is None


async def test_delete_is_idempotent(blob_backend: Backend) -> None:
    await upload(blob_backend, KEY, b"\x89PNG bytes")
    await blob_backend.store.delete(KEY)
    assert await blob_backend.store.head(KEY) is None
    await blob_backend.store.delete(KEY)  # already gone: fine
    response = await blob_backend.http.get((await blob_backend.store.sign_get(KEY, 60)).url)
    assert response.status_code == 404


async def test_list_keys_by_prefix_and_age(blob_backend: Backend) -> None:
    keys = [KEY, "uploads/00aa11bb22cc33dd/second"]
    for key in keys:
        await upload(blob_backend, key, b"\x89PNG")
    await upload(blob_backend, "elsewhere/not-ours", b"\x89PNG")
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await blob_backend.store.list_keys("uploads/", soon) == sorted(keys)
    assert await blob_backend.store.list_keys("uploads/", soon - timedelta(hours=1)) == []


# ---- GCS only: the V4 signature, checked against the service-account key ------------------


def _canonical_query(query: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)]
    pairs = [(k, v) for k, v in pairs if k != "X-Goog-Signature"]
    return "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(pairs))


def v4_signature_valid(
    public_key: rsa.RSAPublicKey, method: str, url: str, headers: dict[str, str]
) -> bool:
    """GOOG4-RSA-SHA256 verification, written from Google's V4 signing spec (not from the client
    library): canonical request, string to sign, RSA PKCS#1 v1.5 over SHA-256."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    lowered = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    lowered["host"] = parts.netloc
    signed = query["X-Goog-SignedHeaders"].split(";")
    if sorted(lowered) != sorted(signed):
        return False
    canonical_headers = "".join(f"{name}:{lowered[name]}\n" for name in signed)
    canonical_request = "\n".join(
        [
            method,
            parts.path,
            _canonical_query(parts.query),
            canonical_headers,
            query["X-Goog-SignedHeaders"],
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            query["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    try:
        public_key.verify(
            bytes.fromhex(query["X-Goog-Signature"]),
            string_to_sign.encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        return False
    return True


async def test_gcs_put_url_signs_method_object_type_and_guards(gcs_backend: Backend) -> None:
    assert gcs_backend.emulator is not None
    key = gcs_backend.emulator.public_key
    url: SignedUrl = await gcs_backend.store.sign_put(KEY, "image/png", 1234, 900)
    headers = dict(url.headers)
    # Create-only and size cap travel as signed headers the client must send.
    assert headers["x-goog-if-generation-match"] == "0"
    assert headers["x-goog-content-length-range"] == "0,1234"
    assert "X-Goog-Credential=uploads%40threadline-test" in url.url
    assert v4_signature_valid(key, "PUT", url.url, headers)
    # The same URL does not authorize another method, object, type or size cap.
    assert not v4_signature_valid(key, "GET", url.url, headers)
    other_object = url.url.replace("0123456789abcdef0123456789abcdef", "f" * 32)
    assert not v4_signature_valid(key, "PUT", other_object, headers)
    assert not v4_signature_valid(key, "PUT", url.url, {**headers, "Content-Type": "text/html"})
    bigger = {**headers, "x-goog-content-length-range": "0,99999999"}
    assert not v4_signature_valid(key, "PUT", url.url, bigger)
    without_guard = {k: v for k, v in headers.items() if k != "x-goog-if-generation-match"}
    assert not v4_signature_valid(key, "PUT", url.url, without_guard)
    query = dict(parse_qsl(urlsplit(url.url).query))
    assert query["X-Goog-Expires"] == "900"


async def test_gcs_get_url_is_signed_for_get_only(gcs_backend: Backend) -> None:
    assert gcs_backend.emulator is not None
    url = await gcs_backend.store.sign_get(KEY, 300, "a.png")
    assert v4_signature_valid(gcs_backend.emulator.public_key, "GET", url.url, {})
    assert not v4_signature_valid(gcs_backend.emulator.public_key, "PUT", url.url, {})


async def test_the_factory_builds_each_backend(tmp_path: Path, emulator: GcsEmulator) -> None:
    local = create_blob_store("local", data_dir=tmp_path, public_url="http://127.0.0.1:8080")
    assert isinstance(local, LocalBlobStore)
    url = await local.sign_put(KEY, "image/png", 10, 60)
    assert url.url.startswith(f"http://127.0.0.1:8080/blobs/{KEY}?")

    gcs = create_blob_store(
        "gcs",
        data_dir=tmp_path,
        public_url="",
        bucket=emulator.new_bucket(),
        gcs_endpoint=emulator.endpoint,
        gcs_credentials_file=str(emulator.key_file),
        gcs_anonymous=True,
    )
    assert isinstance(gcs, GcsBlobStore)
    url = await gcs.sign_put(KEY, "image/png", 10, 60)
    assert url.url.startswith(f"{emulator.endpoint}/")
