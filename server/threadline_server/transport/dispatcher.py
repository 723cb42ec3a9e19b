"""One client frame to its answer: the dispatcher shared by Connect, Subscribe and Submit."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from threadline.v1 import errors_pb2
from threadline.v1 import realtime_pb2 as rt
from threadline_server.domain.limits import Budget, RateLimits
from threadline_server.domain.messages import Messaging
from threadline_server.domain.models import Principal
from threadline_server.domain.ports import Store
from threadline_server.domain.threads import Threads
from threadline_server.errors import (
    DomainError,
    InvalidArgument,
    MergeConflict,
    NotFound,
    NotImplementedYet,
    ProtocolViolation,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from threadline_server.observability import Metrics
from threadline_server.realtime.session import StreamSession
from threadline_server.realtime.typing import TypingTracker
from threadline_server.transport import codec
from threadline_server.transport.guard import Authenticator
from threadline_server.transport.status import duration, internal_status, to_status

logger = logging.getLogger(__name__)

_CREATE, _UPDATE, _DELETE = 1, 2, 3
# Frames that change nothing durable: an invalid one is dropped, never the end of a session.
_ADVISORY = ("typing", "ack")


@dataclass(frozen=True, slots=True)
class Fatal:
    """A frame that ends its session, on whichever transport it came: `error` is the status the
    session (and a Submit call carrying the frame) ends with, `frame` its last StreamError."""

    error: DomainError
    frame: bytes


def error_frame(exc: DomainError, *, can_resume: bool) -> bytes:
    """A StreamError frame for `exc`: the stream's last word."""
    retry = getattr(exc, "retry_after", 0.0)
    return codec.frame_bytes(
        rt.ServerFrame(
            error=rt.StreamError(
                status=to_status(exc), retry_after=duration(retry), can_resume=can_resume
            )
        )
    )


class FrameDispatcher:
    """Handles one client frame for a principal; the same code serves Connect and Submit.

    Every frame that writes spends a token of its budget (see `_budget_of`) before any work, so
    a refused one has changed nothing. Pings are capped per stream instead (`max_pings_per_second`;
    0 lifts it) and cost no budget: a heartbeat must never crowd out a send.
    """

    def __init__(
        self,
        auth: Authenticator,
        store: Store,
        threads: Threads,
        messaging: Messaging,
        typing: TypingTracker,
        limits: RateLimits,
        metrics: Metrics | None = None,
        max_pings_per_second: float = 0.0,
    ) -> None:
        self.auth = auth
        self.store = store
        self.threads = threads
        self.messaging = messaging
        self.typing = typing
        self.limits = limits
        self.metrics = metrics
        self.max_pings_per_second = max_pings_per_second

    async def answer(
        self, principal: Principal, session: StreamSession | None, frame: rt.ClientFrame
    ) -> rt.ServerFrame | Fatal | None:
        """`handle`, with the one rule for errors that Connect and Submit share: the reply
        frame; None for no reply (ack, typing, a ping over the cap, an invalid advisory frame);
        or Fatal when the frame ends the session (a bad RefreshAuth, a protocol violation, an
        error no result can carry, a bug)."""
        try:
            return await self.handle(principal, session, frame)
        except (Unauthenticated, ProtocolViolation) as exc:
            return Fatal(exc, error_frame(exc, can_resume=False))
        except DomainError as exc:
            if frame.WhichOneof("kind") in _ADVISORY:
                # Typing and acks change nothing durable; an invalid one (say, typing in a thread
                # the user cannot see) is dropped rather than ending the stream or leaking that
                # the thread exists.
                logger.debug("dropped %s frame: %s", frame.WhichOneof("kind"), exc.reason)
                return None
            reply = rt.ServerFrame(
                request_id=frame.request_id,
                error=rt.StreamError(status=to_status(exc), can_resume=True),
            )
            return Fatal(exc, codec.frame_bytes(reply))
        except Exception as exc:  # a bug must not hang the stream
            status, _ = internal_status(exc)
            return Fatal(
                Unavailable("INTERNAL", status.message),
                codec.frame_bytes(rt.ServerFrame(error=rt.StreamError(status=status))),
            )

    async def handle(
        self, principal: Principal, session: StreamSession | None, frame: rt.ClientFrame
    ) -> rt.ServerFrame | None:
        kind = frame.WhichOneof("kind")
        rid = frame.request_id
        if kind == "ping":
            if session is not None and not session.ping_allowed(
                self.limits.clock(), self.max_pings_per_second
            ):
                # Ignored, not refused: an error frame per excess ping would be the very flood
                # the cap is there to stop. A client pinging at its heartbeat never gets here.
                if self.metrics is not None:
                    self.metrics.pings_dropped.inc()
                return None
            return rt.ServerFrame(
                request_id=rid,
                pong=rt.Pong(
                    client_time=frame.ping.client_time, server_time=codec.ts_epoch(time.time())
                ),
            )
        if kind == "send_message":
            return rt.ServerFrame(
                request_id=rid, operation_result=await self._send(principal, frame)
            )
        if kind == "operation":
            return rt.ServerFrame(
                request_id=rid, operation_result=await self._operation(principal, frame.operation)
            )
        if kind == "ack":
            return None
        if kind == "typing":
            try:
                await self.limits.spend(Budget.TYPING, principal.user_id)
            except RateLimited:
                return None  # advisory: dropped unanswered (the refusal is counted by budget)
            members = await self.store.thread_members(frame.typing.thread_id)
            if principal.user_id not in members:
                raise NotFound("thread", frame.typing.thread_id)
            self.typing.signal(
                frame.typing.thread_id, principal.user_id, frame.typing.active, members
            )
            return None
        if kind == "refresh_auth":
            if session is None:
                raise ProtocolViolation("refresh_auth needs a session_id")
            try:
                await self.limits.spend(Budget.REFRESH_AUTH, principal.user_id)
            except RateLimited as exc:
                # Answered in band like a refused operation, not with a StreamError: the token
                # the stream holds is still good, so the stream goes on and the client retries
                # after RetryInfo.
                return rt.ServerFrame(request_id=rid, operation_result=self._rejected("", exc))
            fresh = await self.auth.verify_refresh(session.principal, frame.refresh_auth.token)
            session.refresh(fresh)
            return rt.ServerFrame(
                request_id=rid,
                auth_refreshed=rt.AuthRefreshed(token_expire_time=codec.ts_epoch(fresh.expires_at)),
            )
        if kind == "hello":
            raise ProtocolViolation("hello is only allowed as the first frame")
        raise ProtocolViolation("empty frame")

    async def _send(self, principal: Principal, frame: rt.ClientFrame) -> rt.OperationResult:
        m = frame.send_message
        try:
            await self.limits.spend(Budget.MESSAGES, principal.user_id)
            outcome = await self.messaging.send(
                principal.user_id,
                client_op_id=m.client_op_id,
                thread_id=m.thread_id,
                text=m.text,
                attachment_ids=list(m.attachment_ids),
                field_prefix="send_message.",
            )
        except DomainError as exc:
            return self._rejected(m.client_op_id, exc)
        return rt.OperationResult(
            client_op_id=m.client_op_id,
            confirmed=codec.snapshot(outcome.message),
            change_seq=outcome.change_seq,
            replayed=outcome.replayed,
        )

    async def _operation(self, principal: Principal, op: rt.Operation) -> rt.OperationResult:
        user = principal.user_id
        try:
            await self.limits.spend(_budget_of(op), user)
            resource = op.WhichOneof("resource")
            if resource == "message" and op.kind == _CREATE:
                outcome = await self.messaging.send(
                    user,
                    client_op_id=op.client_op_id,
                    thread_id=op.message.thread_id,
                    text=op.message.text,
                    attachment_ids=[a.upload_id for a in op.message.attachments],
                    field_prefix="operation.message.",
                )
                return rt.OperationResult(
                    client_op_id=op.client_op_id,
                    confirmed=codec.snapshot(outcome.message),
                    change_seq=outcome.change_seq,
                    replayed=outcome.replayed,
                )
            if resource == "message" and op.kind in (_UPDATE, _DELETE):
                if op.kind == _UPDATE:
                    if set(op.update_mask.paths) - {"text"}:
                        raise InvalidArgument.one(
                            "operation.update_mask", "only `text` of a message can change"
                        )
                    outcome = await self.messaging.edit(
                        user,
                        client_op_id=op.client_op_id,
                        message_id=op.message.id,
                        text=op.message.text,
                        base_version=op.base_version,
                        field_prefix="operation.",
                    )
                else:
                    outcome = await self.messaging.delete(
                        user,
                        client_op_id=op.client_op_id,
                        message_id=op.message.id,
                        field_prefix="operation.",
                    )
                return rt.OperationResult(
                    client_op_id=op.client_op_id,
                    confirmed=codec.snapshot(outcome.message),
                    change_seq=outcome.change_seq,
                    replayed=outcome.replayed,
                )
            if resource == "thread":
                t = op.thread
                if op.kind == _CREATE:
                    thread = await self.threads.create(
                        user,
                        title=t.title,
                        description=t.description,
                        tags=list(t.tags),
                        participant_ids=list(t.participant_ids),
                        client_op_id=op.client_op_id,
                    )
                    return _confirmed(op.client_op_id, codec.snapshot(thread))
                if op.kind == _UPDATE:
                    paths = set(op.update_mask.paths)
                    if paths == {"archived"}:
                        thread = await self.threads.set_archived(
                            user, t.id, t.archived, op.client_op_id
                        )
                    else:
                        values = {p: _thread_field(t, p) for p in paths}
                        thread = await self.threads.merge_update(
                            user,
                            t.id,
                            values,
                            base_version=op.base_version,
                            client_op_id=op.client_op_id,
                        )
                    return _confirmed(op.client_op_id, codec.snapshot(thread))
                if op.kind == _DELETE:
                    await self.threads.delete(user, t.id, op.client_op_id)
                    return _confirmed(op.client_op_id, errors_pb2.ResourceSnapshot())
            if resource == "read_marker" and op.kind == _UPDATE:
                marker = await self.threads.mark_read(
                    user, op.read_marker.thread_id, op.read_marker.read_seq
                )
                return _confirmed(op.client_op_id, codec.snapshot(marker))
            raise NotImplementedYet("this operation is not supported yet")
        except MergeConflict as conflict:
            return rt.OperationResult(
                client_op_id=op.client_op_id,
                conflict=errors_pb2.Conflict(
                    base=codec.snapshot(conflict.base),  # type: ignore[arg-type]
                    server=codec.snapshot(conflict.server),  # type: ignore[arg-type]
                    client=codec.snapshot(conflict.client),  # type: ignore[arg-type]
                    server_version=conflict.server_version,
                    fields=conflict.fields,
                ),
            )
        except DomainError as exc:
            return self._rejected(op.client_op_id, exc)

    def _rejected(self, op_id: str, exc: DomainError) -> rt.OperationResult:
        if self.metrics is not None:
            self.metrics.errors.labels(exc.code).inc()
        return rt.OperationResult(client_op_id=op_id, rejected=to_status(exc))


def _budget_of(op: rt.Operation) -> Budget:
    """The budget an operation spends: by the resource it writes. Anything else (an operation
    this server does not support yet) spends the message budget, as every operation once did."""
    resource = op.WhichOneof("resource")
    if resource == "thread":
        return Budget.THREAD_WRITES
    if resource == "read_marker":
        return Budget.READ_MARKERS
    return Budget.MESSAGES


def _thread_field(t: Any, path: str) -> Any:
    if path == "tags":
        return list(t.tags)
    if path in ("title", "description", "archived"):
        return getattr(t, path)
    return None


def _confirmed(op_id: str, snapshot: Any) -> rt.OperationResult:
    return rt.OperationResult(client_op_id=op_id, confirmed=snapshot)
