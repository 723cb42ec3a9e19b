"""Domain errors: each class names its gRPC status (by name) and its stable ErrorInfo reason.

The transport layer maps these to `google.rpc.Status`; nothing here imports grpc, so the domain
stays transport-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path (e.g. `thread.title`) and why."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error a client can see. `code` is a grpc.StatusCode name."""

    code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    """A request field is invalid; carries one violation per field."""

    code = "INVALID_ARGUMENT"
    reason = "FIELD_INVALID"

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"invalid argument: {summary}")

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class ProtocolViolation(DomainError):
    """A stream frame that is not acceptable in the stream's state."""

    code = "INVALID_ARGUMENT"
    reason = "PROTOCOL_VIOLATION"


class Unauthenticated(DomainError):
    """The token is missing, invalid or expired; `reason` says which, coarsely.

    `cause`, when given, names the check that refused the token (see auth_errors.py); it goes
    into the ErrorInfo metadata as "cause", beside the reason clients key on.
    """

    code = "UNAUTHENTICATED"

    def __init__(
        self, reason: str, message: str = "authentication failed", *, cause: str = ""
    ) -> None:
        super().__init__(message, metadata={"cause": cause} if cause else None)
        self.instance_reason = reason
        self.cause = cause

    @property
    def reason_value(self) -> str:
        return self.instance_reason


class SessionPending(DomainError):
    """The token's session is still pending (Clerk `sts: pending`)."""

    code = "PERMISSION_DENIED"
    reason = "SESSION_PENDING"


class NotFound(DomainError):
    """The resource does not exist, or the caller may not see it (the two are not told apart)."""

    code = "NOT_FOUND"
    reason = "RESOURCE_NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str) -> None:
        super().__init__(f"{resource_type} {resource_name!r} not found")
        self.resource_type = resource_type
        self.resource_name = resource_name


class PermissionDenied(DomainError):
    """The caller sees the resource but may not change it this way."""

    code = "PERMISSION_DENIED"
    reason = "NOT_ALLOWED"


class VersionMismatch(DomainError):
    """An expected version is stale (test-and-set failed)."""

    code = "ABORTED"
    reason = "VERSION_MISMATCH"

    def __init__(self, resource_type: str, resource_name: str, current_version: int) -> None:
        super().__init__(
            f"{resource_type} {resource_name!r} is at version {current_version}",
            metadata={"current_version": str(current_version)},
        )
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.current_version = current_version


class MergeConflict(DomainError):
    """An update made from an old version overlaps a concurrent change.

    On the stream this is a result (OperationResult.conflict), not an error: it carries the
    base, server and client states so the client can resolve and resubmit.
    """

    code = "ABORTED"
    reason = "VERSION_MISMATCH"

    def __init__(
        self, base: object, server: object, client: object, server_version: int, fields: list[str]
    ) -> None:
        super().__init__(
            f"conflicting concurrent change to {', '.join(fields)}",
            metadata={"current_version": str(server_version)},
        )
        self.base = base
        self.server = server
        self.client = client
        self.server_version = server_version
        self.fields = fields


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the operation."""

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"

    def __init__(self, reason: str, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.instance_reason = reason
        self.subject = subject

    @property
    def reason_value(self) -> str:
        return self.instance_reason


class IdempotencyKeyReused(FailedPrecondition):
    """A client operation id was used before for a different operation."""

    def __init__(self, client_op_id: str) -> None:
        super().__init__(
            "IDEMPOTENCY_KEY_REUSED",
            "client_op_id was already used for a different operation",
            subject=client_op_id,
        )


class RateLimited(DomainError):
    """Too many operations; retry after `retry_after` seconds."""

    code = "RESOURCE_EXHAUSTED"
    reason = "RATE_LIMITED"

    def __init__(self, retry_after: float, message: str = "rate limit exceeded") -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(DomainError):
    """A dependency or the server itself is temporarily unavailable; retry with the same op id."""

    code = "UNAVAILABLE"

    def __init__(self, reason: str, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.instance_reason = reason
        self.retry_after = retry_after

    @property
    def reason_value(self) -> str:
        return self.instance_reason


class DeadlineExceeded(DomainError):
    """A query or a protocol step took too long."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.instance_reason = reason

    @property
    def reason_value(self) -> str:
        return self.instance_reason


class NotImplementedYet(DomainError):
    """A defined RPC whose feature this server does not provide yet."""

    code = "UNIMPLEMENTED"
    reason = "NOT_IMPLEMENTED"


def reason_of(error: DomainError) -> str:
    """The ErrorInfo reason: per instance where the class allows several, else the class's."""
    value = getattr(error, "reason_value", None)
    return value if isinstance(value, str) else error.reason
