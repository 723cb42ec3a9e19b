"""A protocol-level Connect client over the generated stubs, for frame-exact tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg

_ids = itertools.count(1)


class RawStream:
    """Writes ClientFrames; one reader task files ServerFrames as replies (by request id) or
    pushes (in order), so many requests can be in flight at once.

    Like a well-behaved client, it half-closes when a StreamError frame says the stream is
    ending (`half_close_on_error`), so that the server can send the status at once; without
    that the server sends it once it has waited a moment for the client's last writes."""

    def __init__(
        self, channel: grpc.aio.Channel, token: str, *, half_close_on_error: bool = True
    ) -> None:
        self._out: asyncio.Queue[rs.ConnectRequest | None] = asyncio.Queue()
        self._half_close_on_error = half_close_on_error
        self.call = rsg.RealtimeServiceStub(channel).Connect(
            self._requests(), metadata=(("authorization", f"Bearer {token}"),)
        )
        self.pushes: asyncio.Queue[rt.ServerFrame | None] = asyncio.Queue()
        self._replies: dict[str, asyncio.Future[rt.ServerFrame]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[rs.ConnectRequest]:
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                assert isinstance(response, rs.ConnectResponse)
                frame = response.frame
                if frame.WhichOneof("kind") == "error" and self._half_close_on_error:
                    self.half_close()
                waiter = self._replies.pop(frame.request_id, None) if frame.request_id else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
                else:
                    self.pushes.put_nowait(frame)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self.pushes.put_nowait(None)
            for waiter in self._replies.values():
                if not waiter.done():
                    waiter.set_exception(EOFError("stream ended"))

    def send(self, frame: rt.ClientFrame) -> str:
        if not frame.request_id:
            frame.request_id = str(next(_ids))
        self._replies[frame.request_id] = asyncio.get_running_loop().create_future()
        self._out.put_nowait(rs.ConnectRequest(frame=frame))
        return frame.request_id

    def push(self, frame: rt.ClientFrame) -> None:
        """Writes a frame that expects no reply (a reply, if any, arrives as a push)."""
        self._out.put_nowait(rs.ConnectRequest(frame=frame))

    @property
    def unsent(self) -> int:
        """Frames queued but not yet taken by the call's writer."""
        return self._out.qsize()

    def half_close(self) -> None:
        self._out.put_nowait(None)

    async def recv(self, timeout: float = 5.0, *, presence: bool = False) -> rt.ServerFrame:
        """The next pushed frame (events, errors, ...). Presence is ephemeral and arrives
        whenever a co-participant connects, so it is skipped unless asked for."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.pushes.get()
                if frame is None:
                    self.pushes.put_nowait(None)  # stay ended for later readers
                    raise EOFError("stream ended")
                if presence or not _only_presence(frame):
                    return frame

    async def reply_to(self, request_id: str, timeout: float = 5.0) -> rt.ServerFrame:
        future = self._replies.get(request_id)
        if future is None:
            raise KeyError(request_id)
        return await asyncio.wait_for(future, timeout)

    async def hello(self, sync_state: rt.SyncState | None = None) -> rt.Welcome:
        rid = self.send(rt.ClientFrame(hello=rt.Hello(sync_state=sync_state, client_name="tests")))
        welcome = await self.reply_to(rid)
        assert welcome.WhichOneof("kind") == "welcome", welcome
        done = await self.recv()
        assert done.WhichOneof("kind") == "sync_complete", done
        return welcome.welcome

    async def send_message(
        self, thread_id: str, text: str, op_id: str, timeout: float = 5.0
    ) -> rt.OperationResult:
        rid = self.send(
            rt.ClientFrame(
                send_message=rt.SendMessage(client_op_id=op_id, thread_id=thread_id, text=text)
            )
        )
        return (await self.reply_to(rid, timeout)).operation_result

    async def events(
        self, count: int, timeout: float = 5.0, *, presence: bool = False
    ) -> list[rt.Event]:
        """The next `count` events, skipping other pushed frames (and presence events, which
        may share a batch with others, unless asked for)."""
        out: list[rt.Event] = []
        while len(out) < count:
            frame = await self.recv(timeout, presence=presence)
            if frame.WhichOneof("kind") == "events":
                out.extend(
                    e for e in frame.events.events if presence or e.kind != rt.EVENT_KIND_PRESENCE
                )
        return out

    async def no_event(self, wait: float = 0.5, *, presence: bool = False) -> None:
        """Asserts that nothing is pushed within `wait` seconds."""
        try:
            frame = await self.recv(wait, presence=presence)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame}")

    async def status(self) -> grpc.StatusCode:
        return await self.call.code()

    def cancel(self) -> None:
        self._out.put_nowait(None)  # ends the request iterator even if the call is over
        self.call.cancel()
        self._reader.cancel()


def _only_presence(frame: rt.ServerFrame) -> bool:
    return frame.WhichOneof("kind") == "events" and all(
        e.kind == rt.EVENT_KIND_PRESENCE for e in frame.events.events
    )
