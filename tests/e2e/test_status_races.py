"""Races between a stream's end and the client: the status a client sees is the one the server
meant, never INTERNAL; a client hanging up is a quiet, normal event.

grpc's Python client reports INTERNAL "Internal error from Core" in place of the status it has
already received when one of its writes is still in flight as the server ends the call
(grpc/grpc#36066). So the server must not end a Connect call while the client is writing: it
reads the Hello before refusing a stream, and after a stream's final StreamError frame it sends
the status once the client has half-closed (or, for a client that does not, after a short
wait in which it reads and drops what the client still sends).

These tests run the server as a real process where the race needs it: with client and server
on one event loop the client's write always completes first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.process import ServerProcess
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline_server.app import ThreadlineServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def proc(tmp_path: Path, db_url: str) -> Iterator[ServerProcess]:
    # Many streams of two users on one connection: more than the default five per user.
    p = ServerProcess(
        tmp_path / "data", db_url, THREADLINE_REALTIME__MAX_CONNECTIONS_PER_USER="100"
    )
    yield p
    p.stop()


def _error_info(trailing: grpc.aio.Metadata | None) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in `grpc-status-details-bin`, read straight off the trailers."""
    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return _info_of(status_pb2.Status.FromString(value).details)
    return None


def _info_of(details: list[any_pb2.Any]) -> error_details_pb2.ErrorInfo | None:
    for item in details:
        info = error_details_pb2.ErrorInfo()
        if item.Unpack(info):
            return info
    return None


def _bad_tokens(good: str) -> list[tuple[str, str]]:
    """(authorization metadata value, the reason expected) for ways a token is wrong."""
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return [
        ("Bearer a.b.c", "TOKEN_INVALID"),
        (f"Bearer {header}.{forged}.{signature}", "TOKEN_INVALID"),
        ("Basic abc", "TOKEN_INVALID"),
        ("", "TOKEN_MISSING"),
    ]


def _metadata(authorization: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", authorization),) if authorization else ()


async def _refused_connect(
    stub: rsg.RealtimeServiceStub, authorization: str, *, iterator: bool
) -> tuple[grpc.StatusCode, str]:
    """Opens Connect and writes the Hello at once, as every client does, from a request
    iterator (like the SDK) or with `write` (whose failure, if any, is awaited here, so the
    status is read only once it can no longer change); then waits for the status the way a
    client waiting for Welcome would. Returns (code, ErrorInfo reason)."""
    hello = rs.ConnectRequest(frame=rt.ClientFrame(hello=rt.Hello(client_name="race")))
    done = asyncio.Event()

    async def requests() -> AsyncIterator[rs.ConnectRequest]:
        yield hello
        await done.wait()  # the client keeps its side open

    if iterator:
        call = stub.Connect(requests(), metadata=_metadata(authorization))
    else:
        call = stub.Connect(metadata=_metadata(authorization))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(hello)
    try:
        code = await call.code()
        info = _error_info(await call.trailing_metadata())
    finally:
        done.set()
        call.cancel()
    assert info is None or info.domain == "threadline.dev"
    return code, info.reason if info is not None else ""


async def test_refused_stream_with_immediate_hello_is_unauthenticated_every_time(proc):
    proc.start()
    refusals = _bad_tokens(proc.cli("token", "alice"))
    seen: Counter[tuple[str, str, str]] = Counter()
    async with grpc.aio.insecure_channel(proc.target) as channel:
        stub = rsg.RealtimeServiceStub(channel)
        for round_ in range(5):  # 200 opens, 40 at a time
            batch = [refusals[(round_ + i) % len(refusals)] for i in range(40)]
            results = await asyncio.gather(
                *(_refused_connect(stub, a, iterator=i % 2 == 0) for i, (a, _) in enumerate(batch))
            )
            for (_, expected), (code, reason) in zip(batch, results, strict=True):
                seen[(expected, code.name, reason)] += 1
    wrong = {k: n for k, n in seen.items() if k[1:] != ("UNAUTHENTICATED", k[0])}
    assert not wrong, f"expected UNAUTHENTICATED with the reason, got {wrong} (all: {seen})"
    assert sum(seen.values()) == 200


async def test_refused_subscribe_is_unauthenticated_every_time(proc):
    proc.start()
    refusals = _bad_tokens(proc.cli("token", "alice"))
    seen: Counter[tuple[str, str, str]] = Counter()
    async with grpc.aio.insecure_channel(proc.target) as channel:
        stub = rsg.RealtimeServiceStub(channel)

        async def refused(authorization: str) -> tuple[grpc.StatusCode, str]:
            call = stub.Subscribe(
                rs.SubscribeRequest(hello=rt.Hello(client_name="race")),
                metadata=_metadata(authorization),
            )
            code = await call.code()
            info = _error_info(await call.trailing_metadata())
            return code, info.reason if info is not None else ""

        for round_ in range(20):
            batch = [refusals[(round_ + i) % len(refusals)] for i in range(10)]
            results = await asyncio.gather(*(refused(a) for a, _ in batch))
            for (_, expected), (code, reason) in zip(batch, results, strict=True):
                seen[(expected, code.name, reason)] += 1
    wrong = {k: n for k, n in seen.items() if k[1:] != ("UNAUTHENTICATED", k[0])}
    assert not wrong, f"expected UNAUTHENTICATED with the reason, got {wrong} (all: {seen})"


# ---- SIGTERM under load ------------------------------------------------------------------

_CYCLES = 10
_STREAMS = 24
_IN_FLIGHT = 3  # sends each stream keeps pipelined


async def _pump(stream: RawStream, thread_id: str, prefix: str, acked: list[int]) -> None:
    """Sends messages back to back, `_IN_FLIGHT` at a time per stream, until the stream ends."""
    n = 0
    with contextlib.suppress(EOFError, TimeoutError, asyncio.CancelledError):
        while True:
            n += 1
            result = await stream.send_message(thread_id, f"{prefix}-{n}", f"{prefix}-{n}")
            if result.WhichOneof("outcome") == "confirmed":
                acked[0] += 1


async def _chatter(stream: RawStream) -> None:
    """Writes pings back to back, one queued at a time, until the stream ends: a client that
    is always in the middle of a write. (Pings beyond the stream's cap are dropped unanswered.)
    """
    ping = rt.ClientFrame(ping=rt.Ping())
    with contextlib.suppress(asyncio.CancelledError):
        while not stream.call.done():
            if stream.unsent == 0:
                stream.push(ping)
            await asyncio.sleep(0.001)


async def _ending(stream: RawStream) -> tuple[str, str, list[tuple[bool, str]]]:
    """How the stream ended: status code, ErrorInfo reason, and each StreamError frame it got
    as (can_resume, the frame's ErrorInfo reason)."""
    code = await stream.status()
    reason = _error_info(await stream.call.trailing_metadata())
    errors: list[tuple[bool, str]] = []
    while True:
        try:
            frame = await stream.recv(timeout=30)
        except EOFError:
            break
        if frame.WhichOneof("kind") == "error":
            info = _info_of(list(frame.error.status.details))
            errors.append((frame.error.can_resume, info.reason if info is not None else ""))
    return code.name, reason.reason if reason is not None else "", errors


async def test_sigterm_under_load_drains_every_stream_with_a_reconnect_hint(proc):
    """10 SIGTERMs, each with 24 streams sending and receiving: every stream gets a StreamError
    frame that says resume, then UNAVAILABLE with SERVER_DRAINING. Three quarters of the
    clients also write pings all the time and half-close on the frame; the others only send
    (each send waits for its result) and do not half-close: the server ends those after its
    short wait, when their last writes have long completed."""
    proc.start()
    tokens = [proc.cli("token", "alice"), proc.cli("token", "bob")]
    thread_id = ""
    outcomes: Counter[tuple[str, str, str]] = Counter()
    for cycle in range(_CYCLES):
        if cycle:
            proc.start()  # the same data directory and database each time
        async with grpc.aio.insecure_channel(proc.target) as channel:
            if not thread_id:
                thread_id = await create_thread(channel, tokens[0], "bob")
            streams = [
                RawStream(channel, tokens[i % 2], half_close_on_error=i % 4 != 0)
                for i in range(_STREAMS)
            ]
            await asyncio.gather(*(s.hello() for s in streams))
            acked = [0]
            pumps = [
                asyncio.create_task(_pump(s, thread_id, f"c{cycle}-s{i}-p{k}", acked))
                for i, s in enumerate(streams)
                for k in range(_IN_FLIGHT)
            ]
            pumps += [asyncio.create_task(_chatter(s)) for i, s in enumerate(streams) if i % 4]
            while acked[0] < 5 * _STREAMS:  # messages are flowing on every stream
                await asyncio.sleep(0.01)
            exit_code = await asyncio.to_thread(proc.terminate)
            endings = await asyncio.gather(*(_ending(s) for s in streams))
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps)
            for s in streams:
                s.cancel()
        assert exit_code == 0, "".join(proc.output)
        for code, reason, errors in endings:
            hint = "hint" if errors == [(True, "SERVER_DRAINING")] else f"frames {errors}"
            outcomes[(code, reason, hint)] += 1
        log = "".join(proc.output)
        assert "Traceback" not in log and " ERROR " not in log, log
        proc.output.clear()
    expected = ("UNAVAILABLE", "SERVER_DRAINING", "hint")
    assert outcomes == {expected: _CYCLES * _STREAMS}, dict(outcomes)


# ---- hang-ups ------------------------------------------------------------------------------

_HANG_UPS = 300


async def test_client_hang_ups_are_quiet_and_leave_no_session(server, target, token, caplog):
    """300 resuming streams whose replay does not fit the HTTP/2 windows, each cancelled (or its
    connection closed) while the server is writing: nothing is logged above debug, no
    traceback, and no session is left behind."""
    caplog.set_level(logging.DEBUG, logger="grpc")
    caplog.set_level(logging.DEBUG, logger="threadline_server")
    alice, bob = token("alice"), token("bob")
    async with grpc.aio.insecure_channel(target) as channel:
        thread_id = await create_thread(channel, alice, "bob")
        writer = RawStream(channel, alice)
        welcome = await writer.hello()
        text = secrets.token_urlsafe(60_000)  # 80 KB that gzip shrinks only to ~60 KB
        results = await asyncio.gather(
            *(writer.send_message(thread_id, f"{n}{text}", f"op-{n}") for n in range(40))
        )
        assert all(r.WhichOneof("outcome") == "confirmed" for r in results)
        writer.cancel()
    hello = rs.ConnectRequest(
        frame=rt.ClientFrame(
            hello=rt.Hello(sync_state=rt.SyncState(epoch=welcome.epoch, change_seq=0))
        )
    )
    # No BDP probing: the windows stay at 64 KiB, so the server is in the middle of a write
    # (waiting for the client to read) when the client hangs up.
    options = [("grpc.http2.bdp_probe", 0)]
    shared = grpc.aio.insecure_channel(target, options=options)
    try:
        for n in range(_HANG_UPS):
            own = n % 2 == 1  # every other one hangs up by closing its connection
            channel = (
                grpc.aio.insecure_channel(
                    target, options=[*options, ("grpc.use_local_subchannel_pool", 1)]
                )
                if own
                else shared
            )
            call = rsg.RealtimeServiceStub(channel).Connect(metadata=bearer(bob))
            await call.write(hello)
            first = await call.read()
            assert isinstance(first, rs.ConnectResponse)
            assert first.frame.WhichOneof("kind") == "welcome"
            await asyncio.sleep((n % 10) * 0.003)  # hang up at various points of the replay
            call.cancel()
            if own:
                await channel.close()
    finally:
        await shared.close()
    app: ThreadlineServer = server
    for _ in range(200):  # the streams' own clean-up runs as each handler ends
        if not app.broker.all_sessions():
            break
        await asyncio.sleep(0.05)
    assert app.broker.all_sessions() == []
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, (len(loud), [f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud[:3]])


async def test_stop_with_a_short_grace_still_sends_every_stream_its_status(settings_factory):
    """The wait for a client's half-close fits in the grace period: with clients that never
    half-close and a grace shorter than the usual wait, every stream still ends UNAVAILABLE
    with SERVER_DRAINING, not cancelled by the server's stop. (Needs ThreadlineServer.stop to
    pass its grace to RealtimeServicer.drain.)"""
    app = ThreadlineServer(settings_factory())
    endpoints = await app.start()
    stopped = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as channel:
            streams = [
                RawStream(channel, app.mint(user, 600), half_close_on_error=False)
                for user in ("alice", "bob", "carol")
            ]
            await asyncio.gather(*(s.hello() for s in streams))
            await app.stop(grace=0.4)
            stopped = True
            endings = await asyncio.gather(*(_ending(s) for s in streams))
            for s in streams:
                s.cancel()
    finally:
        if not stopped:
            await app.stop(grace=0.4)
    assert endings == [("UNAVAILABLE", "SERVER_DRAINING", [(True, "SERVER_DRAINING")])] * 3
