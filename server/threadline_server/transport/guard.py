"""Authentication and error mapping around every servicer method (one class decorator)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from cachetools import TTLCache
from grpc_status import rpc_status

from threadline_server.domain.batching import Coalescer
from threadline_server.domain.models import Principal, UserClaims
from threadline_server.errors import DomainError, Unauthenticated
from threadline_server.observability import Metrics, bind_log_context
from threadline_server.transport.compression import DEFAULT_THRESHOLD, send_plain_if_small
from threadline_server.transport.status import internal_status, to_status

logger = logging.getLogger(__name__)

# How long a handler whose write failed waits for grpc to cancel it (it does so as soon as its
# event loop has seen the hang-up, in practice at once). Only bounds an unexpected case.
_HANG_UP_WAIT_S = 5.0


class ProfileStore(Protocol):
    async def stale_profiles(self, profiles: Sequence[UserClaims]) -> set[UserClaims]: ...
    async def upsert_users(self, profiles: Sequence[UserClaims]) -> dict[UserClaims, Exception]: ...


class TokenVerifier(Protocol):
    async def verify_authorization(self, values: list[str]) -> Principal: ...
    async def verify_token(self, token: str) -> Principal: ...


class Authenticator:
    """Bearer metadata to a Principal; stores the user's profile from its claims once per cache
    period. Callers arriving together share one read of their profiles (a reconnect storm after
    a restart, when the cache is empty); only new or changed ones then wait for a write, which
    the callers arriving together share too."""

    def __init__(
        self,
        verifier: TokenVerifier,
        profiles: ProfileStore,
        cache_size: int,
        cache_ttl_s: float,
        on_lookup: Callable[[str, bool], None] = lambda _name, _hit: None,
    ) -> None:
        self.verifier = verifier
        self._profiles = profiles
        self._check: Coalescer[UserClaims, bool] = Coalescer(self._stale, missing=lambda _: True)
        self._write: Coalescer[UserClaims, None] = Coalescer(
            profiles.upsert_users, missing=lambda _: None
        )
        self._on_lookup = on_lookup
        # The users cache: claims already written. Keyed by every claim stored, so a changed name
        # or avatar misses and is written; nothing else writes a user's profile.
        self._seen: TTLCache[UserClaims, bool] | None = (
            TTLCache(cache_size, cache_ttl_s) if cache_size > 0 and cache_ttl_s > 0 else None
        )

    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        values = [
            v if isinstance(v, str) else v.decode("latin-1")
            for k, v in (context.invocation_metadata() or ())
            if k == "authorization"
        ]
        principal = await self.verifier.verify_authorization(values)
        bind_log_context(user=principal.user_id)  # every later log line of the call names them
        await self.remember(principal)
        return principal

    async def verify_refresh(self, current: Principal, token: str) -> Principal:
        principal = await self.verifier.verify_token(token)
        if (principal.issuer, principal.user_id) != (current.issuer, current.user_id):
            raise Unauthenticated("TOKEN_INVALID", "refresh token is for another user")
        await self.remember(principal)
        return principal

    async def remember(self, principal: Principal) -> None:
        key = UserClaims.of(principal)
        seen = self._seen is not None and key in self._seen
        self._on_lookup("users", seen)
        if not seen:
            if await self._check(key):
                await self._write(key)
            if self._seen is not None:
                self._seen[key] = True

    async def close(self) -> None:
        await self._check.close()
        await self._write.close()

    async def _stale(self, profiles: Sequence[UserClaims]) -> dict[UserClaims, bool | Exception]:
        stale = await self._profiles.stale_profiles(profiles)
        return {p: p in stale for p in profiles}


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def bind_request(context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> None:
    """Names the call in every log line it causes: the caller's `x-request-id` if it sent a
    sane one (so logs join up across services), else a new id."""
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            request_id = value
    bind_log_context(request_id=request_id or uuid.uuid4().hex[:16], rpc=rpc)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: BaseException,
    metrics: Metrics | None = None,
) -> None:
    """Ends the call with the status for `exc`: raises grpc's AbortError, except when the
    client has already gone (then it returns, and grpc ends the call quietly)."""
    if isinstance(exc, DomainError):
        status = to_status(exc)
    else:
        status, _ = internal_status(exc)
    if metrics is not None:
        metrics.errors.labels(_CODE_NAMES.get(status.code, "UNKNOWN")).inc()
    try:
        await context.abort_with_status(rpc_status.to_status(status))
    except grpc.aio.InternalError:
        await hung_up(context)


async def hung_up(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Call where a write or the status failed in grpc (ExecuteBatchError): the call is gone
    because the client hung up (cancelled, deadline, connection lost). That is normal: it is
    logged at debug, and the handler then returns (or is cancelled by grpc) without a trace.

    grpc logs an ExecuteBatchError that leaves a handler as an error with a traceback, unless
    its own watcher has already seen the hang-up (it usually has, but not always: both are
    completions from Core, in either order). So: if the status was sent (a failed abort), grpc
    needs nothing more and returning is quiet (it re-raises its own AbortError, which it
    expects). If not, grpc would try to send one over the dead call on return; instead this
    waits until grpc's watcher, having seen the hang-up, cancels the handler."""
    logger.debug("client hung up")
    if not context.done():
        await asyncio.sleep(_HANG_UP_WAIT_S)


T = TypeVar("T")


def guarded(cls: type[T]) -> type[T]:
    """Wraps every RPC method (CamelCase) so that a principal is resolved first and any error
    becomes a proper status: domain errors by the map, anything else a logged INTERNAL whose
    text never reaches the client."""
    for name, fn in list(vars(cls).items()):
        if not name[:1].isupper() or not callable(fn):
            continue
        if inspect.isasyncgenfunction(fn):
            setattr(cls, name, _wrap_stream(fn))
        else:
            setattr(cls, name, _wrap_unary(fn))
    return cls


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        bind_request(context, fn.__name__)
        try:
            principal = await self.auth.authenticate(context)
            response = await fn(self, request, context, principal)
            threshold = getattr(self, "compression_threshold", DEFAULT_THRESHOLD)
            send_plain_if_small(context, response.ByteSize(), threshold)
            return response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary: everything becomes a status
            await abort(context, exc, getattr(self, "metrics", None))
            return None  # only if the client hung up: grpc then ends the call quietly

    return wrapper


def _wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        bind_request(context, fn.__name__)
        try:
            principal = await self.auth.authenticate(context)
            threshold = getattr(self, "compression_threshold", DEFAULT_THRESHOLD)
            async for item in fn(self, request, context, principal):
                send_plain_if_small(context, item.ByteSize(), threshold)
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary: everything becomes a status
            await abort(context, exc, getattr(self, "metrics", None))

    return wrapper
