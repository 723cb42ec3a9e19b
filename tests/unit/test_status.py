"""Every domain error maps to a proper status with ErrorInfo; bugs never leak their text."""

from __future__ import annotations

import inspect

import grpc
import pytest
from google.rpc import error_details_pb2

from threadline_server import errors
from threadline_server.transport.status import DOMAIN, internal_status, to_status


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


def _sample(cls: type[errors.DomainError]) -> errors.DomainError:
    params = inspect.signature(cls.__init__).parameters
    args = {
        "violations": [errors.FieldViolation("f", "bad")],
        "reason": "TOKEN_INVALID",
        "message": "m",
        "resource_type": "thread",
        "resource_name": "t1",
        "current_version": 3,
        "retry_after": 1.5,
        "client_op_id": "op",
        "base": None,
        "server": None,
        "client": None,
        "server_version": 4,
        "fields": ["title"],
    }
    kwargs = {k: v for k, v in args.items() if k in params}
    return cls(**kwargs)


@pytest.mark.parametrize("cls", _all_subclasses(errors.DomainError), ids=lambda c: c.__name__)
def test_every_domain_error_maps_to_a_status_with_error_info(cls):
    status = to_status(_sample(cls))
    assert status.code != grpc.StatusCode.OK.value[0]
    assert status.code != grpc.StatusCode.UNKNOWN.value[0]
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == DOMAIN and info.reason


def test_invalid_argument_carries_each_field():
    err = errors.InvalidArgument(
        [errors.FieldViolation("thread.title", "empty"), errors.FieldViolation("page_size", "neg")]
    )
    status = to_status(err)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    br = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(br.DESCRIPTOR)).Unpack(br)
    assert [v.field for v in br.field_violations] == ["thread.title", "page_size"]


def test_rate_limit_carries_retry_info():
    status = to_status(errors.RateLimited(2.5))
    ri = error_details_pb2.RetryInfo()
    next(d for d in status.details if d.Is(ri.DESCRIPTOR)).Unpack(ri)
    assert ri.retry_delay.ToTimedelta().total_seconds() == 2.5


def test_internal_errors_hide_their_text(caplog):
    status, ref = internal_status(ValueError("SELECT secret FROM users failed"))
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret" not in status.message and ref in status.message
    assert any(ref in r.getMessage() for r in caplog.records)
