"""The local blob store through real HTTP: its aiohttp handlers on a loopback port, driven with
httpx exactly as a client would use the signed URLs it is given."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from tests.support.blob_servers import LocalServer, local_blob_server
from threadline_server.blobs import local as local_mod
from threadline_server.blobs.local import BadKey, LocalBlobStore, LocalSink, validate_key
from threadline_server.domain.uploads import SignedUrl

KEY = "uploads/0123456789abcdef/feedface"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@dataclass
class Env:
    server: LocalServer
    http: httpx.AsyncClient
    now: list[float]
    data_dir: Path

    @property
    def store(self) -> LocalBlobStore:
        return self.server.store

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds

    def stored_files(self) -> list[Path]:
        root = self.data_dir / "blobs"
        return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    now = [time.time()]
    data_dir = tmp_path / "data"
    async with (
        local_blob_server(data_dir, clock=lambda: now[0], write_chunk=64 * 1024) as server,
        httpx.AsyncClient(timeout=30) as client,
    ):
        yield Env(server, client, now, data_dir)


async def put(env: Env, url: SignedUrl, body: bytes, **headers: str) -> httpx.Response:
    sent = {**url.headers, **headers}
    return await env.http.request(url.method, url.url, content=body, headers=sent)


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


# ---- the happy path -----------------------------------------------------------------------


async def test_put_then_get_returns_the_same_bytes(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    assert url.method == "PUT" and url.headers == {"Content-Type": "image/png"}
    response = await put(env, url, PNG)
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(PNG).hexdigest()

    info = await env.store.head(KEY)
    assert info is not None
    assert (info.size, info.content_type) == (len(PNG), "image/png")
    assert info.sha256 == hashlib.sha256(PNG).hexdigest()

    get = await env.store.sign_get(KEY, 60, "chat picture é.png")
    response = await env.http.get(get.url)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''chat%20picture%20%C3%A9.png" in disposition
    head = await env.http.head(get.url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(PNG))


async def test_expiry_is_reported_with_the_url(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", 10, 900)
    expected = datetime.fromtimestamp(int(env.now[0] + 900), UTC)
    assert url.expires_at == expected


# ---- refused: signature, key, method, expiry ----------------------------------------------


async def test_tampered_signature_is_refused(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    sig = dict(parse_qsl(urlsplit(url.url).query))["sig"]
    forged = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    response = await put(
        env, SignedUrl(with_query(url.url, sig=forged), "PUT", url.headers, url.expires_at), PNG
    )
    assert response.status_code == 403
    assert env.stored_files() == []


@pytest.mark.parametrize(
    "change",
    [{"ct": "text/plain"}, {"max": "999999999"}, {"exp": "9999999999"}, {"sig": ""}],
    ids=["content-type", "size-limit", "expiry", "no-signature"],
)
async def test_changing_any_signed_parameter_is_refused(env: Env, change: dict[str, str]) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    headers = {"Content-Type": change.get("ct", "image/png")}
    response = await env.http.put(with_query(url.url, **change), content=PNG, headers=headers)
    assert response.status_code == 403
    assert env.stored_files() == []


async def test_url_signed_for_another_object_is_refused(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    other = with_path(url.url, "/blobs/uploads/0123456789abcdef/other")
    response = await env.http.put(other, content=PNG, headers=dict(url.headers))
    assert response.status_code == 403
    assert env.stored_files() == []


async def test_url_signed_for_another_method_is_refused(env: Env) -> None:
    put_url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    assert (await env.http.get(put_url.url)).status_code == 403
    assert (await put(env, put_url, PNG)).status_code == 201
    get_url = await env.store.sign_get(KEY, 60)
    response = await env.http.put(get_url.url, content=b"x", headers={"Content-Type": "image/png"})
    assert response.status_code == 403
    assert (await env.http.get(get_url.url)).content == PNG


async def test_expired_urls_are_refused(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    env.advance(61)
    assert (await put(env, url, PNG)).status_code == 403
    assert env.stored_files() == []

    fresh = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    assert (await put(env, fresh, PNG)).status_code == 201
    get_url = await env.store.sign_get(KEY, 30)
    assert (await env.http.get(get_url.url)).status_code == 200
    env.advance(31)
    assert (await env.http.get(get_url.url)).status_code == 403


async def test_get_needs_a_valid_signature_and_an_object(env: Env) -> None:
    get_url = await env.store.sign_get(KEY, 60)
    assert (await env.http.get(get_url.url)).status_code == 404
    bare = urlunsplit(urlsplit(get_url.url)._replace(query=""))
    assert (await env.http.get(bare)).status_code == 403


# ---- refused: content type, size, overwrite -----------------------------------------------


async def test_wrong_or_missing_content_type_is_refused(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    response = await env.http.put(url.url, content=PNG, headers={"Content-Type": "text/html"})
    assert response.status_code == 415
    response = await env.http.put(url.url, content=PNG)
    assert response.status_code == 415
    assert env.stored_files() == []


@pytest.mark.parametrize("size", [1001, 2 << 20])
async def test_declared_length_over_the_limit_is_refused_before_reading(
    env: Env, size: int
) -> None:
    url = await env.store.sign_put(KEY, "image/png", 1000, 60)
    started = time.monotonic()
    response = await put(env, url, b"x" * size)
    assert response.status_code == 413
    assert response.json() == {"error": "more than 1000 bytes"}
    assert env.stored_files() == []
    assert time.monotonic() - started < 5


async def test_streamed_body_over_the_limit_is_cut_off_and_nothing_kept(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = [0]
    original = LocalSink.write

    def counting_write(self: LocalSink, data: bytes) -> None:
        written[0] += len(data)
        original(self, data)

    monkeypatch.setattr(LocalSink, "write", counting_write)
    limit = 1 << 20
    url = await env.store.sign_put(KEY, "image/png", limit, 60)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * (256 * 1024)

    # No Content-Length (chunked): the server only learns the size as bytes arrive, answers
    # 413 the moment the limit is passed and hangs up; a client still pushing megabytes may see
    # the reset before the answer.
    try:
        response = await env.http.put(url.url, content=body(), headers=dict(url.headers))
    except httpx.TransportError:
        pass  # the server closed the connection while we were still sending: also a refusal
    else:
        assert response.status_code == 413
    # Cut off at the limit: never more than `limit` bytes reached the disk, and none remain.
    assert written[0] <= limit
    assert env.stored_files() == []
    assert await env.store.head(KEY) is None


async def test_body_at_exactly_the_limit_is_accepted(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    assert (await put(env, url, PNG)).status_code == 201


async def test_an_existing_object_is_never_overwritten(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    assert (await put(env, url, PNG)).status_code == 201
    response = await put(env, url, b"\x89PNG other bytes")
    assert response.status_code == 409
    get_url = await env.store.sign_get(KEY, 60)
    assert (await env.http.get(get_url.url)).content == PNG
    assert not list((env.data_dir / "blobs" / "tmp").iterdir())


async def test_concurrent_puts_to_one_key_store_exactly_one(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", 200_000, 60)
    bodies = [bytes([i]) * 200_000 for i in (1, 2, 3, 4)]
    responses = await asyncio.gather(*(put(env, url, b) for b in bodies))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 409, 409, 409]
    winner = bodies[[r.status_code for r in responses].index(201)]
    get_url = await env.store.sign_get(KEY, 60)
    assert (await env.http.get(get_url.url)).content == winner


async def test_bodies_are_streamed_in_bounded_writes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    original = LocalSink.write

    def recording_write(self: LocalSink, data: bytes) -> None:
        sizes.append(len(data))
        original(self, data)

    monkeypatch.setattr(LocalSink, "write", recording_write)
    body = os.urandom(3 << 20)
    url = await env.store.sign_put(KEY, "application/pdf", len(body), 60)
    assert (await put(env, url, body)).status_code == 201
    # Never the whole body at once: each write is at most two read chunks (64 KiB here).
    assert len(sizes) > 10
    assert max(sizes) <= 2 * 64 * 1024
    info = await env.store.head(KEY)
    assert info is not None and info.sha256 == hashlib.sha256(body).hexdigest()


# ---- keys and traversal -------------------------------------------------------------------

BAD_KEYS = [
    "",
    "..",
    ".",
    "../escape",
    "uploads/../../escape",
    "uploads/a/..",
    "/etc/passwd",
    "uploads//a",
    "uploads/./a",
    "uploads/a/",
    "uploads\\a",
    "uploads/a b",
    "uploads/a\x00b",
    "uploads/%2e%2e/a",
    "x" * 513,
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_rejected_before_any_file_access(env: Env, key: str) -> None:
    with pytest.raises(BadKey):
        validate_key(key)
    with pytest.raises(BadKey):
        await env.store.sign_put(key, "image/png", 10, 60)
    with pytest.raises(BadKey):
        await env.store.head(key)
    with pytest.raises(BadKey):
        await env.store.delete(key)


@pytest.mark.parametrize(
    "raw_path",
    [
        "/blobs/uploads/%2E%2E/%2E%2E/%2E%2E/escape",
        "/blobs/..%2F..%2F..%2Fescape",
        "/blobs/%2Fetc%2Fescape",
        "/blobs/uploads/a%5Cb",
    ],
)
async def test_traversal_over_http_is_refused(env: Env, tmp_path: Path, raw_path: str) -> None:
    url = f"{env.server.base_url}{raw_path}?exp=9999999999&ct=image%2Fpng&max=10&sig=x"
    response = await env.http.put(url, content=b"0123456789", headers={"Content-Type": "image/png"})
    assert response.status_code in (400, 403, 404)
    assert response.status_code != 201
    assert not any(tmp_path.rglob("escape*"))  # noqa: ASYNC240
    assert env.stored_files() == []


async def test_keys_allow_the_generated_shape(env: Env) -> None:
    assert (
        validate_key("uploads/0123456789abcdef/0a1b2c3d4e5f")
        == "uploads/0123456789abcdef/0a1b2c3d4e5f"
    )


# ---- secret, metadata, listing, deletion --------------------------------------------------


async def test_secret_is_private_and_survives_restarts(env: Env, tmp_path: Path) -> None:
    secret = env.data_dir / "keys" / local_mod.HMAC_KEY_FILE
    assert secret.stat().st_mode & 0o777 == 0o600
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    reopened = LocalBlobStore.open(env.data_dir, env.server.base_url, clock=lambda: env.now[0])
    query = dict(parse_qsl(urlsplit(url.url).query))
    assert reopened.authorize("PUT", KEY, query).content_type == "image/png"
    stranger = LocalBlobStore.open(tmp_path / "other", env.server.base_url)
    with pytest.raises(local_mod.Forbidden):
        stranger.authorize("PUT", KEY, query)


async def test_head_rehashes_when_metadata_is_missing(env: Env) -> None:
    url = await env.store.sign_put(KEY, "image/png", len(PNG), 60)
    assert (await put(env, url, PNG)).status_code == 201
    # A crash between publishing the bytes and their metadata: the hash is recomputed, and the
    # content type is unknown, so an upload cannot be completed on a guess.
    (env.data_dir / "blobs" / "meta" / f"{KEY}.json").unlink()
    info = await env.store.head(KEY)
    assert info is not None
    assert (info.size, info.content_type) == (len(PNG), "")
    assert info.sha256 == hashlib.sha256(PNG).hexdigest()


async def test_delete_is_idempotent_and_listing_honours_age_and_prefix(env: Env) -> None:
    keys = [KEY, "uploads/0123456789abcdef/second", "other/not-an-upload"]
    for key in keys:
        url = await env.store.sign_put(key, "text/plain", 2, 60)
        assert (await put(env, url, b"hi")).status_code == 201
    later = datetime.now(UTC) + timedelta(seconds=5)
    earlier = datetime.now(UTC) - timedelta(hours=1)
    assert await env.store.list_keys("uploads/", later) == sorted(keys[:2])
    assert await env.store.list_keys("uploads/", earlier) == []
    await env.store.delete(KEY)
    await env.store.delete(KEY)
    await env.store.delete("uploads/never/existed")
    assert await env.store.head(KEY) is None
    assert await env.store.list_keys("uploads/", later) == [keys[1]]
    get_url = await env.store.sign_get(KEY, 60)
    assert (await env.http.get(get_url.url)).status_code == 404


async def test_partial_uploads_of_a_crashed_process_are_removed(tmp_path: Path) -> None:
    store = LocalBlobStore.open(tmp_path, "http://127.0.0.1:1")
    stale = tmp_path / "blobs" / "tmp" / "old.part"
    fresh = tmp_path / "blobs" / "tmp" / "new.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(stale, (past, past))
    assert store.remove_stale_partials(3600) == 1
    assert not stale.exists() and fresh.exists()
