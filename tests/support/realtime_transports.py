"""One realtime session over either transport, so that a scenario runs unchanged on both:
`Connect` (one bidirectional stream) and the browser's pair, `Subscribe` (server frames) plus
`Submit` (one client frame per unary call, with the session id).

The test reads frames in order itself. A frame is sent in one of three ways, by what the
protocol says its answer is:

* `ask`: it has an answer (Pong, OperationResult, AuthRefreshed): the reply frame on Connect
  (paired by request id), the Submit response's frame.
* `tell`: it has none (ack, typing, a ping over the cap, an invalid typing signal). On Submit
  the response must be empty. On Connect an answer would be a frame with its request id; the
  server handles such frames in order, one after the other, so the answer to a later `ask`
  proves none came (and any that does fails the test).
* `fatal`: it ends the session. On Submit the call answers with the session's status
  (returned as `(code, reason)`); on Connect nothing answers it (returns None). Either way
  the stream then says its last word, read with `ending`.

`Realm` is a server started by a test (with fake clocks) and the sessions it opened; the
helpers below it build frames and check how a session ended.
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.support.fake_clock import FakeClock
from tests.support.raw_stream import RawStream
from tests.support.rpc import details
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline_server.app import ThreadlineServer

CONNECT = "connect"
SUBSCRIBE = "subscribe+submit"
TRANSPORTS = (CONNECT, SUBSCRIBE)

_ids = itertools.count(1)
_WAIT_S = 30.0  # only bounds a hang; nothing is asserted on how long anything takes


@dataclass(frozen=True)
class Ending:
    """How a session ended: the frames after the last one read, the status and its reason."""

    frames: list[rt.ServerFrame]
    code: grpc.StatusCode
    reason: str

    @property
    def last(self) -> rt.ServerFrame | None:
        return self.frames[-1] if self.frames else None

    @property
    def error(self) -> rt.StreamError | None:
        """The StreamError frame, if the stream ended with one."""
        errors = [f.error for f in self.frames if f.WhichOneof("kind") == "error"]
        return errors[-1] if errors else None


def reason_of(status: status_pb2.Status) -> str:
    for item in status.details:
        info = error_details_pb2.ErrorInfo()
        if item.Unpack(info):
            return str(info.reason)
    return ""


def _trailer_reason(trailing: grpc.aio.Metadata | None) -> str:
    for key, value in trailing or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return reason_of(status_pb2.Status.FromString(value))
    return ""


def _only_presence(frame: rt.ServerFrame) -> bool:
    return frame.WhichOneof("kind") == "events" and all(
        e.kind == rt.EVENT_KIND_PRESENCE for e in frame.events.events
    )


def _stamp(frame: rt.ClientFrame) -> rt.ClientFrame:
    if not frame.request_id:
        frame.request_id = f"r{next(_ids)}"
    return frame


class RealtimeClient(ABC):
    """A user's session. `token` is the bearer token of the calls (a browser sends its current
    token with every Submit; set it after a refresh)."""

    kind: str

    def __init__(self, app: ThreadlineServer, channel: grpc.aio.Channel, token: str) -> None:
        self.app = app
        self.channel = channel
        self.stub = rsg.RealtimeServiceStub(channel)
        self.token = token
        self.session_id = ""
        self._frames: asyncio.Queue[rt.ServerFrame | None] = asyncio.Queue()
        self._pushes: list[rt.ServerFrame] = []  # read while looking for an answer
        self._silent: set[str] = set()  # request ids that must never be answered
        self._ended = False
        self._reader: asyncio.Task[None] | None = None

    # ---- the stream ---------------------------------------------------------------------

    def _file(self, frame: rt.ServerFrame) -> None:
        self._frames.put_nowait(frame)

    async def _next(self) -> rt.ServerFrame:
        if self._ended:
            raise EOFError("stream ended")
        async with asyncio.timeout(_WAIT_S):
            frame = await self._frames.get()
        if frame is None:
            self._ended = True
            raise EOFError("stream ended")
        assert frame.request_id not in self._silent, f"a frame told to be unanswered was: {frame}"
        return frame

    async def open(self, sync_state: rt.SyncState | None = None) -> list[rt.ServerFrame]:
        """Starts the session; the frames up to and including SyncComplete (Welcome first).
        Returns once the server watches the session for idle time and token expiry."""
        self._start(rt.Hello(sync_state=sync_state, client_name="parity"))
        frames = [await self._next()]
        assert frames[0].WhichOneof("kind") == "welcome", frames[0]
        self.session_id = frames[0].welcome.session_id
        while frames[-1].WhichOneof("kind") != "sync_complete":
            frames.append(await self._next())
        async with asyncio.timeout(_WAIT_S):
            while (s := self.app.broker.session(self.session_id)) is None or not s.watched:
                await asyncio.sleep(0.005)
        return frames

    async def recv(self, *, presence: bool = False) -> rt.ServerFrame:
        """The next pushed frame, skipping frames of presence events only unless asked."""
        while True:
            frame = self._pushes.pop(0) if self._pushes else await self._next()
            if presence or not _only_presence(frame):
                return frame

    async def events(self, count: int, *, presence: bool = False) -> list[rt.Event]:
        out: list[rt.Event] = []
        while len(out) < count:
            frame = await self.recv(presence=presence)
            if frame.WhichOneof("kind") == "events":
                out += [
                    e for e in frame.events.events if presence or e.kind != rt.EVENT_KIND_PRESENCE
                ]
        return out

    async def ending(self) -> Ending:
        """Reads to the end of the stream; the frames it read, the status and its reason."""
        frames = list(self._pushes)
        self._pushes.clear()
        while True:
            try:
                frames.append(await self._next())
            except EOFError:
                break
        code, trailing = await self._status()
        return Ending(frames, code, _trailer_reason(trailing))

    # ---- per transport ------------------------------------------------------------------

    @abstractmethod
    def _start(self, hello: rt.Hello) -> None: ...

    @abstractmethod
    async def _status(self) -> tuple[grpc.StatusCode, grpc.aio.Metadata | None]: ...

    @abstractmethod
    async def ask(self, frame: rt.ClientFrame) -> rt.ServerFrame:
        """Sends a frame that has an answer; returns it."""

    @abstractmethod
    async def tell(self, frame: rt.ClientFrame) -> None:
        """Sends a frame that has no answer (see the module docstring)."""

    @abstractmethod
    async def fatal(self, frame: rt.ClientFrame) -> tuple[grpc.StatusCode, str] | None:
        """Sends a frame that ends the session; the Submit call's status, None on Connect."""

    @abstractmethod
    async def ask_all(
        self, frames: Sequence[rt.ClientFrame], tokens: Sequence[str] = ()
    ) -> list[rt.ServerFrame]:
        """Sends frames back to back without waiting for answers; the answers, in the order of
        the frames. On Submit each call is started once the server has seen the previous one
        arrive (so that the order of arrival is the order given), each with its own token
        from `tokens` if given."""

    @abstractmethod
    def close(self) -> None: ...


class ConnectClient(RealtimeClient):
    kind = CONNECT

    def _start(self, hello: rt.Hello) -> None:
        self._out: asyncio.Queue[rs.ConnectRequest | None] = asyncio.Queue()
        self.call = self.stub.Connect(self._requests(), metadata=self._metadata())
        self._out.put_nowait(rs.ConnectRequest(frame=rt.ClientFrame(hello=hello)))
        self._reader = asyncio.create_task(self._read())

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    async def _requests(self) -> AsyncIterator[rs.ConnectRequest]:
        while (item := await self._out.get()) is not None:
            yield item

    async def _read(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                assert isinstance(response, rs.ConnectResponse)
                if response.frame.WhichOneof("kind") == "error":
                    self._out.put_nowait(None)  # a well-behaved client half-closes
                self._file(response.frame)
        except grpc.aio.AioRpcError:
            pass
        finally:
            self._frames.put_nowait(None)

    async def _status(self) -> tuple[grpc.StatusCode, grpc.aio.Metadata | None]:
        return await self.call.code(), await self.call.trailing_metadata()

    def _write(self, frame: rt.ClientFrame) -> str:
        self._out.put_nowait(rs.ConnectRequest(frame=_stamp(frame)))
        return frame.request_id

    async def _answer(self, request_id: str) -> rt.ServerFrame:
        while True:
            frame = await self._next()
            if frame.request_id == request_id:
                return frame
            self._pushes.append(frame)

    async def ask(self, frame: rt.ClientFrame) -> rt.ServerFrame:
        return await self._answer(self._write(frame))

    async def tell(self, frame: rt.ClientFrame) -> None:
        self._silent.add(self._write(frame))

    async def fatal(self, frame: rt.ClientFrame) -> tuple[grpc.StatusCode, str] | None:
        self._write(frame)
        return None

    async def ask_all(
        self, frames: Sequence[rt.ClientFrame], tokens: Sequence[str] = ()
    ) -> list[rt.ServerFrame]:
        ids = [self._write(f) for f in frames]
        answers: dict[str, rt.ServerFrame] = {}
        while len(answers) < len(ids):
            frame = await self._next()
            if frame.request_id in ids:
                answers[frame.request_id] = frame
            else:
                self._pushes.append(frame)
        return [answers[i] for i in ids]

    def close(self) -> None:
        if hasattr(self, "call"):
            self._out.put_nowait(None)
            self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()


class SubscribeSubmitClient(RealtimeClient):
    kind = SUBSCRIBE

    def _start(self, hello: rt.Hello) -> None:
        self.call = self.stub.Subscribe(
            rs.SubscribeRequest(hello=hello), metadata=self._metadata(self.token)
        )
        self._reader = asyncio.create_task(self._read())

    @staticmethod
    def _metadata(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def _read(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                assert isinstance(response, rs.SubscribeResponse)
                self._file(response.frame)
        except grpc.aio.AioRpcError:
            pass
        finally:
            self._frames.put_nowait(None)

    async def _status(self) -> tuple[grpc.StatusCode, grpc.aio.Metadata | None]:
        return await self.call.code(), await self.call.trailing_metadata()

    async def submit(self, frame: rt.ClientFrame, token: str = "") -> rs.SubmitResponse:
        """One Submit on this session; raises the call's AioRpcError."""
        return await self.stub.Submit(
            rs.SubmitRequest(frame=_stamp(frame), session_id=self.session_id),
            metadata=self._metadata(token or self.token),
            timeout=_WAIT_S,
        )

    async def ask(self, frame: rt.ClientFrame) -> rt.ServerFrame:
        response = await self.submit(frame)
        assert response.HasField("frame"), f"no answer to {frame}"
        return response.frame

    async def tell(self, frame: rt.ClientFrame) -> None:
        response = await self.submit(frame)
        assert not response.HasField("frame"), f"an answer to {frame}: {response.frame}"

    async def fatal(self, frame: rt.ClientFrame) -> tuple[grpc.StatusCode, str] | None:
        try:
            response = await self.submit(frame)
        except grpc.aio.AioRpcError as err:
            return err.code(), _trailer_reason(err.trailing_metadata())
        raise AssertionError(f"the Submit succeeded: {response}")

    async def ask_all(
        self, frames: Sequence[rt.ClientFrame], tokens: Sequence[str] = ()
    ) -> list[rt.ServerFrame]:
        session = self.app.broker.session(self.session_id)
        assert session is not None
        calls: list[asyncio.Task[rs.SubmitResponse]] = []
        for i, frame in enumerate(frames):
            arrived = session.submits.arrived
            token = tokens[i] if tokens else ""
            calls.append(asyncio.create_task(self.submit(frame, token)))
            async with asyncio.timeout(_WAIT_S):
                while session.submits.arrived == arrived:
                    await asyncio.sleep(0.001)
        responses = await asyncio.gather(*calls)
        assert all(r.HasField("frame") for r in responses), responses
        return [r.frame for r in responses]

    def close(self) -> None:
        if hasattr(self, "call"):
            self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()


def client(
    kind: str, app: ThreadlineServer, channel: grpc.aio.Channel, token: str
) -> RealtimeClient:
    """A session of `token`'s user over the transport named `kind` (not started: `open` it)."""
    if kind == CONNECT:
        return ConnectClient(app, channel, token)
    assert kind == SUBSCRIBE, kind
    return SubscribeSubmitClient(app, channel, token)


@dataclass
class Realm:
    """A real server on loopback with fake clocks, and the sessions a test opened on it."""

    kind: str
    app: ThreadlineServer
    channel: grpc.aio.Channel
    limits: FakeClock
    idle: FakeClock
    wall: FakeClock
    opened: list[RealtimeClient | RawStream] = field(default_factory=list)
    stopped: bool = False

    def mint(self, user: str, ttl_s: int = 600, **claims: Any) -> str:
        return self.app.mint(user, ttl_s, **claims)

    def client(self, user: str, ttl_s: int = 600, *, kind: str = "") -> RealtimeClient:
        """A session of `user` on the transport under test (or on `kind`)."""
        made = client(kind or self.kind, self.app, self.channel, self.mint(user, ttl_s))
        self.opened.append(made)
        return made

    def raw(self, user: str, **kwargs: Any) -> RawStream:
        """A plain Connect stream, for the other side of a scenario."""
        made = RawStream(self.channel, self.mint(user), **kwargs)
        self.opened.append(made)
        return made

    def sweep(self) -> None:
        """One round of the server's stream watchdog, at the fake clocks' time."""
        assert self.app.realtime is not None
        self.app.realtime.sweep()

    async def stop(self, grace: float) -> None:
        self.stopped = True
        await self.app.stop(grace=grace)


Start = Callable[..., Awaitable[Realm]]
"""The `realm` fixture: starts a server with the given settings sections."""


# ---- scenario helpers -----------------------------------------------------------------------


def kinds(frames: list[rt.ServerFrame]) -> list[str]:
    return [str(f.WhichOneof("kind")) for f in frames]


def send(thread_id: str, op_id: str, text: str) -> rt.ClientFrame:
    return rt.ClientFrame(
        send_message=rt.SendMessage(client_op_id=op_id, thread_id=thread_id, text=text)
    )


def ping(seconds: int = 0) -> rt.ClientFrame:
    return rt.ClientFrame(ping=rt.Ping(client_time=ts_(seconds)))


def ts_(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def refresh(token: str) -> rt.ClientFrame:
    return rt.ClientFrame(refresh_auth=rt.RefreshAuth(token=token))


async def alive(session: RealtimeClient) -> None:
    assert (await session.ask(ping())).WhichOneof("kind") == "pong"


async def until(condition: Callable[[], bool]) -> None:
    """Waits for a condition of the server's state (bounded only by the test timeout)."""
    while not condition():
        await asyncio.sleep(0.005)


def assert_ended(
    ending: Ending, code: grpc.StatusCode, reason: str, *, can_resume: bool
) -> rt.StreamError:
    """The stream's last frame is a StreamError with the reason, then the status."""
    assert ending.last is not None and ending.last.WhichOneof("kind") == "error", ending.frames
    error: rt.StreamError = ending.last.error
    assert error.can_resume is can_resume
    assert (error.status.code, reason_of(error.status)) == (code.value[0], reason)
    assert (ending.code, ending.reason) == (code, reason)
    return error


async def assert_session_gone(session: RealtimeClient) -> None:
    """After its last word a session takes no more frames: on Connect they are ignored, and a
    Submit for it is NOT_FOUND (never INTERNAL), with nothing done."""
    if isinstance(session, SubscribeSubmitClient):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await session.submit(ping())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(err.value)["reason"] == "RESOURCE_NOT_FOUND"
