"""Helpers to read rich error details off a failed call."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    """ErrorInfo reason, BadRequest fields and RetryInfo delay of a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    return status_details(status) if status is not None else {}


def status_details(status: status_pb2.Status) -> dict[str, object]:
    out: dict[str, object] = {"fields": []}
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            any_.Unpack(br)
            out["fields"] = [v.field for v in br.field_violations]
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            any_.Unpack(ri)
            out["retry_after"] = ri.retry_delay.ToTimedelta().total_seconds()
    return out
