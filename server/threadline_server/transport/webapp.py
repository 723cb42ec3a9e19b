"""The browser web app on the side HTTP listener: its built files, `/app-config.json`, and the
security headers of its pages.

The app is a static build (Vite: `index.html` plus content-hashed files under `assets/`).
`index.html` is always revalidated (`no-cache`, with ETag and Last-Modified), hashed assets are
cached for a year (`immutable`), text is gzipped for clients that accept it (a prebuilt `.gz` or
`.br` sibling is preferred). Only regular files inside the app directory are served: every path
segment must be a plain file name (no `..`, no dot files, no `%`, no backslash) and the resolved
path must stay inside the directory, so neither traversal nor a symlink leads out of it. No
directory is ever listed. Without a built app `/` answers a 404 page that says how to build it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web import ContentCoding

from threadline_server.config import Settings
from threadline_server.transport.http import WebContext

logger = logging.getLogger(__name__)

INDEX = "index.html"
NO_CACHE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"
# Set explicitly: the platform's mimetypes table differs between systems (.js was long
# application/javascript, .map and .webmanifest are often unknown).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
}
_COMPRESSIBLE = frozenset({".html", ".js", ".mjs", ".css", ".json", ".map", ".svg", ".txt"})
_COMPRESSIBLE |= {".webmanifest", ".wasm", ".ico", ".ttf"}
# Requests answered without on-the-fly gzip (see WebApp._file).
_UNCOMPRESSED = (
    "Range",
    "If-Range",
    "If-None-Match",
    "If-Modified-Since",
    "If-Match",
    "If-Unmodified-Since",
)
# One path segment of an app file: no leading dot (so no `.`, `..` or dot files), no `%`,
# backslash, colon or control character.
_SEGMENT = re.compile(r"[A-Za-z0-9_~+@-][A-Za-z0-9_.~+@-]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]{1,253}")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")
# An origin as it may appear in a CSP source list (nothing that could end a directive).
_ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_CLERK_KEY = re.compile(r"pk_(?:test|live)_([A-Za-z0-9+/_-]+={0,2})")
# Clerk's hosted pieces (its CSP guide): avatars and the bot-protection challenge.
_CLERK_IMG = "https://img.clerk.com"
_CLERK_CHALLENGE = "https://challenges.cloudflare.com"

NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Threadline: web app not built</title></head>
<body>
<h1>The Threadline web app is not built</h1>
<p>Threadline is running, but it found no built web app to serve here.</p>
<p>Build it into <code>gen/web</code> (from a checkout: the web app's <code>build</code> script,
see docs/web.md), install a wheel that ships it, or point <code>web.app_dir</code>
(<code>THREADLINE_WEB__APP_DIR</code>) at a directory holding its <code>index.html</code>.
Then reload this page; no restart is needed.</p>
</body></html>
"""


def find_app_dir(configured: str) -> Path:
    """`web.app_dir`, else the app shipped inside the installed package (wheels carry it as
    threadline_server/_webapp), else the repository's gen/web next to the source tree."""
    if configured:
        return Path(configured).expanduser().resolve()
    package = Path(__file__).resolve().parent.parent
    shipped = package / "_webapp"
    if shipped.is_dir():
        return shipped
    return package.parent.parent / "gen" / "web"


def origin_of(url: str) -> str | None:
    """scheme://host[:port] of an http(s) URL, or None if it has none fit for a CSP."""
    parts = urlsplit(url.strip())
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    shown = f"[{host}]" if ":" in host else host
    origin = f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")
    return origin if _ORIGIN.fullmatch(origin) else None


def clerk_frontend_api(publishable_key: str) -> str | None:
    """The Frontend API origin a Clerk publishable key names: the key is `pk_test_` or
    `pk_live_` and the base64 of `<host>$`."""
    match = _CLERK_KEY.fullmatch(publishable_key.strip())
    if match is None:
        return None
    encoded = match[1].replace("-", "+").replace("_", "/")
    try:
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        text = decoded.decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return None
    host = text[:-1] if text.endswith("$") else ""
    return f"https://{host}" if _HOSTNAME.fullmatch(host) and "." in host else None


def page_host(request: web.Request, fallback: str) -> str:
    """The host (no port) the page was loaded from, from the Host header; `fallback` when the
    header is missing or not a plain host name or address."""
    raw = request.headers.get("Host", "").strip()
    if raw.startswith("["):
        host = raw.split("]", 1)[0] + "]"
        return host if _IPV6.fullmatch(host) else fallback
    host = raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw
    return host if _HOSTNAME.fullmatch(host) else fallback


class WebApp:
    """aiohttp handlers for the web app; mount with `add_routes(router)`, after every other
    route (the top-level file route would otherwise answer their GETs)."""

    def __init__(
        self,
        settings: Settings,
        context: WebContext,
        *,
        dev_sign_in: bool,
        fallback_host: str,
    ) -> None:
        web_settings = settings.web
        self._root = find_app_dir(web_settings.app_dir)
        self._context = context
        bare_ipv6 = ":" in fallback_host and not fallback_host.startswith("[")
        self._fallback_host = f"[{fallback_host}]" if bare_ipv6 else fallback_host
        self._public_url = web_settings.public_url.strip().rstrip("/")
        if self._public_url and origin_of(self._public_url) is None:
            raise ValueError(f"web.public_url must be an http(s) URL, not {self._public_url!r}")
        self._auth_mode = settings.auth.mode
        self._dev_sign_in = dev_sign_in
        self._clerk_key = settings.auth.clerk_publishable_key.strip()
        self._clerk_api: str | None = None
        if self._auth_mode == "clerk" and self._clerk_key:
            self._clerk_api = clerk_frontend_api(self._clerk_key)
            if self._clerk_api is None:
                logger.warning("auth.clerk_publishable_key is not a Clerk publishable key")
        if (self._root / INDEX).is_file():
            logger.info("web app: serving %s", self._root)
        else:
            logger.info("web app not built: no %s in %s", INDEX, self._root)

    @property
    def root(self) -> Path:
        return self._root

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.handle_index)
        router.add_get("/app-config.json", self.handle_config)
        router.add_get("/assets/{path:.+}", self.handle_asset)
        # Top-level files of the build (favicon, manifest, robots.txt): one segment only, so
        # POSTs to other paths (a disabled /auth/dev-token) stay 404, not 405.
        router.add_get("/{name:[^/]+}", self.handle_top_level)

    # ---- handlers --------------------------------------------------------------------------

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        found = await asyncio.to_thread(self._locate, INDEX)
        if found is None:
            return web.Response(
                status=404,
                text=NOT_BUILT,
                content_type="text/html",
                headers={**self._security(request), "Cache-Control": NO_CACHE},
            )
        return self._file(request, found, NO_CACHE)

    async def handle_asset(self, request: web.Request) -> web.StreamResponse:
        found = await asyncio.to_thread(self._locate, "assets/" + request.match_info["path"])
        if found is None:
            return self._not_found(request)
        return self._file(request, found, IMMUTABLE)

    async def handle_top_level(self, request: web.Request) -> web.StreamResponse:
        found = await asyncio.to_thread(self._locate, request.match_info["name"])
        if found is None:
            return self._not_found(request)
        return self._file(request, found, NO_CACHE)

    async def handle_config(self, request: web.Request) -> web.Response:
        """What the app needs before its first call: where the edge is, how to sign in."""
        clerk = self._auth_mode == "clerk"
        document = {
            "grpc_web_url": self.grpc_web_url(request),
            "auth_mode": self._auth_mode,
            "clerk_publishable_key": (self._clerk_key or None) if clerk else None,
            "dev_sign_in": self._dev_sign_in,
        }
        return web.json_response(
            document, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        )

    # ---- pieces ----------------------------------------------------------------------------

    def grpc_web_url(self, request: web.Request) -> str | None:
        """web.public_url, else the edge's port on the host the page was loaded from; None
        while no edge runs (web.mode off or Envoy missing) and none is configured."""
        if self._public_url:
            return self._public_url
        port = self._context.edge_port
        if port is None:
            return None
        return f"http://{page_host(request, self._fallback_host)}:{port}"

    def content_security_policy(self, request: web.Request) -> str:
        """default-src 'self'; the edge and the file store may be called; images and media
        from the file store, blob: and data:; no framing, plugins, base or foreign forms."""
        edge_url = self.grpc_web_url(request)
        edge = [o for o in [origin_of(edge_url) if edge_url else None] if o]
        files = [o for o in [origin_of(self._context.blob_origin)] if o]
        directives: dict[str, list[str]] = {
            "default-src": ["'self'"],
            "connect-src": ["'self'", *edge, *files],
            "img-src": ["'self'", "blob:", "data:", *files],
            "media-src": ["'self'", "blob:", *files],
            "frame-ancestors": ["'none'"],
            "object-src": ["'none'"],
            "base-uri": ["'none'"],
            "form-action": ["'self'"],
        }
        if self._clerk_api is not None:  # Clerk's CSP guide: its script, API, styles, workers
            directives["script-src"] = ["'self'", self._clerk_api]
            directives["connect-src"].append(self._clerk_api)
            directives["img-src"].append(_CLERK_IMG)
            directives["style-src"] = ["'self'", "'unsafe-inline'"]
            directives["worker-src"] = ["'self'", "blob:"]
            directives["frame-src"] = [_CLERK_CHALLENGE]
        return "; ".join(
            f"{name} {' '.join(dict.fromkeys(sources))}" for name, sources in directives.items()
        )

    def _security(self, request: web.Request) -> dict[str, str]:
        return {
            "Content-Security-Policy": self.content_security_policy(request),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="not found", headers=self._security(request))

    def _file(self, request: web.Request, path: Path, cache: str) -> web.FileResponse:
        suffix = path.suffix.lower()
        headers = {
            **self._security(request),
            "Cache-Control": cache,
            "Content-Type": CONTENT_TYPES.get(suffix, "application/octet-stream"),
        }
        response = web.FileResponse(path, headers=headers)
        if suffix in _COMPRESSIBLE:
            response.headers["Vary"] = "Accept-Encoding"
            # gzip by name: aiohttp would otherwise pick deflate first. A prebuilt .gz/.br
            # sibling wins (FileResponse then turns this off itself). Only for a plain GET:
            # not a range (a compressed slice is no slice of the file), and not a HEAD or a
            # conditional request, because aiohttp 3.14 writes a gzip stream into the body of
            # a HEAD or 304 answer when compression is on, corrupting the next response on the
            # connection. A revalidation that finds a new build gets it uncompressed; first
            # loads, the common case, are gzipped.
            accepted = request.headers.get("Accept-Encoding", "").lower()
            plain_get = request.method == "GET" and not any(
                h in request.headers for h in _UNCOMPRESSED
            )
            if plain_get and "gzip" in accepted:
                response.enable_compression(ContentCoding.gzip)
        return response

    def _locate(self, relative: str) -> Path | None:
        """The regular file at `relative` inside the app directory, or None."""
        segments = relative.split("/")
        if not all(_SEGMENT.fullmatch(s) for s in segments):
            return None
        try:
            root = self._root.resolve(strict=True)
            path = (root / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a symlink loop
            return None
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path
