"""SDK error mapping, token-expiry parsing, retry set and backoff: pure checks, no server."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import threadline_client as tc
from threadline.v1 import realtime_pb2, thread_service_pb2
from threadline_client import errors
from threadline_client.auth import (
    StaticToken,
    TokenCache,
    bearer_metadata,
    decode_jwt_claims,
    refresh_margin,
)
from threadline_client.backoff import Backoff
from threadline_client.channel import RETRY_POLICY, RETRYABLE_METHODS, service_config
from threadline_client.stream import result_error

# -- helpers ------------------------------------------------------------------------------------


def _status(code: int, message: str, *details: Any) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def _info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="threadline.dev", metadata=metadata)


def _retry(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(payload: dict[str, Any]) -> str:
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
    body = _b64url(json.dumps(payload).encode())
    return f"{header}.{body}.{_b64url(b'not-a-real-signature')}"


# -- from_status_proto: typed classes and details ------------------------------------------------


def test_invalid_argument_carries_field_violations_and_reason() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="thread.title", description="empty"),
            error_details_pb2.BadRequest.FieldViolation(field="thread.tags[3]", description="NUL"),
        ]
    )
    error = errors.from_status_proto(
        _status(code_pb2.INVALID_ARGUMENT, "invalid argument", bad, _info("FIELD_INVALID"))
    )
    assert type(error) is tc.InvalidArgument
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "invalid argument"
    assert error.reason == "FIELD_INVALID"
    assert error.domain == "threadline.dev"
    assert error.field_violations == [("thread.title", "empty"), ("thread.tags[3]", "NUL")]
    assert not error.retryable


def test_invalid_argument_without_bad_request_has_no_violations() -> None:
    error = errors.from_status_proto(
        _status(code_pb2.INVALID_ARGUMENT, "bad frame", _info("PROTOCOL_VIOLATION"))
    )
    assert isinstance(error, tc.InvalidArgument)
    assert error.field_violations == []
    assert error.reason == "PROTOCOL_VIOLATION"


def test_resource_exhausted_with_retry_info_is_retryable_after_delay() -> None:
    error = errors.from_status_proto(
        _status(code_pb2.RESOURCE_EXHAUSTED, "slow down", _retry(1.5), _info("RATE_LIMITED"))
    )
    assert type(error) is tc.ResourceExhausted
    assert error.retry_after == pytest.approx(1.5)
    assert error.reason == "RATE_LIMITED"
    assert errors.is_retryable(error)


def test_resource_exhausted_without_retry_info_is_terminal() -> None:
    error = errors.from_status_proto(_status(code_pb2.RESOURCE_EXHAUSTED, "frame too large"))
    assert isinstance(error, tc.ResourceExhausted)
    assert error.retry_after is None
    assert error.reason is None
    assert not error.retryable


def test_unavailable_carries_retry_after_and_is_retryable() -> None:
    error = errors.from_status_proto(
        _status(code_pb2.UNAVAILABLE, "draining", _info("SERVER_DRAINING"), _retry(0.25))
    )
    assert type(error) is tc.Unavailable
    assert error.retry_after == pytest.approx(0.25)
    assert error.reason == "SERVER_DRAINING"
    assert error.retryable


def test_aborted_reads_current_version_from_error_info() -> None:
    error = errors.from_status_proto(
        _status(code_pb2.ABORTED, "stale", _info("VERSION_MISMATCH", current_version="42"))
    )
    assert type(error) is tc.Aborted
    assert error.current_version == 42
    assert error.metadata == {"current_version": "42"}
    assert not error.retryable


@pytest.mark.parametrize("metadata", [{}, {"current_version": "forty-two"}])
def test_aborted_without_usable_current_version(metadata: dict[str, str]) -> None:
    error = errors.from_status_proto(
        _status(code_pb2.ABORTED, "stale", _info("VERSION_MISMATCH", **metadata))
    )
    assert isinstance(error, tc.Aborted)
    assert error.current_version is None


def test_unauthenticated_reason_and_str() -> None:
    error = errors.from_status_proto(
        _status(code_pb2.UNAUTHENTICATED, "token expired", _info("TOKEN_EXPIRED"))
    )
    assert type(error) is tc.Unauthenticated
    assert error.reason == "TOKEN_EXPIRED"
    assert str(error) == "UNAUTHENTICATED: token expired [TOKEN_EXPIRED]"


def test_internal_keeps_ref_metadata_and_other_details() -> None:
    resource = error_details_pb2.ResourceInfo(resource_type="thread", resource_name="threads/t1")
    error = errors.from_status_proto(
        _status(
            code_pb2.INTERNAL, "internal error (ref=abc)", _info("INTERNAL", ref="abc"), resource
        )
    )
    assert type(error) is tc.Internal
    assert error.metadata["ref"] == "abc"
    found = error.detail(error_details_pb2.ResourceInfo)
    assert found is not None
    assert found.resource_name == "threads/t1"
    assert error.detail(error_details_pb2.BadRequest) is None


def test_unknown_detail_type_is_kept_packed() -> None:
    error = errors.from_status_proto(
        _status(code_pb2.NOT_FOUND, "gone", wrappers_pb2.StringValue(value="x"))
    )
    assert isinstance(error, tc.NotFound)
    assert len(error.details) == 1
    assert isinstance(error.details[0], any_pb2.Any)
    assert error.reason is None


_EXPECTED_CLASSES = [
    (code_pb2.CANCELLED, tc.Cancelled),
    (code_pb2.UNKNOWN, tc.Unknown),
    (code_pb2.INVALID_ARGUMENT, tc.InvalidArgument),
    (code_pb2.DEADLINE_EXCEEDED, tc.DeadlineExceeded),
    (code_pb2.NOT_FOUND, tc.NotFound),
    (code_pb2.ALREADY_EXISTS, tc.AlreadyExists),
    (code_pb2.PERMISSION_DENIED, tc.PermissionDenied),
    (code_pb2.RESOURCE_EXHAUSTED, tc.ResourceExhausted),
    (code_pb2.FAILED_PRECONDITION, tc.FailedPrecondition),
    (code_pb2.ABORTED, tc.Aborted),
    (code_pb2.OUT_OF_RANGE, tc.OutOfRange),
    (code_pb2.UNIMPLEMENTED, tc.Unimplemented),
    (code_pb2.INTERNAL, tc.Internal),
    (code_pb2.UNAVAILABLE, tc.Unavailable),
    (code_pb2.DATA_LOSS, tc.DataLoss),
    (code_pb2.UNAUTHENTICATED, tc.Unauthenticated),
    (99, tc.Unknown),
]


@pytest.mark.parametrize(("code", "cls"), _EXPECTED_CLASSES)
def test_every_code_maps_to_its_class(code: int, cls: type[tc.ThreadlineError]) -> None:
    error = errors.from_status_proto(_status(code, "m"))
    assert type(error) is cls
    assert isinstance(error, tc.ThreadlineError)
    assert error.code is cls.grpc_code


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (code_pb2.UNAVAILABLE, True),
        (code_pb2.DEADLINE_EXCEEDED, True),
        (code_pb2.RESOURCE_EXHAUSTED, False),  # no RetryInfo
        (code_pb2.ABORTED, False),
        (code_pb2.INTERNAL, False),
        (code_pb2.UNAUTHENTICATED, False),
        (code_pb2.FAILED_PRECONDITION, False),
    ],
)
def test_retryable_set(code: int, retryable: bool) -> None:
    assert errors.is_retryable(errors.from_status_proto(_status(code, "m"))) is retryable


def test_non_threadline_exceptions_are_not_retryable() -> None:
    assert not errors.is_retryable(TimeoutError())


# -- from_rpc_error: the trailer path -------------------------------------------------------------


def _rpc_error(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None, raw: bytes = b""
) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata()
    if status is not None:
        trailers.add(errors.DETAILS_METADATA_KEY, status.SerializeToString())
    if raw:
        trailers.add(errors.DETAILS_METADATA_KEY, raw)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, message, None)


def test_from_rpc_error_decodes_status_details_trailer() -> None:
    status = _status(code_pb2.NOT_FOUND, "thread 't1' not found", _info("RESOURCE_NOT_FOUND"))
    error = errors.from_rpc_error(
        _rpc_error(grpc.StatusCode.NOT_FOUND, "thread 't1' not found", status)
    )
    assert type(error) is tc.NotFound
    assert error.reason == "RESOURCE_NOT_FOUND"
    assert error.message == "thread 't1' not found"


def test_from_rpc_error_without_trailer_uses_the_call_status() -> None:
    error = errors.from_rpc_error(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline"))
    assert type(error) is tc.DeadlineExceeded
    assert error.details == ()
    assert error.retryable


def test_from_rpc_error_call_code_wins_over_a_disagreeing_trailer() -> None:
    status = _status(code_pb2.NOT_FOUND, "other", _info("RESOURCE_NOT_FOUND"))
    error = errors.from_rpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, "proxy down", status))
    assert type(error) is tc.Unavailable
    assert error.message == "proxy down"
    assert error.reason == "RESOURCE_NOT_FOUND"


def test_from_rpc_error_ignores_an_undecodable_trailer() -> None:
    error = errors.from_rpc_error(
        _rpc_error(grpc.StatusCode.INTERNAL, "boom", raw=b"\xff\xff\xff not a proto")
    )
    assert type(error) is tc.Internal
    assert error.details == ()


# -- operation results on the stream --------------------------------------------------------------


def test_result_error_maps_rejected_and_ignores_confirmed_and_conflict() -> None:
    rejected = realtime_pb2.OperationResult(
        client_op_id="op1",
        rejected=_status(code_pb2.PERMISSION_DENIED, "not yours", _info("NOT_ALLOWED")),
    )
    error = result_error(rejected)
    assert type(error) is tc.PermissionDenied
    assert error.reason == "NOT_ALLOWED"
    confirmed = realtime_pb2.OperationResult(client_op_id="op2")
    confirmed.confirmed.SetInParent()
    assert result_error(confirmed) is None
    conflict = realtime_pb2.OperationResult(client_op_id="op3")
    conflict.conflict.server_version = 3
    assert result_error(conflict) is None


# -- token expiry ---------------------------------------------------------------------------------


def test_decode_jwt_claims_reads_exp_and_iat_from_a_jwt() -> None:
    # "~~~" and "???" force '-' and '_' into the base64url payload, which plain b64decode rejects.
    token = _jwt({"sub": "user_1", "exp": 1_900_000_000, "iat": 1_899_999_400, "n": "~~~???"})
    assert "=" not in token
    claims = decode_jwt_claims(token)
    assert claims is not None
    assert claims.expires_at == 1_900_000_000
    assert claims.issued_at == 1_899_999_400


def test_decode_jwt_claims_accepts_numeric_strings_and_missing_claims() -> None:
    claims = decode_jwt_claims(_jwt({"sub": "u", "exp": "1900000000.5"}))
    assert claims is not None
    assert claims.expires_at == 1_900_000_000.5
    assert claims.issued_at is None


@pytest.mark.parametrize(
    "token",
    [
        "opaque-token",
        "a.b",
        "a.%%%.c",
        f"x.{_b64url(b'not json')}.y",
        f"x.{_b64url(b'[1, 2]')}.y",
    ],
)
def test_decode_jwt_claims_returns_none_for_non_jwts(token: str) -> None:
    assert decode_jwt_claims(token) is None


def test_decode_jwt_claims_ignores_non_numeric_exp() -> None:
    claims = decode_jwt_claims(_jwt({"exp": True, "iat": "soon"}))
    assert claims is not None
    assert claims.expires_at is None
    assert claims.issued_at is None


def test_refresh_margin_is_20_seconds_or_a_third_of_a_short_lifetime() -> None:
    assert refresh_margin(1000.0, 0.0) == 20.0
    assert refresh_margin(30.0, 0.0) == pytest.approx(10.0)
    assert refresh_margin(1000.0, None) == 20.0
    assert refresh_margin(1000.0, 0.0, default=5.0) == 5.0


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_token_cache_refreshes_within_the_margin_of_exp() -> None:
    clock = _Clock(1000.0)
    issued: list[str] = []

    def provider() -> str:
        token = _jwt({"sub": "u", "iat": clock.now, "exp": clock.now + 300, "n": len(issued)})
        issued.append(token)
        return token

    cache = TokenCache(provider, clock=clock)
    first = await cache.get()
    assert cache.expires_at == 1300.0
    clock.now = 1279.0  # 21 s before exp: still fresh
    assert await cache.get() == first
    clock.now = 1281.0  # 19 s before exp: inside the 20 s margin
    second = await cache.get()
    assert second != first
    assert issued == [first, second]


async def test_token_cache_uses_a_third_of_a_short_lifetime() -> None:
    clock = _Clock(0.0)
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return _jwt({"iat": clock.now, "exp": clock.now + 9, "n": calls})

    cache = TokenCache(provider, clock=clock)
    await cache.get()
    clock.now = 5.9  # 3.1 s left, margin is 3 s
    await cache.get()
    assert calls == 1
    clock.now = 6.1
    await cache.get()
    assert calls == 2


async def test_token_cache_awaits_async_providers_once_per_burst() -> None:
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return "opaque"

    cache = TokenCache(provider)
    tokens = await asyncio.gather(*(cache.get() for _ in range(10)))
    assert tokens == ["opaque"] * 10
    assert calls == 1
    assert cache.expires_at is None
    await cache.get(force=True)
    assert calls == 2


async def test_token_cache_rejects_non_string_tokens() -> None:
    cache = TokenCache(lambda: 42)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError):
        await cache.get()


def test_bearer_metadata_and_static_token_repr() -> None:
    assert bearer_metadata("abc") == (("authorization", "Bearer abc"),)
    assert bearer_metadata("") == ()
    static = StaticToken("secret-value")
    assert static() == "secret-value"
    assert "secret" not in repr(static)


# -- backoff --------------------------------------------------------------------------------------


def test_backoff_caps_grow_then_stop_at_maximum() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0, multiplier=2.0)
    assert [backoff.cap(n) for n in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff.cap(10_000) == 2.0


def test_backoff_full_jitter_stays_within_the_cap() -> None:
    backoff = Backoff(initial=0.5, maximum=8.0, rng=random.Random(7))
    for attempt in range(12):
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= backoff.cap(attempt) for d in delays)
        # Full jitter spreads delays over the whole range, not just near the cap.
        assert min(delays) < backoff.cap(attempt) / 4


def test_backoff_honours_server_retry_after_with_spread() -> None:
    backoff = Backoff(rng=random.Random(1))
    delays = [backoff.delay(0, retry_after=5.0) for _ in range(100)]
    assert all(5.0 <= d <= 6.0 for d in delays)
    assert len(set(delays)) > 1


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=0)
    with pytest.raises(ValueError):
        Backoff(initial=2.0, maximum=1.0)


# -- channel service config -----------------------------------------------------------------------


def test_service_config_retries_only_unavailable_on_known_methods() -> None:
    config = json.loads(service_config())
    (method_config,) = config["methodConfig"]
    assert method_config["retryPolicy"] == RETRY_POLICY
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method_config["retryPolicy"]["maxAttempts"] == 4
    pool = thread_service_pb2.DESCRIPTOR.pool
    for entry in method_config["name"]:
        service = pool.FindServiceByName(entry["service"])
        assert service.FindMethodByName(entry["method"]) is not None
    named = {(e["service"], e["method"]) for e in method_config["name"]}
    assert ("threadline.v1.ThreadService", "GetThread") in named
    assert ("threadline.v1.RealtimeService", "Connect") not in named
    assert ("threadline.v1.UserService", "UpdatePreferences") not in named
    assert sum(len(m) for m in RETRYABLE_METHODS.values()) == len(named)
