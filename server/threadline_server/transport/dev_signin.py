"""Dev sign-in: `POST /auth/dev-token` mints an embedded-issuer token for any user id, so a new
user opens the web app and chats without an identity provider.

It signs anyone in as anyone, so it exists only where that is acceptable (`available`): embedded
auth mode, and with `web.dev_sign_in=auto` only when the server listens on a loopback address
(`on` lifts that, documented as unsafe; `off`, or clerk mode, never registers the route). A
browser on another site must not be able to use it either (CSRF, DNS rebinding): the request must
be `Content-Type: application/json` (which no HTML form can send and which forces a CORS
preflight that is never answered), and an `Origin`, when present, must be one of the allowed web
origins exactly; otherwise 403.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from threadline_server.config import Settings
from threadline_server.domain.validation import Violations, check_user_ids
from threadline_server.transport.http import WebContext

logger = logging.getLogger(__name__)

PATH = "/auth/dev-token"
MAX_BODY_BYTES = 4096
MAX_DISPLAY_NAME_CHARS = 128
_FIELDS = frozenset({"user_id", "display_name"})

# mint(user_id, ttl_s, now, claims) -> a signed token whose exp is int(now) + ttl_s.
Minter = Callable[[str, int, float, dict[str, Any]], str]


class NotReady(Exception):
    """Raised by a Minter while the server is still starting (answered 503)."""


def binds_loopback(host: str) -> bool:
    """True when `server.host` is localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_url(url: str) -> bool:
    host = urlsplit(url.strip()).hostname or ""
    return binds_loopback(host)


def available(settings: Settings) -> bool:
    """Whether this node offers dev sign-in at all (see the module docstring).

    `auto` needs more than a loopback bind: a server on 127.0.0.1 behind a reverse proxy on the
    same host is reachable from anywhere, so a public URL or a web origin that is not loopback
    (the signs of such a setup) turns it off too."""
    if settings.auth.mode != "embedded":
        return False
    mode = settings.web.dev_sign_in
    if mode == "off":
        return False
    if mode == "on":
        return True
    web_urls = [settings.web.public_url, *settings.web.allowed_origins]
    return binds_loopback(settings.server.host) and all(
        _loopback_url(u) for u in web_urls if u.strip()
    )


class DevSignIn:
    """The `POST /auth/dev-token` handler; mount with `add_routes(router)` only when
    `available(settings)`."""

    def __init__(self, settings: Settings, context: WebContext, mint: Minter) -> None:
        self._context = context
        self._mint = mint
        self._ttl_s = settings.auth.embedded_token_ttl_s
        self._subject = re.compile(settings.auth.subject_pattern)
        self._explicit = settings.web.dev_sign_in == "on"
        self._admins = frozenset(settings.auth.admin_users)
        if not binds_loopback(settings.server.host):
            logger.warning(
                "dev sign-in is on at %s: anyone who can reach the HTTP port can sign in as "
                "any user (web.dev_sign_in=on); turn it off outside development",
                settings.server.host,
            )

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if not self._explicit and not _direct_loopback(request):
            # auto: only a browser on this machine talking to us directly (no proxy between).
            return _error(403, "dev sign-in answers direct loopback requests only")
        origin = request.headers.get("Origin")
        if origin is not None and not self._context.allows(origin):
            return _error(403, "origin not allowed")
        if request.content_type != "application/json":
            return _error(403, "Content-Type must be application/json")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        raw = await request.read()  # a chunked body is bounded by the app's client_max_size
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body must be a JSON object")
        problem = self._check(body)
        if problem is not None:
            return _error(400, problem)
        user_id: str = body["user_id"]
        claims: dict[str, Any] = {}
        if body.get("display_name"):
            claims["name"] = body["display_name"]
        if origin is not None:
            claims["azp"] = origin  # as Clerk does: the origin the session was created from
        now = time.time()
        try:
            token = self._mint(user_id, self._ttl_s, now, claims)
        except NotReady:
            return _error(503, "the server is starting; retry")
        expires_at = datetime.fromtimestamp(int(now) + self._ttl_s, UTC)
        logger.info("dev sign-in as %s", user_id)
        return web.json_response(
            {"token": token, "expires_at": expires_at.isoformat().replace("+00:00", "Z")},
            headers={"Cache-Control": "no-store"},
        )

    def _check(self, body: object) -> str | None:
        """Why the body is refused, or None: the user id must pass the server's user id rule
        and the verifier's subject pattern (or the token would be refused on first use)."""
        if not isinstance(body, dict):
            return "body must be a JSON object"
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            return f"unknown fields: {', '.join(unknown)}"
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            return "user_id is required"
        violations = Violations()
        check_user_ids(violations, "user_id", [user_id], 1)
        if violations.items:
            return violations.items[0].description
        if not self._subject.fullmatch(user_id):
            return "user_id does not match auth.subject_pattern"
        if user_id in self._admins and not self._explicit:
            # Operators' powers need `threadline token` (the signing key), not a web form.
            return "admin users cannot use dev sign-in (web.dev_sign_in=auto)"
        name = body.get("display_name")
        if name is not None and (
            not isinstance(name, str)
            or len(name) > MAX_DISPLAY_NAME_CHARS
            or not name.isprintable()
        ):
            return f"display_name must be at most {MAX_DISPLAY_NAME_CHARS} printable characters"
        return None


_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP")


def _direct_loopback(request: web.Request) -> bool:
    """A request from a loopback peer, for a loopback Host, that no proxy forwarded."""
    if any(h in request.headers for h in _PROXY_HEADERS):
        return False
    peer = request.remote or ""
    host = urlsplit(f"//{request.host}").hostname or ""
    return binds_loopback(peer) and binds_loopback(host)


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": message}, status=status, headers={"Cache-Control": "no-store"}
    )
