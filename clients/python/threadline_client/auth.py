"""Bearer-token handling for the SDK: token providers, expiry-aware caching, the auth interceptor.

The server authenticates every RPC from `authorization: Bearer <JWT>` metadata. The SDK asks an
application-supplied provider for a token, caches it, and asks again shortly before the token's
`exp`. The JWT payload is decoded *without* verifying it: the client only needs the expiry, and
verification is the server's job (so the SDK does not depend on PyJWT or key material).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from threadline_client.errors import make_error

__all__ = [
    "DEFAULT_REFRESH_MARGIN",
    "BearerAuthInterceptor",
    "StaticToken",
    "TokenCache",
    "TokenClaims",
    "TokenProvider",
    "bearer_metadata",
    "decode_jwt_claims",
    "refresh_margin",
]

TokenProvider = Callable[[], str | Awaitable[str]]
"""Returns a bearer token, synchronously or as an awaitable. Called again near expiry."""

DEFAULT_REFRESH_MARGIN = 20.0
"""Seconds before `exp` at which a token counts as stale.

20 s covers a slow provider round trip plus clock skew, yet keeps a 60 s test token usable for most
of its life; shorter-lived tokens use a third of their lifetime instead (see `refresh_margin`).
"""

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The time claims of a JWT, read without verifying its signature.

    Attributes:
        expires_at: The `exp` claim as a Unix time in seconds, or None if absent.
        issued_at: The `iat` claim as a Unix time in seconds, or None if absent.
    """

    expires_at: float | None
    issued_at: float | None


def _numeric_claim(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    # bool is an int subclass; a boolean `exp` is garbage, not the epoch.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    # Some issuers send numeric strings, and PyJWT on the server coerces them, so accept them too.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def decode_jwt_claims(token: str) -> TokenClaims | None:
    """Reads `exp` and `iat` from a JWT's payload without verifying anything.

    Args:
        token: A compact-serialised JWT (`header.payload.signature`).

    Returns:
        The time claims, or None when the token is not JWT-shaped (opaque tokens have no expiry
        the client can know).
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors.
        return None
    if not isinstance(payload, dict):
        return None
    return TokenClaims(
        expires_at=_numeric_claim(payload, "exp"),
        issued_at=_numeric_claim(payload, "iat"),
    )


def refresh_margin(
    expires_at: float,
    issued_at: float | None,
    *,
    default: float = DEFAULT_REFRESH_MARGIN,
) -> float:
    """How long before `expires_at` a token should be replaced.

    Args:
        expires_at: The token's expiry (Unix seconds).
        issued_at: When the token was issued or obtained (Unix seconds), if known.
        default: The margin for tokens that live long enough.

    Returns:
        `default`, or a third of the token's lifetime when that is shorter, so a token living
        only a few seconds is still used for two thirds of its life instead of being refreshed
        in a loop.
    """
    if issued_at is None:
        return default
    lifetime = max(0.0, expires_at - issued_at)
    return min(default, lifetime / 3)


class StaticToken:
    """A token provider that always returns the same token.

    Args:
        token: The bearer token. An empty string sends no `authorization` metadata at all.
    """

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self) -> str:
        """Returns the token."""
        return self._token

    def __repr__(self) -> str:
        # Never put the secret itself in reprs, which end up in logs and test output.
        return f"StaticToken(<{len(self._token)} chars>)"


class TokenCache:
    """Caches the provider's token and fetches a new one when the cached one nears expiry.

    Concurrent callers share one provider call: the lock means a burst of RPCs at expiry asks the
    provider once, not once per RPC.

    Args:
        provider: Where tokens come from.
        margin: Default refresh margin in seconds (see `refresh_margin`).
        clock: Unix-time source, replaceable in tests.
    """

    def __init__(
        self,
        provider: TokenProvider,
        *,
        margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._provider = provider
        self._margin = margin
        self._clock = clock
        self._token: str | None = None
        self._claims: TokenClaims | None = None
        self._obtained_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def token(self) -> str | None:
        """The cached token, without asking the provider (None before the first fetch)."""
        return self._token

    @property
    def expires_at(self) -> float | None:
        """The cached token's `exp` (Unix seconds), or None if unknown."""
        return self._claims.expires_at if self._claims else None

    @property
    def issued_at(self) -> float | None:
        """The cached token's `iat`, or the time it was fetched when it has none."""
        if self._token is None:
            return None
        if self._claims and self._claims.issued_at is not None:
            return self._claims.issued_at
        return self._obtained_at

    def refresh_at(self) -> float | None:
        """When the cached token becomes stale (Unix seconds), or None if it never does."""
        exp = self.expires_at
        if exp is None:
            return None
        return exp - refresh_margin(exp, self.issued_at, default=self._margin)

    def is_stale(self) -> bool:
        """True when there is no cached token or it is within the refresh margin of expiry."""
        if self._token is None:
            return True
        due = self.refresh_at()
        return due is not None and self._clock() >= due

    def _fresh_token(self) -> str | None:
        return None if self.is_stale() else self._token

    async def get(self, *, force: bool = False) -> str:
        """Returns a usable token, asking the provider if there is none or it is stale.

        Args:
            force: Ask the provider even if the cached token still looks fresh (for example
                after the server answered TOKEN_EXPIRED, or to refresh a stream's token).

        Returns:
            The token.

        Raises:
            Unauthenticated: The provider raised (the original exception is the `__cause__`).
        """
        if not force and (cached := self._fresh_token()) is not None:
            return cached
        async with self._lock:
            # Another caller may have refreshed while this one waited for the lock.
            if not force and (cached := self._fresh_token()) is not None:
                return cached
            try:
                result = self._provider()
                token = await result if inspect.isawaitable(result) else result
            except Exception as exc:
                # Still a ThreadlineError (callers catch one type), UNAUTHENTICATED because
                # there is no token to send: a session counts it as non-transient and goes
                # offline after a few instead of retrying a broken provider for ever.
                raise make_error(
                    grpc.StatusCode.UNAUTHENTICATED, f"token provider failed: {exc!r}"
                ) from exc
            if not isinstance(token, str):
                raise TypeError(f"token provider returned {type(token).__name__}, expected str")
            self._token = token
            self._claims = decode_jwt_claims(token)
            self._obtained_at = self._clock()
            return token

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """Returns the `authorization` metadata for one call (empty for an empty token)."""
        return bearer_metadata(await self.get())


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Builds `(("authorization", "Bearer <token>"),)`, or nothing for an empty token."""
    if not token:
        return ()
    return (("authorization", f"Bearer {token}"),)


def _has_authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    return metadata is not None and any(key == "authorization" for key, _ in metadata)


class BearerAuthInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` from a `TokenCache` to every call on a channel.

    An interceptor rather than per-call metadata so that the raw generated stubs on the same
    channel are authenticated too, and rather than `grpc.metadata_call_credentials` because call
    credentials need a secure channel and run the plugin on a thread, where an async provider
    cannot be awaited. A call that already carries `authorization` metadata keeps it, which lets
    tests send a specific (e.g. forged or expired) token through the SDK's channel.

    Args:
        tokens: The token cache to take tokens from.
    """

    def __init__(self, tokens: TokenCache) -> None:
        self._tokens = tokens

    async def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if _has_authorization(details.metadata):
            return details
        extra = await self._tokens.metadata()
        if not extra:
            return details
        metadata = grpc.aio.Metadata()
        for key, value in details.metadata or ():
            metadata.add(key, value)
        for key, value in extra:
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _TRequest],
            Awaitable[grpc.aio.UnaryUnaryCall[_TRequest, _TResponse]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _TRequest,
    ) -> grpc.aio.UnaryUnaryCall[_TRequest, _TResponse]:
        """Adds the token and continues the unary call."""
        return await continuation(await self._details(client_call_details), request)

    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _TRequest],
            Awaitable[grpc.aio.UnaryStreamCall[_TRequest, _TResponse]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _TRequest,
    ) -> grpc.aio.UnaryStreamCall[_TRequest, _TResponse]:
        """Adds the token and continues the server-streaming call."""
        return await continuation(await self._details(client_call_details), request)

    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_TRequest] | Iterable[_TRequest]],
            Awaitable[grpc.aio.StreamUnaryCall[_TRequest, _TResponse]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_TRequest] | Iterable[_TRequest],
    ) -> grpc.aio.StreamUnaryCall[_TRequest, _TResponse]:
        """Adds the token and continues the client-streaming call."""
        return await continuation(await self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_TRequest] | Iterable[_TRequest]],
            Awaitable[grpc.aio.StreamStreamCall[_TRequest, _TResponse]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_TRequest] | Iterable[_TRequest],
    ) -> grpc.aio.StreamStreamCall[_TRequest, _TResponse]:
        """Adds the token and continues the bidirectional call."""
        return await continuation(await self._details(client_call_details), request_iterator)
