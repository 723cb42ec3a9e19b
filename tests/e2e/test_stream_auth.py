"""Authentication on unary calls and on long streams: refresh-auth, expiry, impostors."""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import pytest

from tests.conftest import bearer
from tests.support.raw_stream import RawStream
from tests.support.rpc import details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer


def _tamper(token: str) -> str:
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{sig}"


@pytest.mark.parametrize(
    ("make_metadata", "reason"),
    [
        (lambda tok: (), "TOKEN_MISSING"),
        (lambda tok: (("authorization", "Basic abc"),), "TOKEN_INVALID"),
        (lambda tok: bearer(tok("alice", ttl_s=-60)), "TOKEN_EXPIRED"),
        (lambda tok: bearer(_tamper(tok("alice"))), "TOKEN_INVALID"),
        (lambda tok: bearer("a.b.c"), "TOKEN_INVALID"),
    ],
    ids=["missing", "wrong-scheme", "expired", "tampered", "garbage"],
)
async def test_unary_rejects_bad_tokens(channel, token, make_metadata, reason, server):
    stub = tsg.ThreadServiceStub(channel)

    def tok(user: str, ttl_s: int = 600) -> str:
        if ttl_s < 0:  # already expired: minted as if an hour ago
            import time

            assert server.issuer is not None
            return server.issuer.mint(user, ttl_s=60, now=time.time() - 3600)
        return token(user, ttl_s)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListThreads(ts.ListThreadsRequest(), metadata=make_metadata(tok))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(err.value)["reason"] == reason


async def test_stream_without_token_is_unauthenticated(channel):
    stream = RawStream(channel, "")
    stream.send(rt.ClientFrame(hello=rt.Hello()))
    assert await stream.status() == grpc.StatusCode.UNAUTHENTICATED


async def test_first_frame_must_be_hello(channel, token):
    stream = RawStream(channel, token("alice"))
    stream.send(rt.ClientFrame(ping=rt.Ping()))
    assert await stream.status() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def short_lived(settings_factory):
    """A server whose streams close 1 s after token expiry (no leeway), for fast expiry tests."""
    app = ThreadlineServer(settings_factory(auth={"leeway_s": 0, "refresh_grace_s": 1.0}))
    endpoints = await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
        yield app, channel
    await app.stop(grace=0.5)


async def test_stream_survives_several_token_lifetimes_with_refresh(short_lived):
    app, channel = short_lived
    stream = RawStream(channel, app.mint("alice", 3))
    welcome = await stream.hello()
    expiry = welcome.token_expire_time.seconds
    for _ in range(4):  # about 8 s: well past the first tokens' 3 s lifetimes
        await asyncio.sleep(2)
        rid = stream.send(rt.ClientFrame(refresh_auth=rt.RefreshAuth(token=app.mint("alice", 3))))
        reply = await stream.reply_to(rid)
        assert reply.WhichOneof("kind") == "auth_refreshed"
        assert reply.auth_refreshed.token_expire_time.seconds > expiry
        expiry = reply.auth_refreshed.token_expire_time.seconds
    ping = stream.send(rt.ClientFrame(ping=rt.Ping()))
    assert (await stream.reply_to(ping)).WhichOneof("kind") == "pong"
    stream.cancel()


async def test_stream_closes_when_token_expires_without_refresh(short_lived):
    app, channel = short_lived
    stream = RawStream(channel, app.mint("alice", 2))
    await stream.hello()
    frame = await stream.recv(timeout=8)
    assert frame.WhichOneof("kind") == "error"
    assert not frame.error.can_resume
    assert await stream.status() == grpc.StatusCode.UNAUTHENTICATED
    trailer_reason = details(await _as_error(stream))["reason"]
    assert trailer_reason == "TOKEN_EXPIRED"


async def test_refresh_with_another_users_token_is_refused(short_lived):
    app, channel = short_lived
    stream = RawStream(channel, app.mint("alice", 60))
    await stream.hello()
    stream.send(rt.ClientFrame(refresh_auth=rt.RefreshAuth(token=app.mint("mallory", 60))))
    frame = await stream.recv()
    assert frame.WhichOneof("kind") == "error"
    assert await stream.status() == grpc.StatusCode.UNAUTHENTICATED
    assert details(await _as_error(stream))["reason"] == "TOKEN_INVALID"


async def _as_error(stream: RawStream) -> grpc.aio.AioRpcError:
    call = stream.call
    return grpc.aio.AioRpcError(
        await call.code(),
        await call.initial_metadata(),
        await call.trailing_metadata(),
        await call.details(),
    )
