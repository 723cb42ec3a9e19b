"""Domain errors to `google.rpc.Status` with rich details; anything else to a generic INTERNAL."""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from threadline_server import errors

logger = logging.getLogger(__name__)

DOMAIN = "threadline.dev"


def _pack(message: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)  # type: ignore[arg-type]  # any protobuf message
    return out


def duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def code_of(error: errors.DomainError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def to_status(error: errors.DomainError) -> status_pb2.Status:
    """The one mapping from domain errors to statuses; ErrorInfo is always present."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=errors.reason_of(error), domain=DOMAIN, metadata=error.metadata
            )
        )
    ]
    if isinstance(error, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    elif isinstance(error, errors.NotFound):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=error.resource_type, resource_name=error.resource_name
                )
            )
        )
    elif isinstance(error, errors.VersionMismatch):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=error.resource_type,
                    resource_name=error.resource_name,
                    description=f"current version {error.current_version}",
                )
            )
        )
    elif isinstance(error, errors.FailedPrecondition):
        details.append(
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=errors.reason_of(error),
                            subject=error.subject,
                            description=error.message,
                        )
                    ]
                )
            )
        )
    elif isinstance(error, errors.RateLimited | errors.Unavailable):
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration(error.retry_after))))
    return status_pb2.Status(code=code_of(error).value[0], message=error.message, details=details)


def internal_status(exc: BaseException) -> tuple[status_pb2.Status, str]:
    """A bug: logged once with a reference the client also gets; the text never leaks."""
    ref = uuid.uuid4().hex[:12]
    logger.error("internal error ref=%s", ref, exc_info=exc)
    error = errors.DomainError(f"internal error (ref={ref})", metadata={"ref": ref})
    return to_status(error), ref
