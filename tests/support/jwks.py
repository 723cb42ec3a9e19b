"""Test issuer: RS256 keys, a loopback JWKS server whose key set can be swapped, token minting.

Tokens are assembled and signed by hand (not with `jwt.encode`) so tests can produce exactly
the malformed headers and claims a hostile client would send: integer kids, string `exp`,
`alg: none`, HS256 keyed with the public PEM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JWKS_PATH = "/.well-known/jwks.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key and the kid its JWK is published under."""

    private_key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def generate(cls, kid: str, bits: int = 2048) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits), kid)

    def jwk(self, **overrides: Any) -> dict[str, Any]:
        """The public JWK; `overrides` replace or add members (a value of None removes one)."""
        numbers = self.private_key.public_key().public_numbers()
        jwk: dict[str, Any] = {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }
        jwk.update(overrides)
        return {k: v for k, v in jwk.items() if v is not None}

    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )


def encode_token(
    header: Mapping[str, Any],
    claims: Mapping[str, Any],
    *,
    key: SigningKey | None = None,
    hmac_secret: bytes | None = None,
    signature: bytes = b"sig",
) -> str:
    """header.claims.signature: RS256 with `key`, HS256 with `hmac_secret`, else `signature`."""
    head = b64url(json.dumps(dict(header), separators=(",", ":")).encode())
    body = b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode("ascii")
    if key is not None:
        signature = key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif hmac_secret is not None:
        signature = hmac.new(hmac_secret, signing_input, hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def mint(
    key: SigningKey,
    *,
    issuer: str,
    header: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    now: float | None = None,
    **claims: Any,
) -> str:
    """A valid RS256 session token unless told otherwise.

    `claims` override the defaults (iss, sub, sid, iat, nbf, exp = now + 300), `drop` removes
    claims, and `header` replaces or adds header members (a value of None removes one).
    """
    issued = int(time.time() if now is None else now)
    body: dict[str, Any] = {
        "iss": issuer,
        "sub": "user_alice",
        "sid": "sess_test",
        "iat": issued,
        "nbf": issued,
        "exp": issued + 300,
    }
    body.update(claims)
    for name in drop:
        body.pop(name, None)
    head: dict[str, Any] = {"alg": "RS256", "typ": "JWT", "kid": key.kid}
    head.update(header or {})
    head = {k: v for k, v in head.items() if v is not None}
    return encode_token(head, body, key=key)


@dataclass
class JwksServer:
    """A loopback HTTP JWKS endpoint on a free port; use as `async with JwksServer(...) as s`.

    `keys` are the published signing keys (reassign to rotate), `extra_jwks` raw JWK dicts
    published after them. `status` is the answer's status (the body is always the key set),
    `redirect_to` answers 302, `delay_s` holds each answer back (until `release()`), and
    `fetches` counts requests.
    """

    keys: list[SigningKey]
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    redirect_to: str | None = None
    delay_s: float = 0.0
    fetches: int = 0
    port: int = field(default=0, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)
    _release: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _fetched: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.issuer + JWKS_PATH

    def document(self) -> dict[str, Any]:
        return {"keys": [k.jwk() for k in self.keys] + list(self.extra_jwks)}

    def mint(self, *, key: SigningKey | None = None, **kwargs: Any) -> str:
        """A token from this issuer (unless `issuer=` says otherwise), signed with `key` or the
        first published key; other arguments as for `mint`."""
        kwargs.setdefault("issuer", self.issuer)
        return mint(key or self.keys[0], **kwargs)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        self._fetched.set()
        self._fetched = asyncio.Event()
        if self.delay_s and not self._release.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.delay_s)
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        # The key set goes out whatever the status, so only the status can tell a client it failed.
        return web.json_response(self.document(), status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._handle)
        app.router.add_get("/elsewhere.json", self._handle_elsewhere)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _handle_elsewhere(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.document())

    async def wait_fetches(self, count: int) -> None:
        """Returns once `count` requests have arrived (held ones included)."""
        while self.fetches < count:
            await self._fetched.wait()

    def release(self) -> None:
        """Answers every request held by `delay_s` now, and holds no more."""
        self._release.set()

    async def close(self) -> None:
        """Stops listening; the port then refuses connections, like an issuer that is down."""
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> JwksServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
