"""Refused tokens say which check refused them, through a real channel, on calls and streams.

The reason stays TOKEN_INVALID (clients branch on it); the status message and the ErrorInfo
metadata "cause" tell a developer what to fix, and the server logs the cause once a minute.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_status import rpc_status

from tests.conftest import bearer
from tests.support.raw_stream import RawStream
from tests.support.rpc import details, status_details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_client import ThreadlineClient
from threadline_client.errors import Unauthenticated
from threadline_server.app import ThreadlineServer
from threadline_server.auth import EmbeddedIssuer


def _other_port_token(server: ThreadlineServer) -> str:
    """What `threadline token` prints when run with other port settings: same key, other iss."""
    other = EmbeddedIssuer.load_or_create(server.settings.server.data_dir, "http://127.0.0.1:1")
    return other.mint("alice", ttl_s=600)


@pytest.mark.parametrize(
    ("make_metadata", "message", "cause"),
    [
        (
            lambda server, tok: bearer(_other_port_token(server)),
            "invalid token: issuer not accepted",
            "issuer",
        ),
        (
            lambda server, tok: (("authorization", tok("alice")),),
            "invalid token: authorization is not 'Bearer <token>'",
            "scheme",
        ),
        (
            lambda server, tok: bearer(tok("no spaces allowed")),
            "invalid token: subject not accepted",
            "subject",
        ),
    ],
    ids=["other-issuer", "no-bearer-prefix", "bad-subject"],
)
async def test_unary_refusal_names_the_cause(
    server, channel, token, caplog, make_metadata, message, cause
):
    caplog.set_level(logging.INFO, logger="threadline_server.auth")
    stub = tsg.ThreadServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListThreads(ts.ListThreadsRequest(), metadata=make_metadata(server, token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == message
    info = details(err.value)
    assert (info["reason"], info["metadata"]) == ("TOKEN_INVALID", {"cause": cause})
    assert f"cause {cause}" in caplog.text


async def test_stream_refusal_names_the_cause(server, channel):
    stream = RawStream(channel, _other_port_token(server))
    stream.send(rt.ClientFrame(hello=rt.Hello()))
    assert await stream.status() == grpc.StatusCode.UNAUTHENTICATED
    assert await stream.call.details() == "invalid token: issuer not accepted"
    status = rpc_status.from_call(_Trailers(await stream.call.trailing_metadata()))
    assert status is not None
    assert status_details(status)["metadata"] == {"cause": "issuer"}


class _Trailers:
    """grpc_status reads trailers synchronously; an aio call hands them over awaited."""

    def __init__(self, metadata: grpc.aio.Metadata) -> None:
        self._metadata = metadata

    def trailing_metadata(self) -> grpc.aio.Metadata:
        return self._metadata

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return "invalid token: issuer not accepted"


async def test_sdk_exposes_the_cause(server, target):
    async with ThreadlineClient(target, lambda: _other_port_token(server)) as client:
        with pytest.raises(Unauthenticated) as err:
            await client.get_me()
    assert err.value.reason == "TOKEN_INVALID"
    assert err.value.metadata == {"cause": "issuer"}
    assert err.value.message == "invalid token: issuer not accepted"
