"""Typed SDK exceptions, decoded from gRPC statuses and their `google.rpc` error details.

Every SDK call raises a `ThreadlineError` subclass chosen by status code, never a raw
`grpc.aio.AioRpcError`. The server puts a `google.rpc.Status` in the `grpc-status-details-bin`
trailer (and in `OperationResult.rejected` on the stream); its `ErrorInfo.reason` is the stable
value to branch on, and `BadRequest`, `RetryInfo` and the ErrorInfo metadata become typed
attributes. Mirrors python-api-core's `from_grpc_error`: one class per code, one mapper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "DETAILS_METADATA_KEY",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ThreadlineError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_class",
    "from_rpc_error",
    "from_status_proto",
    "is_retryable",
    "make_error",
]

DETAILS_METADATA_KEY = "grpc-status-details-bin"
"""The trailer that carries the serialized `google.rpc.Status` (as grpcio-status writes it)."""

# Detail types the server sends (transport/status.py) plus the rest of google/rpc/error_details,
# so an unexpected but standard detail is still decoded rather than left as an opaque Any.
_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.DebugInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)
_DETAIL_BY_NAME: dict[str, type[Message]] = {t.DESCRIPTOR.full_name: t for t in _DETAIL_TYPES}
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


class ThreadlineError(Exception):
    """A failed Threadline call: a status code, a message and decoded error details.

    Args:
        code: The gRPC status code.
        message: The status message (for people; never branch on it).
        reason: The `ErrorInfo.reason` (e.g. `TOKEN_EXPIRED`); taken from `details` when None.
        details: Decoded `google.rpc` detail messages (unknown types stay `google.protobuf.Any`).

    Attributes:
        code: The gRPC status code.
        message: The status message.
        reason: The stable `ErrorInfo.reason` without the `ERROR_REASON_` prefix, or None when
            the status carried no ErrorInfo (statuses the gRPC library itself generates).
        domain: The `ErrorInfo.domain` (`threadline.dev` for the server's own errors), or None.
        metadata: The `ErrorInfo.metadata` (e.g. `current_version`, `ref`).
        details: The decoded detail messages, in order.
        retry_after: Seconds to wait before retrying, from `RetryInfo`, or None.
    """

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    """The code this class stands for (the mapper picks the class by it)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: tuple[Message, ...] = tuple(details)
        info = self.detail(error_details_pb2.ErrorInfo)
        self.reason = reason if reason is not None else (info.reason if info else None) or None
        self.domain: str | None = (info.domain or None) if info else None
        self.metadata: dict[str, str] = dict(info.metadata) if info else {}
        retry = self.detail(error_details_pb2.RetryInfo)
        self.retry_after: float | None = (
            retry.retry_delay.ToTimedelta().total_seconds()
            if retry is not None and retry.HasField("retry_delay")
            else None
        )

    def detail(self, kind: type[Any]) -> Any:
        """Returns the first detail of a given message type, or None.

        Args:
            kind: A `google.rpc.error_details_pb2` class, e.g. `ResourceInfo`.
        """
        for item in self.details:
            if isinstance(item, kind):
                return item
        return None

    @property
    def retryable(self) -> bool:
        """Whether repeating the same call (with the same `client_op_id`) may succeed."""
        return is_retryable(self)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, reason={self.reason!r})"


class Cancelled(ThreadlineError):
    """The call was cancelled, usually by this client (e.g. a stream closed while waiting)."""

    grpc_code = grpc.StatusCode.CANCELLED


class Unknown(ThreadlineError):
    """UNKNOWN: the server raised something unmapped, or sent bytes it could not parse."""

    grpc_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ThreadlineError):
    """INVALID_ARGUMENT: a field is invalid (FIELD_INVALID) or a frame broke the protocol.

    Attributes:
        field_violations: `(field, description)` pairs from the `BadRequest` detail.
    """

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(code, message, reason, details)
        bad = self.detail(error_details_pb2.BadRequest)
        self.field_violations: list[tuple[str, str]] = (
            [(v.field, v.description) for v in bad.field_violations] if bad is not None else []
        )


class DeadlineExceeded(ThreadlineError):
    """DEADLINE_EXCEEDED: the deadline passed (client side, or DB_TIMEOUT / HELLO_TIMEOUT)."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ThreadlineError):
    """NOT_FOUND: the resource does not exist or the caller may not see it."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ThreadlineError):
    """ALREADY_EXISTS: a resource with the client-chosen id exists."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ThreadlineError):
    """PERMISSION_DENIED: the caller sees the resource but may not do this (NOT_ALLOWED)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ThreadlineError):
    """RESOURCE_EXHAUSTED: rate limited, too many connections, slow consumer, size limits.

    `retry_after` (from RetryInfo) says when trying again makes sense; without it the condition
    is not transient (e.g. a frame over the size limit) and retrying cannot help.
    """

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ThreadlineError):
    """FAILED_PRECONDITION: e.g. IDEMPOTENCY_KEY_REUSED, UPLOAD_NOT_USABLE, UPLOAD_MISMATCH."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ThreadlineError):
    """ABORTED: the expected version is stale (VERSION_MISMATCH); re-read and retry.

    Attributes:
        current_version: The resource's version now, from ErrorInfo metadata `current_version`,
            or None when the server did not say.
    """

    grpc_code = grpc.StatusCode.ABORTED

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(code, message, reason, details)
        raw = self.metadata.get("current_version")
        try:
            self.current_version: int | None = int(raw) if raw is not None else None
        except ValueError:
            self.current_version = None


class OutOfRange(ThreadlineError):
    """OUT_OF_RANGE (not generated by the server today; mapped for completeness)."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ThreadlineError):
    """UNIMPLEMENTED: the server lacks this RPC or feature (NOT_IMPLEMENTED)."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ThreadlineError):
    """INTERNAL: a server bug; `metadata["ref"]` identifies the server's log entry."""

    grpc_code = grpc.StatusCode.INTERNAL


class Unavailable(ThreadlineError):
    """UNAVAILABLE: draining, idle timeout, backend down, replaced stream; retry or reconnect."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ThreadlineError):
    """DATA_LOSS (not generated by the server today; mapped for completeness)."""

    grpc_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ThreadlineError):
    """UNAUTHENTICATED: TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED or TOKEN_NOT_YET_VALID."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


_CLASS_BY_CODE: dict[grpc.StatusCode, type[ThreadlineError]] = {
    cls.grpc_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[ThreadlineError]:
    """Returns the exception class for a status code (`ThreadlineError` for unmapped codes)."""
    return _CLASS_BY_CODE.get(code, ThreadlineError)


def make_error(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str | None = None,
    details: Sequence[Message] = (),
) -> ThreadlineError:
    """Builds the typed exception for a status, e.g. for conditions the SDK detects itself.

    Args:
        code: The status code; it selects the class.
        message: The message.
        reason: An ErrorInfo-style reason, if any.
        details: Decoded detail messages.
    """
    return error_class(code)(code, message, reason, details)


def _unpack_details(packed: Iterable[any_pb2.Any]) -> list[Message]:
    decoded: list[Message] = []
    for item in packed:
        kind = _DETAIL_BY_NAME.get(item.TypeName())
        if kind is None:
            decoded.append(item)
            continue
        message = kind()
        # A detail that does not unpack is kept raw rather than failing the whole mapping.
        decoded.append(message if item.Unpack(message) else item)
    return decoded


def from_status_proto(status: status_pb2.Status) -> ThreadlineError:
    """Maps a `google.rpc.Status` (e.g. `OperationResult.rejected`) to its typed exception.

    Args:
        status: The status with a non-OK code. An unknown numeric code maps to UNKNOWN.
    """
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return make_error(code, status.message, details=_unpack_details(status.details))


def _status_from_trailers(metadata: Iterable[tuple[str, str | bytes]] | None) -> Any:
    for key, value in metadata or ():
        if key == DETAILS_METADATA_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def from_rpc_error(error: grpc.aio.AioRpcError) -> ThreadlineError:
    """Maps a failed grpc.aio call to its typed exception.

    The code and message come from the call itself, because library-generated statuses
    (deadline, size limits, connection failures) carry no details; the details come from the
    `grpc-status-details-bin` trailer when the server sent one. Unlike
    `grpc_status.rpc_status.from_call`, a trailer whose code disagrees with the call's is not an
    error: the call's code wins and the details are still used.

    Args:
        error: The error raised by a grpc.aio call.
    """
    code = error.code()
    message = error.details() or ""
    status = _status_from_trailers(error.trailing_metadata())
    details = _unpack_details(status.details) if status is not None else []
    return make_error(code, message, details=details)


_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def is_retryable(error: BaseException) -> bool:
    """Whether the same request may be repeated (for writes: with the same `client_op_id`).

    UNAVAILABLE and DEADLINE_EXCEEDED are transient. RESOURCE_EXHAUSTED is retryable only when
    the server sent a RetryInfo delay, and only after waiting it; without one (e.g. a message
    over the size limit) a retry would fail the same way. Everything else terminates.

    Args:
        error: Any exception; non-Threadline exceptions are not retryable.
    """
    if not isinstance(error, ThreadlineError):
        return False
    if error.code in _RETRYABLE_CODES:
        return True
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None
