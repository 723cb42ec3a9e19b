"""RealtimeService: Connect, Subscribe and Submit share one frame dispatcher (dispatcher.py) and
one writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from cachetools import TTLCache

from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline_server.config import Settings
from threadline_server.domain.batching import Coalescer
from threadline_server.domain.models import Event, EventKind, PresenceState, Principal
from threadline_server.domain.ports import ReplayPage, Store
from threadline_server.errors import (
    DeadlineExceeded,
    NotFound,
    ProtocolViolation,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from threadline_server.observability import bind_log_context
from threadline_server.realtime.broker import LocalBroker
from threadline_server.realtime.presence import PresenceTracker
from threadline_server.realtime.session import (
    Close,
    EventBytes,
    SessionInfo,
    StreamSession,
    Turn,
)
from threadline_server.realtime.typing import TypingTracker
from threadline_server.transport import codec, compression, frames
from threadline_server.transport.dispatcher import Fatal, FrameDispatcher, error_frame
from threadline_server.transport.guard import Authenticator, abort, bind_request, hung_up
from threadline_server.transport.status import duration

logger = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]

_IN_FLIGHT_PER_STREAM = 64
_OPERATIONS = ("send_message", "operation")
# After a stream's final StreamError frame, how long the server waits for the client to
# half-close before it sends the status anyway (see `_serve`).
_CLOSE_WAIT_S = 1.0


class RealtimeServicer:
    """The stream RPCs. Not guarded by the class decorator: streams authenticate at open and
    then report per-operation errors in frames; only stream-fatal errors end the call."""

    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        store: Store,
        broker: LocalBroker,
        dispatcher: FrameDispatcher,
        typing: TypingTracker,
        presence: PresenceTracker,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.store = store
        self.broker = broker
        self.dispatcher = dispatcher
        self.typing = typing
        self.presence = presence
        self.draining = False
        self.close_wait_s = _CLOSE_WAIT_S
        # The watchdog's clocks: monotonic for idle time (also stamped on each session's
        # activity), wall time for token expiry. A test sets its own before opening streams.
        self.clock: Callable[[], float] = time.monotonic
        self.wall_clock: Callable[[], float] = time.time
        # Every stream reads the resume point after subscribing. Streams opening together share
        # a read that starts after each of them subscribed (see Coalescer), which keeps the
        # no-gap rule below and costs one query per batch in a reconnect storm.
        self._resume_point: Coalescer[None, tuple[str, int, int]] = Coalescer(
            self._read_resume_point, missing=_never
        )
        # Replay pages of streams resuming together are read in one transaction. A batch holds
        # its pages (each up to a frame of payload) until the last is read: 20 bounds that
        # memory as the pool of 20 read connections bounded it before.
        self._replay: Coalescer[ReplayPage, tuple[list[Event], int | None]] = Coalescer(
            store.replay_many, missing=lambda _page: ([], None), max_batch=20
        )

    # ---- RPCs ---------------------------------------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[rs.ConnectRequest], context: Ctx
    ) -> None:
        bind_request(context, "Connect")
        try:
            principal = await self.auth.authenticate(context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary
            # Refused, but only once the Hello that every client writes at once has arrived:
            # ending the call while that write is in flight makes grpc's Python client report
            # INTERNAL in place of this status (grpc/grpc#36066).
            with contextlib.suppress(Exception):
                await self._first_frame(request_iterator)
            await abort(context, exc)
            return
        try:
            first = await self._first_frame(request_iterator)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary
            await abort(context, exc)
            return
        await self._send(
            context, lambda out: self._serve(context, out, principal, first, request_iterator)
        )

    async def Subscribe(self, request: rs.SubscribeRequest, context: Ctx) -> None:
        bind_request(context, "Subscribe")
        try:
            principal = await self.auth.authenticate(context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary
            await abort(context, exc)
            return
        first = rt.ClientFrame(hello=request.hello)
        await self._send(context, lambda out: self._serve(context, out, principal, first, None))

    async def Submit(self, request: rs.SubmitRequest, context: Ctx) -> rs.SubmitResponse:
        """One frame of a session, as if read from its Connect stream: the same dispatcher and
        the same rules (see `_submitted`). Without a session id, a stateless frame."""
        bind_request(context, "Submit")
        # The call's place among its session's frames, taken before anything awaits.
        session = self.broker.session(request.session_id) if request.session_id else None
        turn = session.submits.arrive() if session is not None else None
        try:
            principal = await self.auth.authenticate(context)
            if request.session_id and (session is None or session.user_id != principal.user_id):
                raise NotFound("session", request.session_id)
            reply = await self._submitted(principal, session, request.frame, turn)
            if isinstance(reply, Fatal):
                await abort(context, reply.error)
                return rs.SubmitResponse()  # only if the client hung up: grpc discards it
            response = rs.SubmitResponse(frame=reply)
            compression.send_plain_if_small(
                context, response.ByteSize(), self.settings.limits.compression_threshold_bytes
            )
            return response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the boundary
            await abort(context, exc)
            return rs.SubmitResponse()  # only if the client hung up: grpc discards it
        finally:
            if turn is not None:
                turn.done()

    async def _submitted(
        self,
        principal: Principal,
        session: StreamSession | None,
        frame: rt.ClientFrame,
        turn: Turn | None,
    ) -> rt.ServerFrame | Fatal | None:
        """A Submit's frame, handled as `_read` handles one from Connect: in its session's
        arrival order, operations started in that order and then awaited (so pipelined sends
        may share a group commit), counted as activity; a frame that would end a Connect stream
        ends the session (its StreamError frame on Subscribe, then the status) and is that
        status here too. A session that has said its last word takes nothing more."""
        if session is not None and turn is not None:  # (both or neither)
            await turn.wait()
            if session.closing is not None:
                raise NotFound("session", session.session_id)  # ended: frames are ignored
            session.touch()
        if turn is not None and frame.WhichOneof("kind") in _OPERATIONS:
            task = asyncio.create_task(self.dispatcher.answer(principal, session, frame))
            await asyncio.sleep(0)  # it runs to its first wait (queued for commit): started
            turn.done()
            reply = await asyncio.shield(task)  # a hang-up does not cancel a started operation
        else:
            reply = await self.dispatcher.answer(principal, session, frame)
        if isinstance(reply, Fatal) and session is not None:
            session.close(reply.error, reply.frame)
        return reply

    # ---- the shared session machinery ---------------------------------------------------

    async def _send(self, context: Ctx, serve: Callable[[Writer], Awaitable[None]]) -> None:
        """Runs `serve`, which writes the stream's frames itself (gzip, when the client accepts
        it, from the threshold up: replay pages, long texts, busy batches), so that a write
        failing because the client hung up is seen there: a normal end, handled quietly, with
        the session cleaned up at once."""
        try:
            await serve(Writer(context, self.settings.limits.compression_threshold_bytes))
        except grpc.aio.InternalError:  # a failed batch (ExecuteBatchError): the call is gone
            await hung_up(context)

    async def _first_frame(self, requests: AsyncIterator[rs.ConnectRequest]) -> rt.ClientFrame:
        timeout = self.settings.realtime.hello_timeout_s
        try:
            async with asyncio.timeout(timeout):
                first = await anext(requests)
        except TimeoutError as exc:
            raise DeadlineExceeded("HELLO_TIMEOUT", "no hello frame received in time") from exc
        except StopAsyncIteration as exc:
            raise ProtocolViolation("stream closed before hello") from exc
        if first.frame.WhichOneof("kind") != "hello":
            raise ProtocolViolation("the first frame must be hello")
        return first.frame

    async def _serve(
        self,
        context: Ctx,
        out: Writer,
        principal: Principal,
        hello_frame: rt.ClientFrame,
        requests: AsyncIterator[rs.ConnectRequest] | None,
    ) -> None:
        if self.draining:
            await abort(context, Unavailable("SERVER_DRAINING", "server is shutting down"))
            return
        rts = self.settings.realtime
        hello = hello_frame.hello
        info = SessionInfo(
            kind="connect" if requests is not None else "subscribe",
            peer=context.peer() or "",
            client_name=hello.client_name[:64],
            client_version=hello.client_version[:64],
        )
        session = StreamSession(
            principal, max_frames=rts.queue_max_frames, info=info, clock=self.clock
        )
        bind_log_context(session=session.session_id)
        session.overflow = _slow_consumer
        # Subscribe before reading the cursor: an event committed meanwhile is either at or below
        # the cursor (and dropped as stale) or above it (and delivered): no gap, no duplicate.
        self.broker.subscribe(session, _replaced_frame)
        self.presence.connected(session.user_id)
        reader: asyncio.Task[None] | None = None
        live = True
        try:
            epoch, cursor, pruned = await self._resume_point(None)
            session.min_change_seq = cursor
            resuming = hello.HasField("sync_state")
            await out.write(
                codec.frame_bytes(self._welcome(session, epoch, hello_frame.request_id, resuming))
            )
            if resuming:
                async for frame in self._resume(session, hello.sync_state, epoch, cursor, pruned):
                    await out.write(frame)
            else:
                await out.write(
                    codec.frame_bytes(
                        rt.ServerFrame(
                            sync_complete=rt.SyncComplete(change_seq=cursor, epoch=epoch)
                        )
                    )
                )
            online = await self.presence.snapshot(session.user_id)
            presence = [_presence_event(p) for p in online]
            for group in frames.chunk(presence, frames.budget(self.settings)):
                await out.write(codec.events_frame_bytes(group))
            if requests is not None:
                reader = asyncio.create_task(self._read(session, requests))
            await self._write(session, out)
            closing = session.closing
            if closing is not None and closing.error is not None:
                metrics = self.dispatcher.metrics
                if metrics is not None:
                    metrics.errors.labels(closing.error.code).inc()
                    if isinstance(closing.error, _SlowConsumer):
                        metrics.slow_consumers.inc()
                self._release(session)  # the stream has said its last word
                live = False
                if reader is not None:
                    # grpc's Python client reports INTERNAL in place of the status when one of
                    # its writes is still in flight as the call ends (grpc/grpc#36066). So the
                    # status goes once the client has half-closed, as the StreamError frame
                    # just sent asks it to; a client that does not is ended after a short wait,
                    # in which what it still sends is read (so those writes complete) and
                    # dropped (see _read).
                    await asyncio.wait({reader}, timeout=self.close_wait_s)
                await abort(context, closing.error)
        finally:
            if live:
                self._release(session)
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def close(self) -> None:
        """After the server stopped: no resume-point read may outlive it."""
        await self._resume_point.close()
        await self._replay.close()

    async def _read_resume_point(self, _keys: Sequence[None]) -> dict[None, tuple[str, int, int]]:
        return {None: await self.store.resume_point()}

    def _release(self, session: StreamSession) -> None:
        self.broker.unsubscribe(session)
        self.presence.disconnected(session.user_id, session.last_activity_wall())
        if not self.broker.online(session.user_id):
            self.typing.clear_user(session.user_id)

    async def _resume(
        self, session: StreamSession, state: rt.SyncState, epoch: str, cursor: int, pruned: int
    ) -> AsyncIterator[bytes]:
        """Replays what the client missed, page by page, then SyncComplete; or ResyncRequired
        when that cannot be done exactly (never a partial or silent recovery)."""
        reason = rt.RESYNC_REASON_UNSPECIFIED
        if state.epoch != epoch:
            reason = rt.RESYNC_REASON_EPOCH_CHANGED
        elif state.change_seq > cursor:
            reason = rt.RESYNC_REASON_CURSOR_AHEAD
        elif state.change_seq < pruned:
            reason = rt.RESYNC_REASON_CURSOR_TOO_OLD
        if reason != rt.RESYNC_REASON_UNSPECIFIED:
            yield codec.frame_bytes(
                rt.ServerFrame(
                    resync_required=rt.ResyncRequired(reason=reason, epoch=epoch, change_seq=cursor)
                )
            )
            yield codec.frame_bytes(
                rt.ServerFrame(
                    sync_complete=rt.SyncComplete(
                        change_seq=cursor, epoch=epoch, was_recovering=True, recovered=False
                    )
                )
            )
            return
        after, count = state.change_seq, 0
        page = self.settings.realtime.replay_batch_size
        room = frames.budget(self.settings)
        while after < cursor:
            events, last = await self._replay(
                ReplayPage(session.user_id, after, cursor, page, room)
            )
            if last is None:
                break
            count += len(events)
            encoded = [codec.encode_event(e, for_author=True) for e in events]
            for group in frames.chunk(encoded, room):
                yield codec.events_frame_bytes(group, replay=True)
            after = last
        for op_id, stored, resource in await self.store.stored_results(
            session.user_id, list(state.pending_op_ids)
        ):
            snapshot = codec.snapshot(resource) if resource is not None else None
            yield codec.frame_bytes(
                rt.ServerFrame(
                    operation_result=rt.OperationResult(
                        client_op_id=op_id,
                        confirmed=snapshot,
                        change_seq=stored.change_seq,
                        replayed=True,
                    )
                )
            )
        yield codec.frame_bytes(
            rt.ServerFrame(
                sync_complete=rt.SyncComplete(
                    change_seq=cursor,
                    epoch=epoch,
                    was_recovering=True,
                    recovered=True,
                    event_count=count,
                )
            )
        )

    def _welcome(
        self, session: StreamSession, epoch: str, request_id: str, resuming: bool
    ) -> rt.ServerFrame:
        s = self.settings
        return rt.ServerFrame(
            request_id=request_id,
            welcome=rt.Welcome(
                session_id=session.session_id,
                epoch=epoch,
                heartbeat_interval=duration(s.realtime.heartbeat_interval_s),
                idle_timeout=duration(s.realtime.idle_timeout_s),
                token_expire_time=codec.ts_epoch(session.principal.expires_at),
                limits=rt.Limits(
                    max_message_bytes=s.limits.max_message_bytes,
                    max_frame_bytes=s.server.max_receive_message_bytes,
                    operations_per_minute=s.limits.operations_per_minute,
                    max_connections_per_user=s.realtime.max_connections_per_user,
                    max_attachments_per_message=s.limits.max_attachments,
                    replay_batch_size=s.realtime.replay_batch_size,
                    compression_threshold_bytes=s.limits.compression_threshold_bytes,
                ),
                server_time=codec.ts_epoch(time.time()),
                user_id=session.user_id,
                resuming=resuming,
            ),
        )

    async def _read(
        self, session: StreamSession, requests: AsyncIterator[rs.ConnectRequest]
    ) -> None:
        """Reads client frames. Operations run as tasks so that pipelined sends from one stream
        can share a group commit; their submit order (and so per-thread order) is preserved
        because each task enqueues before its first await."""
        limit = asyncio.Semaphore(_IN_FLIGHT_PER_STREAM)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                if session.closing is not None:
                    # Ending: read on, so the client's last writes complete, but act on
                    # nothing (the client retries its pending operations by id on resume).
                    continue
                session.touch()
                frame = request.frame
                if frame.WhichOneof("kind") in _OPERATIONS:
                    await limit.acquire()
                    task = asyncio.create_task(self._dispatch(session, frame))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _t: limit.release())
                else:
                    await self._dispatch(session, frame)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            session.close(None)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        except Exception as exc:  # a broken request stream ends the session
            logger.debug("stream reader ended: %s", type(exc).__name__)
            session.close(None)

    async def _dispatch(self, session: StreamSession, frame: rt.ClientFrame) -> None:
        reply = await self.dispatcher.answer(session.principal, session, frame)
        if isinstance(reply, Fatal):
            session.close(reply.error, reply.frame)
        elif reply is not None:
            session.send(codec.frame_bytes(reply))

    async def _write(self, session: StreamSession, out: Writer) -> None:
        """Drains the session queue, batching consecutive events into one frame, until the
        session closes. Idle time and token expiry are watched from here on by `watch_forever`.
        The hot loop of every delivery: it writes directly (no generator between it and grpc),
        and a lone event's frame is the one its broker built once for every recipient."""
        rts = self.settings.realtime
        room = frames.budget(self.settings)  # one event always fits (frames.check_limits)
        session.watched = True
        pending: bytes | Close | None = None
        while True:
            item = pending if pending is not None else session.next_nowait()
            pending = None
            if item is None:
                item = await session.next()
            if isinstance(item, Close):
                if item.final_frame is not None:
                    await out.write(item.final_frame)
                return
            if isinstance(item, EventBytes):
                batch = [] if session.stale(item) else [item]
                size = frames.item_size(len(item))
                while len(batch) < rts.batch_max_events:
                    nxt = session.next_nowait()
                    if not isinstance(nxt, EventBytes) or size + frames.item_size(len(nxt)) > room:
                        pending = nxt
                        break
                    if not session.stale(nxt):
                        batch.append(nxt)
                        size += frames.item_size(len(nxt))
                if batch:
                    await out.write(codec.events_frame_bytes(batch))
                continue
            await out.write(item)

    async def watch_forever(self, every_s: float = 1.0) -> None:
        """One task checks every live stream each second, rather than a timer per stream: an
        idle stream then costs nothing until it is due (1,000 idle streams took 11% of a core
        with a wake-up per stream per second)."""
        while True:
            await asyncio.sleep(every_s)
            self.sweep()

    def sweep(self) -> None:
        """One round of the watchdog: ends each live stream that has been idle too long or
        whose token expired (beyond the grace) without a refresh."""
        grace = self.settings.auth.leeway_s + self.settings.auth.refresh_grace_s
        idle_timeout = self.settings.realtime.idle_timeout_s
        now = self.wall_clock()
        for session in self.broker.all_sessions():
            if not session.watched or session.closing is not None:
                continue
            if now > session.principal.expires_at + grace:
                exc = Unauthenticated("TOKEN_EXPIRED", "token expired without refresh")
                session.close(exc, error_frame(exc, can_resume=False))
            elif session.idle_for() > idle_timeout:
                idle = Unavailable("IDLE_TIMEOUT", "no frames within the idle timeout", 0)
                session.close(idle, error_frame(idle, can_resume=True))

    def drain(self, grace_s: float | None = None) -> None:
        """SIGTERM: tell every stream to reconnect elsewhere and resume. Each stream then ends
        with its status as soon as its client half-closes, or after `close_wait_s`: within
        half of `grace_s` when given, so that every status is sent before the server's grace
        period ends and it cancels what is left."""
        if grace_s is not None:
            self.close_wait_s = min(self.close_wait_s, grace_s / 2)
        self.draining = True
        for session in self.broker.all_sessions():
            exc = Unavailable("SERVER_DRAINING", "server is shutting down; reconnect", 1.0)
            session.close(exc, error_frame(exc, can_resume=True))


class _SlowConsumer(RateLimited):
    reason = "SLOW_CONSUMER"

    def __init__(self) -> None:
        super().__init__(0.0, "stream fell behind; resume from your cursor")


# A peer's presence as a snapshot event names no recipient, so its bytes serve every stream
# that connects within a second while the state holds: in a reconnect storm each peer's
# presence was encoded once per stream that saw it (a sixth of a connect's CPU).
_PRESENCE_SNAPSHOTS: TTLCache[PresenceState, EventBytes] = TTLCache(maxsize=8192, ttl=1.0)


def _presence_event(state: PresenceState) -> EventBytes:
    cached = _PRESENCE_SNAPSHOTS.get(state)
    if cached is None:
        event = Event(0, EventKind.PRESENCE, "", 0, 0, state.user_id, datetime.now(UTC), state)
        cached = _PRESENCE_SNAPSHOTS[state] = codec.encode_event(event, False)
    return cached


_SLOW_CONSUMER_FRAME = codec.frame_bytes(
    rt.ServerFrame(resync_required=rt.ResyncRequired(reason=rt.RESYNC_REASON_SLOW_CONSUMER))
)


def _slow_consumer() -> tuple[_SlowConsumer, bytes]:
    """A stream's overflow: made when one happens, so that idle streams hold nothing for it."""
    return _SlowConsumer(), _SLOW_CONSUMER_FRAME


def _never(_key: None) -> tuple[str, int, int]:
    raise AssertionError("the resume point is always read")


def _replaced_frame() -> bytes:
    exc = Unavailable("REPLACED", "replaced by a newer connection", retry_after=0)
    return error_frame(exc, can_resume=True)


def _passthrough(message: Any) -> bytes:
    """Frames arrive pre-encoded (events are serialized once for all recipients)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class Writer:
    """Writes one stream's pre-encoded frames, each compressed only from the threshold up."""

    __slots__ = ("_context", "_threshold")

    def __init__(self, context: Ctx, threshold: int) -> None:
        self._context = context
        self._threshold = threshold

    async def write(self, frame: bytes) -> None:
        compression.send_plain_if_small(self._context, len(frame), self._threshold)
        await self._context.write(frame)


def add_realtime_servicer(server: grpc.aio.Server, servicer: RealtimeServicer) -> None:
    """Like the generated add_…_to_server, but the stream responses may be raw bytes."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Connect": grpc.stream_stream_rpc_method_handler(
            servicer.Connect,
            request_deserializer=rs.ConnectRequest.FromString,
            response_serializer=_passthrough,
        ),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe,
            request_deserializer=rs.SubscribeRequest.FromString,
            response_serializer=_passthrough,
        ),
        "Submit": grpc.unary_unary_rpc_method_handler(
            servicer.Submit,
            request_deserializer=rs.SubmitRequest.FromString,
            response_serializer=rs.SubmitResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("threadline.v1.RealtimeService", handlers),)
    )
