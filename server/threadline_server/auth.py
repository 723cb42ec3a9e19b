"""Verifies bearer JWTs into Principals (the embedded issuer that mints them is issuer.py).

One code path verifies both Clerk session tokens and embedded tokens; the modes differ only in
configuration (issuer, key source, `azp` policy). The steps follow the reliability bar, section 2:
extract, header, key by kid, one `jwt.decode` call, then the claim checks PyJWT does not do.
Each refusal names its check (auth_errors.py) and is logged, at most once a minute per check.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from threadline_server import __version__
from threadline_server.auth_errors import (
    Cause,
    RefusalLog,
    pyjwt_cause,
    pyjwt_header_cause,
    token_expired,
    token_invalid,
    token_missing,
    token_not_yet_valid,
)
from threadline_server.config import AuthSettings
from threadline_server.domain.models import Principal
from threadline_server.errors import SessionPending, Unauthenticated, Unavailable

# The embedded issuer lives in issuer.py (so `threadline token` stays light); it is still
# importable from here, where app.py, the tests and the benchmarks take it.
from threadline_server.issuer import EmbeddedIssuer as EmbeddedIssuer
from threadline_server.issuer import check_key_size

logger = logging.getLogger(__name__)

PYJWT_MIN_VERSION = (2, 15)
MAX_AUTHORIZATION_BYTES = 8192
MAX_JWKS_BYTES = 1 << 20
# Clerk's session-token categories: "session" and "ignore". Any other `cat` (JWT templates, M2M)
# is signed by the same key but is not a session token, so it must not open a session here.
ALLOWED_CATEGORIES = frozenset({"cl_B7d4PD111AAA", "cl_I7d4PD111III"})
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "iss", "sub", "sid"]
# With nothing cached every request fails anyway, so retrying soon only shortens the outage; the
# floor still stops a request flood from becoming a fetch flood against the issuer.
NO_KEYS_RETRY_S = 1.0

_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+)")
_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")


def check_pyjwt_version(version: str | None = None) -> None:
    """Raises RuntimeError unless PyJWT (or `version`) is at least 2.15 (bar section 2.2)."""
    found = jwt.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", found)
    if match is None or (int(match[1]), int(match[2])) < PYJWT_MIN_VERSION:
        floor = ".".join(map(str, PYJWT_MIN_VERSION))
        raise RuntimeError(f"PyJWT >= {floor} is required, found {found!r}")


def _jwks_unavailable(retry_after: float) -> Unavailable:
    return Unavailable("JWKS_UNAVAILABLE", "signing keys unavailable", retry_after=retry_after)


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts plain HTTP may be used with."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uint_from_b64url(text: object) -> int:
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text):
        raise ValueError("not base64url")
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def parse_jwk(jwk: Mapping[str, Any]) -> tuple[str, rsa.RSAPublicKey]:
    """(kid, key) for a JWK usable to verify RS256; ValueError for anything else."""
    kid = jwk.get("kid")
    # No format check: a token's kid is checked before lookup, so an odd kid here never matches.
    if not isinstance(kid, str):
        raise ValueError("kid")
    if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
        raise ValueError("kty/use")
    if jwk.get("alg", "RS256") != "RS256":
        raise ValueError("alg")
    n, e = _uint_from_b64url(jwk.get("n")), _uint_from_b64url(jwk.get("e"))
    check_key_size(n.bit_length())
    # Only the public members are read: a JWKS that leaks `d` still yields just a public key.
    return kid, rsa.RSAPublicNumbers(e, n).public_key()


def load_public_key_pem(pem: str) -> rsa.RSAPublicKey:
    """An RSA public key of at least 2048 bits from PEM; literal `\\n` (env vars) are accepted."""
    data = pem.replace("\\n", "\n").strip().encode("ascii")
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("public_key_pem is not an RSA public key")
    check_key_size(key.key_size)
    return key


def _validate_jwks_url(url: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and host and is_loopback_host(host):
        return
    raise ValueError("JWKS URL must be https (plain http only on a loopback host)")


class _KeySource(Protocol):
    @property
    def ready(self) -> bool: ...
    async def start(self) -> None: ...
    async def key_for(self, kid: str) -> rsa.RSAPublicKey: ...
    async def close(self) -> None: ...


class _StaticKey:
    """The configured PEM key: networkless, and it verifies whatever kid the token names."""

    def __init__(self, key: rsa.RSAPublicKey) -> None:
        self._key = key

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def key_for(self, kid: str) -> rsa.RSAPublicKey:
        return self._key

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: Mapping[str, rsa.RSAPublicKey]
    fetched_at: float  # on the cache clock


class JwksCache:
    """An async JWKS fetcher and cache with PyJWKClient's semantics plus stale-on-error.

    - a set is fresh for `ttl_s`; a known kid in a fresh set needs no network;
    - an unknown kid in a fresh set forces a refetch only if no fetch started in `cooldown_s`;
    - when a refresh fails the last good set keeps serving until it is `max_stale_s` old, and
      the next attempt waits `cooldown_s` (`NO_KEYS_RETRY_S` when nothing usable is cached);
    - concurrent callers share one in-flight fetch; redirects are never followed.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        cooldown_s: float,
        max_stale_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _validate_jwks_url(url)
        self._url = url
        self._ttl_s = ttl_s
        self._cooldown_s = cooldown_s
        self._max_stale_s = max_stale_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._good: _KeySet | None = None
        self._last_attempt: float | None = None
        self._last_failed = False
        self._inflight: asyncio.Task[_KeySet | None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def ready(self) -> bool:
        """A key set young enough to serve from is cached."""
        return self._usable(self._clock())

    async def start(self) -> None:
        await self._refresh()

    async def close(self) -> None:
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key_for(self, kid: str) -> rsa.RSAPublicKey:
        """The key named `kid`: Unauthenticated if the issuer has none, Unavailable if unknown."""
        now = self._clock()
        good = self._good
        fresh = good is not None and now - good.fetched_at < self._ttl_s
        if good is not None and fresh:
            key = good.keys.get(kid)
            if key is not None:
                return key  # even while a fetch runs: a known kid in a fresh set waits for nothing
        if self._inflight is None:
            if fresh:
                # An unknown kid may be a rotation: refetch, but at most once per cooldown, so a
                # stream of made-up kids cannot turn into a stream of fetches.
                if not self._elapsed(now, self._cooldown_s):
                    if self._last_failed:
                        raise _jwks_unavailable(self._retry_after(now, self._cooldown_s))
                    raise token_invalid(Cause.UNKNOWN_KEY)
            elif self._last_failed and not self._elapsed(now, self._failure_wait(now)):
                return self._from_stale(kid, now)
        fetched = await self._refresh()
        if fetched is None:
            return self._from_stale(kid, self._clock())
        key = fetched.keys.get(kid)
        if key is None:
            raise token_invalid(Cause.UNKNOWN_KEY)
        return key

    def _usable(self, now: float) -> bool:
        return self._good is not None and now - self._good.fetched_at < self._max_stale_s

    def _elapsed(self, now: float, interval: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= interval

    def _failure_wait(self, now: float) -> float:
        return self._cooldown_s if self._usable(now) else min(self._cooldown_s, NO_KEYS_RETRY_S)

    def _retry_after(self, now: float, interval: float) -> float:
        since = 0.0 if self._last_attempt is None else now - self._last_attempt
        return max(1.0, interval - since)

    def _from_stale(self, kid: str, now: float) -> rsa.RSAPublicKey:
        if self._good is not None and self._usable(now):
            key = self._good.keys.get(kid)
            if key is not None:
                return key
        raise _jwks_unavailable(self._retry_after(now, self._failure_wait(now)))

    async def _refresh(self) -> _KeySet | None:
        """The newly fetched set, or None if the fetch failed (shares a fetch already running)."""
        if self._closed:
            return None
        task = self._inflight
        if task is None:
            self._last_attempt = self._clock()
            task = asyncio.create_task(self._fetch_and_store())
            self._inflight = task
            task.add_done_callback(self._forget)
        # Shielded: one caller giving up (deadline, disconnect) must not cancel everyone's fetch.
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[_KeySet | None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch_and_store(self) -> _KeySet | None:
        try:
            keys = await self._fetch()
        # Anything escaping here would reach every waiting verification as an unexpected error;
        # the contract for an unreachable or broken JWKS is UNAVAILABLE, so all of it is caught.
        except Exception as exc:
            self._last_failed = True
            now = self._clock()
            if self._good is not None and self._usable(now):
                logger.warning(
                    "JWKS refresh failed (%s); serving the last good key set (%.0f s old)",
                    type(exc).__name__,
                    now - self._good.fetched_at,
                )
            else:
                logger.warning("JWKS fetch failed (%s); no usable key set", type(exc).__name__)
            return None
        self._good = _KeySet(keys, self._clock())
        self._last_failed = False
        return self._good

    async def _fetch(self) -> dict[str, rsa.RSAPublicKey]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers={"User-Agent": f"threadline/{__version__}", "Accept": "application/json"},
            )
        async with self._session.get(self._url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"JWKS endpoint answered HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
        return _parse_jwks(json.loads(body))


def _parse_jwks(document: object) -> dict[str, rsa.RSAPublicKey]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS document has no keys list")
    keys: dict[str, rsa.RSAPublicKey] = {}
    ambiguous: set[str] = set()
    for entry in document["keys"]:
        # Keys this server cannot use (EC, encryption, small RSA) are skipped, not fatal: the
        # issuer may publish other keys next to the RS256 signing keys.
        if not isinstance(entry, dict):
            continue
        try:
            kid, key = parse_jwk(entry)
        except ValueError:
            continue
        if kid in keys:
            ambiguous.add(kid)
        keys[kid] = key
    # Two keys under one kid: neither can be trusted to be the one that signed.
    for kid in ambiguous:
        del keys[kid]
    if not keys:
        raise ValueError("JWKS document has no usable RS256 signing key")
    return keys


def _is_number(value: object) -> bool:
    # PyJWT runs int() on exp/nbf/iat, so "9999999999" and true slip through it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _optional_str(claims: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


class TokenVerifier:
    """Verifies a bearer token into a Principal: bar section 2, steps 1 to 9, in order."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        issuer: str,
        jwks_url: str,
        http_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`jwks_url` empty means `{issuer}/.well-known/jwks.json`; `clock` drives the JWKS cache
        and the once-a-minute refusal log.

        Raises ValueError for a configuration that cannot verify safely.
        """
        check_pyjwt_version()
        if not issuer:
            raise ValueError("auth issuer must be set")
        if (
            settings.mode == "clerk"
            and not settings.authorized_parties
            and not settings.allow_any_azp
        ):
            raise ValueError(
                "clerk mode needs auth.authorized_parties (or auth.allow_any_azp = true)"
            )
        try:
            self._subject_re = re.compile(settings.subject_pattern)
        except re.error as exc:
            raise ValueError(f"auth.subject_pattern is not a valid regex: {exc}") from None
        if settings.leeway_s < 0:
            raise ValueError("auth.leeway_s must not be negative")
        self._settings = settings
        self._issuer = issuer
        self._parties = frozenset(settings.authorized_parties)
        self._refusals = RefusalLog(logger, clock=clock)
        self._keys: _KeySource
        if settings.public_key_pem:
            self._keys = _StaticKey(load_public_key_pem(settings.public_key_pem))
        else:
            url = jwks_url or f"{issuer.rstrip('/')}/.well-known/jwks.json"
            self._keys = JwksCache(
                url,
                ttl_s=settings.jwks_cache_ttl_s,
                cooldown_s=settings.jwks_refetch_cooldown_s,
                max_stale_s=settings.jwks_max_stale_s,
                timeout_s=http_timeout_s,
                clock=clock,
            )

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def ready(self) -> bool:
        """Keys are at hand (PEM configured, or a JWKS set young enough to serve from)."""
        return self._keys.ready

    async def start(self) -> None:
        """Prefetches the JWKS; a failure is logged, and verification retries it later."""
        await self._keys.start()

    async def close(self) -> None:
        await self._keys.close()

    async def verify_authorization(self, values: Sequence[str]) -> Principal:
        """Verifies the call's `authorization` metadata values: exactly one `Bearer <jwt>`."""
        try:
            return await self._verify_token(self._extract(values))
        except Unauthenticated as exc:
            self._refusals.record(exc)
            raise

    async def verify_token(self, token: str) -> Principal:
        """Verifies a bare JWT (the RefreshAuth frame's token) with the same rules."""
        try:
            return await self._verify_token(token)
        except Unauthenticated as exc:
            self._refusals.record(exc)
            raise

    def _extract(self, values: Sequence[str]) -> str:
        if not values:
            raise token_missing()
        if len(values) != 1:
            raise token_invalid(Cause.MULTIPLE)
        # Typed as str, but checked: a bytes value from a misbehaving caller must stay a 401.
        value: object = values[0]
        if not isinstance(value, str):
            raise token_invalid(Cause.MALFORMED)
        if not value.strip(" \t"):
            raise token_missing()
        if len(value) > MAX_AUTHORIZATION_BYTES:
            raise token_invalid(Cause.TOO_LARGE)
        match = _BEARER_RE.fullmatch(value.strip(" \t"))
        if match is None:
            raise token_invalid(Cause.SCHEME)
        return match[1]

    async def _verify_token(self, token: str) -> Principal:
        if not token:
            raise token_missing()
        if len(token) > MAX_AUTHORIZATION_BYTES:
            raise token_invalid(Cause.TOO_LARGE)
        if not _JWT_RE.fullmatch(token):
            raise token_invalid(Cause.MALFORMED)
        kid = self._checked_kid(token)
        key = await self._keys.key_for(kid)
        claims = self._decode(token, key)
        return self._principal(claims)

    def _checked_kid(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise token_invalid(pyjwt_header_cause(exc)) from None
        except (ValueError, TypeError):
            raise token_invalid(Cause.MALFORMED) from None
        # jku, x5u, jwk and x5c are never read: keys only ever come from configuration.
        if header.get("alg") != "RS256":
            raise token_invalid(Cause.ALGORITHM)
        if header.get("typ", "JWT") != "JWT":
            raise token_invalid(Cause.TYPE)
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
            raise token_invalid(Cause.KID)
        if "crit" in header:
            raise token_invalid(Cause.CRIT)
        if "cat" in header and header["cat"] not in ALLOWED_CATEGORIES:
            raise token_invalid(Cause.CATEGORY)
        return kid

    def _decode(self, token: str, key: rsa.RSAPublicKey) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                issuer=self._issuer,
                leeway=self._settings.leeway_s,
                audience=self._settings.audience or None,
                options={"require": REQUIRED_CLAIMS, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise token_expired() from None
        except jwt.ImmatureSignatureError:
            raise token_not_yet_valid() from None
        except jwt.PyJWTError as exc:
            raise token_invalid(pyjwt_cause(exc)) from None
        # Not only PyJWTError: a signed claim like `exp: [1]` or `exp: Infinity` makes PyJWT's
        # int() raise TypeError or OverflowError, and that must still be a plain TOKEN_INVALID.
        except Exception:
            raise token_invalid(Cause.CLAIM_TYPE) from None

    def _principal(self, claims: dict[str, Any]) -> Principal:
        """Steps 5 to 9 on decoded claims, then the Principal they describe."""
        self._check_types(claims)
        self._check_azp(claims.get("azp"))
        self._check_session(claims)
        version = claims.get("v")
        if version is not None and (isinstance(version, bool) or version != 2):
            raise token_invalid(Cause.VERSION)
        return Principal(
            user_id=claims["sub"],
            issuer=claims["iss"],
            session_id=claims["sid"],
            expires_at=float(claims["exp"]),
            display_name=_optional_str(claims, "name", "username"),
            email=_optional_str(claims, "email"),
            image_url=_optional_str(claims, "image_url", "picture"),
            actor=self._actor(claims),
        )

    def _check_types(self, claims: Mapping[str, Any]) -> None:
        if not all(_is_number(claims[name]) for name in ("exp", "nbf", "iat")):
            raise token_invalid(Cause.CLAIM_TYPE)
        if not isinstance(claims["iss"], str):
            raise token_invalid(Cause.CLAIM_TYPE)
        sub = claims["sub"]
        # fullmatch, not match: a pattern ending in `$` would still accept a trailing newline.
        if not isinstance(sub, str) or not sub or not self._subject_re.fullmatch(sub):
            raise token_invalid(Cause.SUBJECT)

    def _check_azp(self, azp: object) -> None:
        if azp is not None and not isinstance(azp, str):
            raise token_invalid(Cause.AZP)
        if not self._parties:
            return
        if azp is None:
            if not self._settings.allow_missing_azp:
                raise token_invalid(Cause.AZP_MISSING)
        elif azp not in self._parties:
            raise token_invalid(Cause.AZP)

    def _check_session(self, claims: Mapping[str, Any]) -> None:
        # A JWT-template token carries no sid: only session tokens may open a session here.
        sid = claims["sid"]
        if not isinstance(sid, str) or not sid:
            raise token_invalid(Cause.SESSION)
        if claims.get("sts") == "pending" and self._settings.reject_pending_sessions:
            raise SessionPending("session pending")

    def _actor(self, claims: Mapping[str, Any]) -> str:
        if "act" not in claims:
            return ""
        act = claims["act"]
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise token_invalid(Cause.ACTOR)
        if not self._settings.allow_impersonation:
            raise token_invalid(Cause.IMPERSONATION)
        actor: str = act["sub"]
        logger.info(
            "impersonated session accepted", extra={"user_id": claims["sub"], "actor": actor}
        )
        return actor
