"""One realtime session over `RealtimeService.Connect`: Hello/Welcome, heartbeats, token refresh.

`RealtimeStream` writes client frames from an `asyncio.Queue` (the call's request iterator) and
runs three tasks: a reader that pairs replies with requests by `request_id` and queues every
other frame for the application, a heartbeat that sends Ping at the Welcome's interval (grpc-web
and proxies drop HTTP/2 pings, so the server's idle timeout counts application frames), and a
refresher that sends RefreshAuth before the stream's token expires. Reconnection and resume are
the caller's job for now; `threadline_client.backoff` holds the delay policy for them.
"""

# `timeout=` arguments follow gRPC and asyncio.wait_for conventions, which callers of a gRPC
# SDK expect, rather than asking them to wrap every call in asyncio.timeout().
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from threadline.v1 import realtime_pb2, realtime_service_pb2
from threadline_client.auth import (
    DEFAULT_REFRESH_MARGIN,
    TokenCache,
    bearer_metadata,
    decode_jwt_claims,
    refresh_margin,
)
from threadline_client.backoff import Backoff
from threadline_client.errors import ThreadlineError, from_rpc_error, from_status_proto, make_error
from threadline_client.ids import new_op_id

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from threadline.v1.realtime_service_pb2_grpc import RealtimeServiceAsyncStub

__all__ = ["DEFAULT_HEARTBEAT_INTERVAL", "RealtimeStream", "result_error"]

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 30.0
"""Ping interval when the Welcome names none: well inside the server's 120 s idle timeout."""

# Frames answered internally; the application never sees them in `async for`.
_INTERNAL_KINDS = frozenset({"pong", "auth_refreshed"})

_ConnectCall = grpc.aio.StreamStreamCall[
    realtime_service_pb2.ConnectRequest, realtime_service_pb2.ConnectResponse
]


def result_error(result: realtime_pb2.OperationResult) -> ThreadlineError | None:
    """Returns the typed error of a rejected operation result, or None if it was not rejected.

    A conflict is a result, not an error (the caller resolves it), so it maps to None too.
    """
    if result.WhichOneof("outcome") == "rejected":
        return from_status_proto(result.rejected)
    return None


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class RealtimeStream:
    """A realtime session. Create it with `ThreadlineClient.open_stream`, then enter it.

    `async for frame in stream` yields every server frame except Pong and AuthRefreshed
    (Welcome, OperationResult, EventBatch, SyncComplete, ResyncRequired, StreamError) and stops
    when the stream ends; `closed_error` then says why. Frames are buffered without bound, so
    the replies that requests wait for are never stuck behind unread events; `next_event`,
    `wait_for` and `async for` all consume the same buffer.

    Args:
        stub: The RealtimeService stub of the client's channel.
        tokens: The client's token cache.
        hello: The Hello to open with.
        default_timeout: Seconds to wait for the Welcome and for request replies.
        heartbeat: Send Ping at the Welcome's heartbeat interval.
        auto_refresh: Send RefreshAuth before the token expires.
        refresh_margin: Default refresh margin (see `threadline_client.auth.refresh_margin`).
        on_close: Called once with the stream when it ends or is closed.
    """

    def __init__(
        self,
        stub: RealtimeServiceAsyncStub,
        tokens: TokenCache,
        hello: realtime_pb2.Hello,
        *,
        default_timeout: float = 10.0,
        heartbeat: bool = True,
        auto_refresh: bool = True,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        on_close: Callable[[RealtimeStream], None] | None = None,
    ) -> None:
        self._stub = stub
        self._tokens = tokens
        self._hello = hello
        self._default_timeout = default_timeout
        self._heartbeat_enabled = heartbeat
        self._auto_refresh = auto_refresh
        self._margin = refresh_margin
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue[realtime_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self._frames: asyncio.Queue[realtime_pb2.ServerFrame | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[realtime_pb2.ServerFrame]] = {}
        self._op_requests: dict[str, str] = {}
        self._pending_events: deque[realtime_pb2.Event] = deque()
        self._drained = False
        self._call: _ConnectCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._helpers: list[asyncio.Task[None]] = []
        self._welcome_future: asyncio.Future[realtime_pb2.Welcome] | None = None
        self._welcome: realtime_pb2.Welcome | None = None
        self._ended = False
        self._closing = False
        self._closed_error: ThreadlineError | None = None
        self._stream_error: realtime_pb2.StreamError | None = None
        self._token = ""
        self._token_issued_at: float | None = None
        self._token_expires_at: float | None = None
        self._expiry_changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> realtime_pb2.Welcome:
        """Opens the call, sends Hello and waits for Welcome.

        Args:
            timeout: Seconds to wait for Welcome; the client's default timeout when None.

        Returns:
            The Welcome.

        Raises:
            ThreadlineError: The stream ended before Welcome (e.g. `Unauthenticated`), or
                `DeadlineExceeded` when no Welcome came in time.
        """
        if self._call is not None:
            raise RuntimeError("stream already started")
        # The token first: a provider that fails must not leave a Welcome future behind that
        # nobody awaits (close() would fail it, and asyncio would log it as never retrieved).
        self._token = await self._tokens.get()
        self._welcome_future = asyncio.get_running_loop().create_future()
        claims = decode_jwt_claims(self._token)
        self._token_issued_at = (claims.issued_at if claims else None) or time.time()
        self._token_expires_at = claims.expires_at if claims else None
        # The exact token is passed (the interceptor leaves explicit authorization alone) so the
        # stream knows which token the server holds for it, even if the cache moves on.
        metadata = bearer_metadata(self._token)
        self._call = self._stub.Connect(self._requests(), metadata=metadata or None)
        self._reader = asyncio.create_task(self._read_loop(), name="threadline-stream-reader")
        self._send(self._frame(hello=self._hello))
        limit = self._default_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                welcome = await self._welcome_future
        except TimeoutError:
            await self.close()
            raise make_error(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no Welcome within {limit:g} s"
            ) from None
        except BaseException:
            await self.close()
            raise
        self._welcome = welcome
        if welcome.HasField("token_expire_time"):
            self._token_expires_at = _seconds(welcome.token_expire_time)
        if self._heartbeat_enabled:
            interval = welcome.heartbeat_interval.ToTimedelta().total_seconds()
            self._spawn(self._heartbeat_loop(interval or DEFAULT_HEARTBEAT_INTERVAL), "heartbeat")
        if self._auto_refresh:
            self._spawn(self._refresh_loop(), "refresh")
        return welcome

    async def close(self, grace: float = 1.0) -> None:
        """Ends the stream: half-closes, waits up to `grace` seconds for the server, cancels.

        Pending requests fail with `Cancelled`. Safe to call more than once. `closed_error`
        stays None unless the server ended the stream with an error first.

        Args:
            grace: Seconds to let the server finish the call after the half-close.
        """
        self._closing = True
        self._outbox.put_nowait(None)
        reader = self._reader
        if reader is not None and not reader.done():
            done, _ = await asyncio.wait({reader}, timeout=grace)
            if not done and self._call is not None:
                self._call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._finish(None)
        await self._stop_helpers()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- state ----------------------------------------------------------------------------------

    @property
    def welcome(self) -> realtime_pb2.Welcome:
        """The server's Welcome (available once `start` returned)."""
        if self._welcome is None:
            raise RuntimeError("stream not started")
        return self._welcome

    @property
    def session_id(self) -> str:
        """The session id from Welcome, for Submit and logs."""
        return self.welcome.session_id

    @property
    def closed(self) -> bool:
        """True once the stream has ended, for whatever reason."""
        return self._ended

    @property
    def closed_error(self) -> ThreadlineError | None:
        """The error the stream ended with, or None while open, after `close()`, or on OK."""
        return self._closed_error

    @property
    def stream_error(self) -> realtime_pb2.StreamError | None:
        """The last StreamError frame (reconnect hint: `retry_after`, `can_resume`), if any."""
        return self._stream_error

    @property
    def token_expires_at(self) -> float | None:
        """When the server considers the stream's token expired (Unix seconds), if known."""
        return self._token_expires_at

    # -- sending --------------------------------------------------------------------------------

    async def send_message(
        self,
        thread_id: str,
        text: str,
        attachment_ids: tuple[str, ...] | list[str] = (),
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> realtime_pb2.OperationResult:
        """Sends a message and waits for its OperationResult.

        A rejected or conflicting send is a result, not an exception (see `result_error`).

        Args:
            thread_id: The thread.
            text: The text.
            attachment_ids: Ready uploads to attach.
            client_op_id: Idempotency key; fresh when None. Reuse it to retry safely.
            timeout: Seconds to wait for the result (`DeadlineExceeded` after).
        """
        op_id = client_op_id or new_op_id()
        send = realtime_pb2.SendMessage(
            client_op_id=op_id, thread_id=thread_id, text=text, attachment_ids=list(attachment_ids)
        )
        reply = await self._request(self._frame(send_message=send), timeout, client_op_id=op_id)
        return _expect(reply, "operation_result").operation_result

    async def operation(
        self, op: realtime_pb2.Operation, *, timeout: float | None = None
    ) -> realtime_pb2.OperationResult:
        """Submits an Operation (create, update or delete) and waits for its result.

        Args:
            op: The operation; a fresh `client_op_id` is filled in when empty (on a copy).
            timeout: Seconds to wait for the result.
        """
        sent = realtime_pb2.Operation()
        sent.CopyFrom(op)
        if not sent.client_op_id:
            sent.client_op_id = new_op_id()
        reply = await self._request(
            self._frame(operation=sent), timeout, client_op_id=sent.client_op_id
        )
        return _expect(reply, "operation_result").operation_result

    async def typing(self, thread_id: str, active: bool) -> None:
        """Sends a typing signal (fire and forget)."""
        self._send(self._frame(typing=realtime_pb2.Typing(thread_id=thread_id, active=active)))

    async def ack(self, change_seq: int) -> None:
        """Tells the server every event up to `change_seq` has been applied (fire and forget)."""
        self._send(self._frame(ack=realtime_pb2.Ack(change_seq=change_seq)))

    async def ping(self, *, timeout: float | None = None) -> realtime_pb2.Pong:
        """Sends a Ping and returns the matching Pong."""
        reply = await self._request(
            self._frame(ping=realtime_pb2.Ping(client_time=_now())), timeout
        )
        return _expect(reply, "pong").pong

    async def refresh_auth(
        self, token: str | None = None, *, timeout: float | None = None
    ) -> realtime_pb2.AuthRefreshed:
        """Replaces the stream's token and returns the server's AuthRefreshed.

        Args:
            token: The new token; a fresh one from the client's provider when None.
            timeout: Seconds to wait for AuthRefreshed.

        Raises:
            ThreadlineError: The mapped error if the server refused the token (ending the
                stream, or answering with an error frame), or `DeadlineExceeded`.
        """
        if token is None:
            token = await self._tokens.get(force=True)
        frame = self._frame(refresh_auth=realtime_pb2.RefreshAuth(token=token))
        refreshed = _expect(await self._request(frame, timeout), "auth_refreshed").auth_refreshed
        claims = decode_jwt_claims(token)
        self._token = token
        self._token_issued_at = (claims.issued_at if claims else None) or time.time()
        if refreshed.HasField("token_expire_time"):
            self._token_expires_at = _seconds(refreshed.token_expire_time)
        else:
            self._token_expires_at = claims.expires_at if claims else None
        self._expiry_changed.set()
        return refreshed

    # -- receiving ------------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> realtime_pb2.ServerFrame:
        frame = await self._next_frame()
        if frame is None:
            raise StopAsyncIteration
        return frame

    async def next_frame(self, timeout: float = 10.0) -> realtime_pb2.ServerFrame:
        """Returns the next frame.

        Raises:
            TimeoutError: Nothing arrived within `timeout` seconds.
            ThreadlineError: The stream ended (its `closed_error`, or `Cancelled`).
        """
        async with asyncio.timeout(timeout):
            frame = await self._next_frame()
        if frame is None:
            raise self._end_error()
        return frame

    async def next_event(self, timeout: float = 10.0) -> realtime_pb2.Event:
        """Returns the next event, flattening EventBatch frames and skipping other frames.

        Raises:
            TimeoutError: No event within `timeout` seconds.
            ThreadlineError: The stream ended first.
        """
        async with asyncio.timeout(timeout):
            return await self._next_event()

    async def wait_for(
        self,
        predicate: Callable[[realtime_pb2.ServerFrame], bool],
        timeout: float = 10.0,
    ) -> realtime_pb2.ServerFrame:
        """Returns the first frame matching `predicate`, discarding frames before it.

        Raises:
            TimeoutError: No match within `timeout` seconds.
            ThreadlineError: The stream ended first.
        """
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._next_frame()
                if frame is None:
                    raise self._end_error()
                if predicate(frame):
                    return frame

    async def wait_for_event(
        self,
        predicate: Callable[[realtime_pb2.Event], bool],
        timeout: float = 10.0,
    ) -> realtime_pb2.Event:
        """Returns the first event matching `predicate`, discarding events and frames before it.

        Raises:
            TimeoutError: No match within `timeout` seconds.
            ThreadlineError: The stream ended first.
        """
        async with asyncio.timeout(timeout):
            while True:
                event = await self._next_event()
                if predicate(event):
                    return event

    # -- internals ------------------------------------------------------------------------------

    def _frame(self, **kind: Any) -> realtime_pb2.ClientFrame:
        # A short counter is unique within the stream, which is all request_id pairing needs.
        return realtime_pb2.ClientFrame(request_id=str(next(self._ids)), **kind)

    def _end_error(self) -> ThreadlineError:
        return self._closed_error or make_error(grpc.StatusCode.CANCELLED, "stream closed")

    def _send(self, frame: realtime_pb2.ClientFrame) -> None:
        if self._ended or self._closing:
            raise self._end_error()
        logger.debug("stream send %s #%s", frame.WhichOneof("kind"), frame.request_id)
        self._outbox.put_nowait(realtime_service_pb2.ConnectRequest(frame=frame))

    async def _request(
        self,
        frame: realtime_pb2.ClientFrame,
        timeout: float | None,
        *,
        client_op_id: str = "",
    ) -> realtime_pb2.ServerFrame:
        request_id = frame.request_id
        waiter: asyncio.Future[realtime_pb2.ServerFrame] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = waiter
        if client_op_id:
            self._op_requests[client_op_id] = request_id
        limit = self._default_timeout if timeout is None else timeout
        try:
            self._send(frame)
            async with asyncio.timeout(limit):
                return await waiter
        except TimeoutError:
            kind = frame.WhichOneof("kind")
            raise make_error(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply to {kind} within {limit:g} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
            if client_op_id:
                self._op_requests.pop(client_op_id, None)

    async def _requests(self) -> AsyncGenerator[realtime_service_pb2.ConnectRequest, None]:
        while True:
            item = await self._outbox.get()
            if item is None:
                # Ending the iterator half-closes the call: the server sees end of input.
                return
            yield item

    async def _next_event(self) -> realtime_pb2.Event:
        while not self._pending_events:
            frame = await self._next_frame()
            if frame is None:
                raise self._end_error()
            if frame.WhichOneof("kind") == "events":
                self._pending_events.extend(frame.events.events)
        return self._pending_events.popleft()

    async def _next_frame(self) -> realtime_pb2.ServerFrame | None:
        if self._pending_events:
            # Events left over from a batch that next_event() only partly consumed.
            batch = realtime_pb2.EventBatch(events=list(self._pending_events))
            self._pending_events.clear()
            return realtime_pb2.ServerFrame(events=batch)
        if self._drained:
            return None
        frame = await self._frames.get()
        if frame is None:
            self._drained = True
        return frame

    def _dispatch(self, frame: realtime_pb2.ServerFrame) -> None:
        kind = frame.WhichOneof("kind")
        logger.debug("stream recv %s #%s", kind, frame.request_id)
        if kind == "welcome":
            if self._welcome_future is not None and not self._welcome_future.done():
                self._welcome_future.set_result(frame.welcome)
        elif kind == "error":
            self._stream_error = frame.error
            # The stream's last word: stop writing and half-close, so the server sends its
            # status at once (it waits up to a second for this before ending the call).
            self._outbox.put_nowait(None)
        waiter = self._pending.get(frame.request_id) if frame.request_id else None
        if waiter is None and kind == "operation_result":
            # Results replayed for pending_op_ids after a resume answer no frame of this stream.
            request_id = self._op_requests.get(frame.operation_result.client_op_id)
            waiter = self._pending.get(request_id) if request_id else None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
        if kind not in _INTERNAL_KINDS:
            self._frames.put_nowait(frame)

    async def _read_loop(self) -> None:
        call = self._call
        if call is None:
            return
        error: ThreadlineError | None = None
        try:
            async for response in call:
                self._dispatch(response.frame)
        except grpc.aio.AioRpcError as exc:
            if not (self._closing and exc.code() == grpc.StatusCode.CANCELLED):
                error = from_rpc_error(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            self._finish(None)
            if task is not None and task.cancelling():
                raise
            # Otherwise grpc.aio raised it because close() cancelled the call locally.
            return
        self._finish(self._final_error(error))

    def _final_error(self, error: ThreadlineError | None) -> ThreadlineError | None:
        hint = self._stream_error
        if hint is None or hint.status.code == 0:
            return error
        framed = from_status_proto(hint.status)
        # The StreamError frame says why in full (ErrorInfo reason) even when the status the
        # call ends with is bare, or when the server ends the call OK right after the frame.
        if error is None or (error.code == framed.code and not error.details):
            error = framed
        if error.retry_after is None and hint.HasField("retry_after"):
            error.retry_after = hint.retry_after.ToTimedelta().total_seconds()
        return error

    def _finish(self, error: ThreadlineError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._closed_error = error
        if error is not None:
            logger.info("stream ended: %s", error)
        failure = self._end_error()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if self._welcome_future is not None and not self._welcome_future.done():
            self._welcome_future.set_exception(failure)
        self._frames.put_nowait(None)
        self._outbox.put_nowait(None)
        self._expiry_changed.set()
        current = asyncio.current_task()
        for task in self._helpers:
            if task is not current:
                task.cancel()
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"threadline-stream-{name}")
        self._helpers.append(task)

    async def _stop_helpers(self) -> None:
        current = asyncio.current_task()
        helpers = [t for t in self._helpers if t is not current]
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)

    async def _heartbeat_loop(self, interval: float) -> None:
        while not self._ended:
            await asyncio.sleep(interval)
            try:
                # Fire and forget: liveness is the server's idle timeout and gRPC keepalive;
                # the Pong is dropped unless someone called ping().
                self._send(self._frame(ping=realtime_pb2.Ping(client_time=_now())))
            except ThreadlineError:
                return

    async def _refresh_loop(self) -> None:
        backoff = Backoff(initial=1.0, maximum=30.0)
        failures = 0
        while not self._ended:
            expires_at = self._token_expires_at
            if expires_at is None:
                # Nothing to refresh until a refresh_auth() call tells us an expiry.
                self._expiry_changed.clear()
                await self._expiry_changed.wait()
                continue
            margin = refresh_margin(expires_at, self._token_issued_at, default=self._margin)
            delay = expires_at - margin - time.time()
            if delay > 0:
                self._expiry_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._expiry_changed.wait()
                continue
            if time.time() >= expires_at:
                # Too late: the server ends the stream (UNAUTHENTICATED) on its own.
                return
            token = await self._tokens.get()
            if token == self._token:
                token = await self._tokens.get(force=True)
            if token == self._token:
                # The provider has nothing newer (e.g. a StaticToken); ask again later rather
                # than resending the same token in a loop.
                await asyncio.sleep(max(1.0, (expires_at - time.time()) / 4))
                continue
            try:
                await self.refresh_auth(token)
                failures = 0
            except ThreadlineError as exc:
                if self.closed:
                    return
                logger.warning("stream token refresh failed: %s", exc)
                await asyncio.sleep(
                    min(backoff.delay(failures), max(0.0, expires_at - time.time()))
                )
                failures += 1


def _expect(frame: realtime_pb2.ServerFrame, kind: str) -> realtime_pb2.ServerFrame:
    actual = frame.WhichOneof("kind")
    if actual == kind:
        return frame
    if actual == "error":
        raise from_status_proto(frame.error.status)
    if actual == "operation_result" and frame.operation_result.WhichOneof("outcome") == "rejected":
        raise from_status_proto(frame.operation_result.rejected)
    raise make_error(grpc.StatusCode.UNKNOWN, f"expected a {kind} reply, got {actual}")
