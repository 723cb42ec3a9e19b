"""A long-lived, self-healing realtime session that keeps a `ClientStore` in sync.

`ThreadlineSession` wraps a `ThreadlineClient` and keeps one `RealtimeStream` open:

* **Connecting.** A fresh session (no usable cursor) sends Hello without a sync state, then loads
  a snapshot with unary RPCs (`load_snapshot`) once SyncComplete names the cursor it covers; live
  events arriving meanwhile wait in the stream's buffer and are applied on top (the version rule
  makes the overlap harmless). A session with a cursor resumes: the server replays what was
  missed and answers SyncComplete{recovered}. ResyncRequired, or a resume the server could not
  honour, reloads the snapshot instead.
* **Reconnecting.** When the stream ends (server restart, UNAVAILABLE, idle, slow consumer,
  network), the session waits a capped exponential backoff with full jitter (honouring the
  server's `retry_after`) and resumes from its cursor. Heartbeats and token refresh are the
  stream's own (`RealtimeStream`); tokens come from the client's token provider, and an
  UNAUTHENTICATED end forces a fresh token before the next attempt.
* **Operations.** `send`, `edit`, `delete`, `update_thread`, `archive` and `mark_read` change the
  store at once (optimistic) and queue an operation. Once online, queued operations are sent one
  at a time in their original order with their original `client_op_id`s; an operation whose
  outcome is unknown (the stream died, a deadline passed) is simply sent again with the same id
  after reconnecting, and the server applies it once. Retryable rejections (rate limits,
  backend unavailable) are retried after the server's delay.
* **Conflicts.** A concurrent edit the server could not merge comes back as a conflict. The
  session calls `resolver(conflict)`; the default, `accept_server`, keeps the server's value
  (the local change is dropped, and the store already shows the server's copy). A resolver
  that returns field values (`{"text": ...}` for messages, thread fields for threads) has them
  resubmitted as a new UPDATE with `base_version = conflict.server_version` and a new op id.

Connection states (`ConnectionState`): `connecting` (first attempt), `syncing` (stream accepted,
catching up), `online`, `reconnecting` (after the stream ended), `offline` (stopped, or given up
after repeated non-transient errors such as a token the provider cannot renew).
"""

# `timeout=` arguments follow the SDK's convention (see client.py).
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import grpc

from threadline.v1 import message_pb2, realtime_pb2, thread_service_pb2
from threadline_client.auth import TokenProvider
from threadline_client.backoff import Backoff
from threadline_client.client import ThreadlineClient
from threadline_client.errors import (
    DeadlineExceeded,
    ThreadlineError,
    from_status_proto,
    is_retryable,
    make_error,
)
from threadline_client.state import (
    Change,
    ChangeKind,
    ClientState,
    ClientStore,
    ConflictInfo,
    ConnectionState,
    OpError,
    OpKind,
    OpOutcome,
    OpStatus,
    PendingOp,
    Snapshot,
    ThreadView,
)
from threadline_client.stream import RealtimeStream

__all__ = [
    "DEFAULT_HISTORY",
    "Resolver",
    "ThreadlineSession",
    "accept_server",
    "load_snapshot",
]

logger = logging.getLogger(__name__)

DEFAULT_HISTORY = 50
"""Messages loaded per thread in a snapshot (the newest ones)."""

Resolution = Mapping[str, Any] | None
Resolver = Callable[[ConflictInfo], Resolution | Awaitable[Resolution]]
"""Decides a conflict: None keeps the server's value; field values are resubmitted."""

# Stream ends that retrying the same way cannot fix; after a few in a row the session goes
# offline instead of hammering the server (transient ends are retried forever).
_NON_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# The server closed this stream for a newer one of the same user: reconnecting would close
# that one in turn, so two sessions would evict each other forever.
_FINAL_REASONS = frozenset({"REPLACED"})
_MAX_OUTCOMES = 1024  # finished outcomes remembered for wait_op() calls that come late


def accept_server(conflict: ConflictInfo) -> None:
    """The default conflict resolver: keeps the server's value and drops the local change.

    The store has already applied the server's copy when a resolver runs, so returning None
    leaves the UI showing the server state.
    """
    return


async def load_snapshot(
    client: ThreadlineClient,
    *,
    history: int = DEFAULT_HISTORY,
    concurrency: int = 4,
    me: bool = True,
) -> Snapshot:
    """Loads the caller's threads (active and archived) and their recent messages.

    Args:
        client: The client.
        history: Newest messages to load per thread (0 loads none).
        concurrency: Threads whose messages are fetched at the same time.
        me: Also load the caller's profile and preferences.
    """
    summaries = [s async for s in client.iter_threads(thread_service_pb2.THREAD_FILTER_ALL)]
    messages: dict[str, list[message_pb2.Message]] = {}
    gate = asyncio.Semaphore(max(1, concurrency))

    async def recent(thread_id: str) -> None:
        async with gate:
            page = await client.list_messages(
                thread_id,
                thread_service_pb2.ListMessagesRequest.DIRECTION_BACKWARD,
                page_size=history,
            )
        messages[thread_id] = sorted(page.messages, key=lambda m: m.seq)

    if history > 0:
        # gather, not TaskGroup: callers catch ThreadlineError, not an ExceptionGroup of them.
        outcomes = await asyncio.gather(
            *(recent(s.thread.id) for s in summaries if s.thread.last_seq),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
    profile = await client.get_me() if me else None
    return Snapshot(summaries, messages, profile)


@dataclass(slots=True)
class _StreamEnd:
    error: ThreadlineError | None
    retry_after: float | None
    online_for: float


class ThreadlineSession:
    """Keeps a `ClientStore` in sync with the server over a self-healing realtime stream.

    Use `await ThreadlineSession.connect(target, token)` (which owns its client) or wrap an
    existing client and `await session.start()`. `stop()` pauses it (state, cursor and queued
    operations stay; `start()` resumes); `close()` (or leaving `async with`) also closes an
    owned client.

    Args:
        client: The client to use.
        store: The store to keep in sync; a new one when None.
        resolver: Conflict resolver (default `accept_server`).
        backoff: Reconnect and retry delays (default: 0.5 s growing to 30 s, full jitter).
        history: Messages loaded per thread in snapshots.
        stable_after: Seconds online after which a later disconnect starts backoff afresh.
        max_op_attempts: Sends of an operation answered with retryable rejections before it
            is failed.
        max_final_failures: Consecutive non-transient stream failures (e.g. a token the
            provider cannot renew) before going offline.
        owns_client: Close the client in `close()`.
    """

    def __init__(
        self,
        client: ThreadlineClient,
        *,
        store: ClientStore | None = None,
        resolver: Resolver = accept_server,
        backoff: Backoff | None = None,
        history: int = DEFAULT_HISTORY,
        stable_after: float = 10.0,
        max_op_attempts: int = 8,
        max_final_failures: int = 3,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.store = store or ClientStore()
        self.resolver = resolver
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self.history = history
        self.stable_after = stable_after
        self.max_op_attempts = max_op_attempts
        self.max_final_failures = max_final_failures
        self._owns_client = owns_client
        self._run_task: asyncio.Task[None] | None = None
        self._stream: RealtimeStream | None = None
        self._stopping = False
        self._ops_ready = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Future[OpOutcome]]] = {}
        self._outcomes: OrderedDict[str, OpOutcome] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.store.subscribe(self._on_change)
        self.last_error: ThreadlineError | None = None
        """Why the stream last ended (None after a clean end)."""

    @classmethod
    async def connect(
        cls,
        target: str,
        token: TokenProvider | str,
        *,
        backoff: Backoff | None = None,
        client_options: Mapping[str, Any] | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> ThreadlineSession:
        """Creates a client and a session that owns it, and (by default) starts the session.

        The channel's own reconnect backoff is aligned with the session's (gRPC's default grows
        to two minutes, which would hold a reconnect back long after the server is back).

        Args:
            target: The server address.
            token: A token, or a provider called whenever a fresh token is needed.
            backoff: See the class.
            client_options: Extra channel options.
            start: Start the session before returning (without waiting to be online).
            **kwargs: Other `ThreadlineSession` arguments.
        """
        policy = backoff or Backoff(initial=0.5, maximum=30.0)
        options: dict[str, Any] = {
            "grpc.initial_reconnect_backoff_ms": int(policy.initial * 1000),
            "grpc.min_reconnect_backoff_ms": int(policy.initial * 1000),
            "grpc.max_reconnect_backoff_ms": int(policy.maximum * 1000),
        }
        options.update(client_options or {})
        client = ThreadlineClient(target, token, options=options.items())
        session = cls(client, backoff=policy, owns_client=True, **kwargs)
        if start:
            await session.start()
        return session

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The store's state."""
        return self.store.state

    @property
    def connection(self) -> ConnectionState:
        """The current connection state."""
        return self.store.state.connection

    @property
    def stream(self) -> RealtimeStream | None:
        """The current stream, if connected."""
        return self._stream

    async def start(self) -> None:
        """Starts connecting in the background; returns at once (see `wait_connection`)."""
        if self._run_task is not None and not self._run_task.done():
            return
        self._stopping = False
        self._run_task = asyncio.create_task(self._run(), name="threadline-session")

    async def stop(self) -> None:
        """Closes the stream and stops reconnecting; pending operations stay queued.

        The store keeps its state and cursor: a later `start()` resumes from it.
        """
        self._stopping = True
        task = self._run_task
        self._run_task = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for helper in list(self._tasks):
            helper.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.set_connection(ConnectionState.OFFLINE)

    async def close(self) -> None:
        """Stops the session and closes the client if the session owns it (see `connect`)."""
        await self.stop()
        if self._owns_client:
            await self.client.close()

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

    async def wait_until(
        self, predicate: Callable[[ClientState], bool], timeout: float = 10.0
    ) -> None:
        """Waits until `predicate(state)` holds, checking after every change.

        Raises:
            TimeoutError: It did not hold within `timeout` seconds.
        """
        if predicate(self.state):
            return
        done = asyncio.Event()

        def check(_: Change) -> None:
            if predicate(self.state):
                done.set()

        unsubscribe = self.store.subscribe(check)
        try:
            async with asyncio.timeout(timeout):
                await done.wait()
        finally:
            unsubscribe()

    async def wait_connection(
        self, connection: ConnectionState = ConnectionState.ONLINE, timeout: float = 10.0
    ) -> None:
        """Waits until the connection state is `connection`.

        Raises:
            TimeoutError: Not reached within `timeout` seconds.
        """
        await self.wait_until(lambda s: s.connection is connection, timeout)

    async def wait_op(self, op_id: str, timeout: float | None = 10.0) -> OpOutcome:
        """Waits for an operation's outcome (confirmed, rejected or conflict).

        Args:
            op_id: The operation's id (a send's `local_id` is its op id).
            timeout: Seconds to wait; None waits for ever.

        Raises:
            TimeoutError: No outcome within `timeout`.
        """
        known = self._outcomes.get(op_id)
        if known is not None:
            return known
        waiter: asyncio.Future[OpOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(op_id, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            waiters = self._waiters.get(op_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(op_id, None)

    # -- optimistic operations ------------------------------------------------------------------

    def send(self, thread_id: str, text: str, attachment_ids: Sequence[str] = ()) -> str:
        """Shows a message as pending at once and queues it; returns its stable `local_id`.

        The `local_id` is also the operation id (for `wait_op` and `retry`).

        Args:
            thread_id: The thread.
            text: The text.
            attachment_ids: Completed uploads to attach (`client.complete_upload` first).
        """
        return self.store.queue_send(thread_id, text, attachment_ids=attachment_ids).local_id

    def edit(self, message_id: str, text: str) -> str:
        """Shows an edit at once and queues it; returns the op id.

        Args:
            message_id: The message's id or local id (a confirmed message).
            text: The new text.

        Raises:
            KeyError: Unknown message.
            ValueError: The message's send is still pending.
        """
        return self.store.queue_edit(message_id, text).op_id

    def delete(self, message_id: str) -> str:
        """Shows a message as deleted at once and queues the delete; returns the op id."""
        return self.store.queue_delete(message_id).op_id

    def update_thread(self, thread_id: str, **fields: Any) -> str:
        """Shows new thread fields at once and queues the update; returns the op id.

        Args:
            thread_id: The thread.
            **fields: `title`, `description`, `tags` and/or `archived`.
        """
        return self.store.queue_thread_update(thread_id, fields).op_id

    def archive(self, thread_id: str, archived: bool = True) -> str:
        """Archives (or unarchives) a thread optimistically; returns the op id."""
        return self.store.queue_thread_update(thread_id, {"archived": archived}).op_id

    def mark_read(self, thread_id: str, seq: int | None = None) -> str | None:
        """Moves the read marker forward optimistically; returns the op id (None: no move).

        Args:
            thread_id: The thread.
            seq: The highest sequence number read; the thread's `last_seq` when None.
        """
        if seq is None:
            view = self.store.thread(thread_id)
            if view is None:
                raise KeyError(f"unknown thread {thread_id!r}")
            seq = view.last_seq
        op = self.store.queue_mark_read(thread_id, seq)
        return op.op_id if op is not None else None

    def retry(self, local_id: str) -> str:
        """Sends a failed operation again with its original op id; returns that id."""
        self._outcomes.pop(local_id, None)
        return self.store.retry(local_id).op_id

    def set_active_thread(self, thread_id: str | None) -> None:
        """Sets the thread the user has open (`state.ui.active_thread`)."""
        self.store.set_active_thread(thread_id)

    async def create_thread(
        self,
        title: str,
        participant_ids: Iterable[str] = (),
        *,
        description: str = "",
        tags: Iterable[str] = (),
        timeout: float | None = 30.0,
    ) -> ThreadView:
        """Creates a thread through the stream and waits until it is confirmed.

        Queued like every operation (so it survives a reconnect with its op id), but not shown
        before the server confirms it: the thread id is the server's to choose.

        Raises:
            ThreadlineError: The server rejected it.
            TimeoutError: No outcome within `timeout`.
        """
        op = self.store.queue_create_thread(
            title, participant_ids, description=description, tags=tags
        )
        outcome = await self.wait_op(op.op_id, timeout)
        if outcome.status is not OpStatus.CONFIRMED or outcome.resource is None:
            error = outcome.error or OpError("UNKNOWN", None, "thread not created")
            raise _as_exception(error)
        thread_id = outcome.resource.thread.id
        view = self.store.thread(thread_id)
        if view is None:
            raise _as_exception(OpError("NOT_FOUND", None, "thread not visible"))
        return view

    async def load_more(self, thread_id: str, page_size: int | None = None) -> int:
        """Loads older messages of a thread (before the oldest known); returns how many."""
        items = self.state.messages.by_thread.get(thread_id, [])
        known = [m.seq for m in items if m.server is not None]
        oldest = min(known) if known else 0
        if known and oldest <= 1:
            return 0
        key = f"history:{thread_id}"
        self.store.set_loading(key, True)
        try:
            page = await self.client.list_messages(
                thread_id,
                thread_service_pb2.ListMessagesRequest.DIRECTION_BACKWARD,
                page_size=page_size or self.history,
                start_seq=oldest,
            )
        finally:
            self.store.set_loading(key, False)
        self.store.apply_history(thread_id, page.messages)
        return len(page.messages)

    # -- the connection loop --------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        final_failures = 0
        first = True
        try:
            while not self._stopping:
                self.store.set_connection(
                    ConnectionState.CONNECTING if first else ConnectionState.RECONNECTING
                )
                first = False
                end = await self._connect_once()
                self.last_error = end.error
                if end.online_for >= self.stable_after:
                    attempt = 0
                error = end.error
                if error is not None:
                    self.store.add_error("connection", OpError.from_exception(error))
                if error is not None and (
                    error.code in _NON_TRANSIENT or error.reason in _FINAL_REASONS
                ):
                    final_failures += 1
                    if final_failures >= self.max_final_failures or (
                        error.reason in _FINAL_REASONS
                    ):
                        logger.warning("session going offline: %s", error)
                        break
                    if error.code == grpc.StatusCode.UNAUTHENTICATED:
                        await self._refresh_token()
                else:
                    final_failures = 0
                self.store.set_connection(ConnectionState.RECONNECTING)
                delay = self.backoff.delay(attempt, retry_after=end.retry_after)
                attempt += 1
                logger.info("reconnecting in %.2f s (%s)", delay, error)
                await asyncio.sleep(delay)
        finally:
            self.store.set_connection(ConnectionState.OFFLINE)

    async def _refresh_token(self) -> None:
        try:
            await self.client.auth.get(force=True)
        except Exception as exc:  # a provider failure is the next attempt's problem, with backoff
            # A failing provider is a ThreadlineError naming its error: no traceback for it.
            logger.warning("%s", exc, exc_info=not isinstance(exc, ThreadlineError))

    async def _connect_once(self) -> _StreamEnd:
        """One stream: open, sync, serve until it ends. Never raises ThreadlineError."""
        resume = self.store.resume_state()
        stream = self.client.open_stream(resume=resume)
        self._stream = stream
        flusher: asyncio.Task[None] | None = None
        online_at: float | None = None

        def end(error: ThreadlineError | None) -> _StreamEnd:
            retry_after = error.retry_after if error is not None else None
            hint = stream.stream_error
            if retry_after is None and hint is not None and hint.HasField("retry_after"):
                retry_after = hint.retry_after.ToTimedelta().total_seconds()
            online_for = time.monotonic() - online_at if online_at is not None else 0.0
            return _StreamEnd(error, retry_after, online_for)

        try:
            welcome = await stream.start()
            self.store.apply_welcome(welcome)
            self.store.set_connection(ConnectionState.SYNCING)
            caught_up = False
            buffered: list[realtime_pb2.Event] = []
            async for frame in stream:
                kind = frame.WhichOneof("kind")
                if kind == "events":
                    if resume is None and not caught_up:
                        buffered.extend(frame.events.events)
                        continue
                    self.store.apply_events(frame.events.events, replay=frame.events.replay)
                    self._fill_joined(frame.events.events)
                    if caught_up:
                        await self._ack(stream)
                elif kind == "sync_complete":
                    complete = frame.sync_complete
                    if complete.was_recovering and complete.recovered and self.state.sync.synced:
                        self.store.apply_sync_complete(complete)
                    else:
                        await self._reload(complete, welcome)
                        if buffered:
                            self.store.apply_events(buffered)
                            self._fill_joined(buffered)
                            buffered.clear()
                    caught_up = True
                    online_at = time.monotonic()
                    self.store.set_connection(ConnectionState.ONLINE)
                    await self._ack(stream)
                    flusher = asyncio.create_task(self._flush(stream), name="threadline-flush")
                elif kind == "resync_required":
                    required = frame.resync_required
                    if required.reason == realtime_pb2.RESYNC_REASON_SLOW_CONSUMER:
                        # The stream ends next; the cursor is still good: resume from it.
                        logger.info("stream closed as a slow consumer; will resume")
                    else:
                        self.store.note_resync(required)
                elif kind == "operation_result":
                    self._handle_result(frame.operation_result)
            return end(stream.closed_error)
        except ThreadlineError as exc:
            return end(exc)
        except Exception as exc:
            # A bug must not kill the session for good: log it and reconnect with backoff.
            logger.exception("session stream failed")
            return end(make_error(grpc.StatusCode.UNKNOWN, f"session error: {exc!r}"))
        finally:
            self._stream = None
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            await stream.close()

    async def _reload(
        self, complete: realtime_pb2.SyncComplete, welcome: realtime_pb2.Welcome
    ) -> None:
        """Loads a snapshot covering SyncComplete's cursor and replaces the server state."""
        self.store.set_loading("snapshot", True)
        try:
            snapshot = await load_snapshot(self.client, history=self.history)
        finally:
            self.store.set_loading("snapshot", False)
        self.store.apply_snapshot(
            snapshot, epoch=complete.epoch or welcome.epoch, change_seq=complete.change_seq
        )

    async def _ack(self, stream: RealtimeStream) -> None:
        # Fire and forget; a closed stream just means the next connection reports the cursor.
        with contextlib.suppress(ThreadlineError):
            await stream.ack(self.state.sync.change_seq)

    # -- sending --------------------------------------------------------------------------------

    async def _flush(self, stream: RealtimeStream) -> None:
        """Sends pending operations one at a time, oldest first, while the stream lives.

        One in flight at a time keeps the server's order equal to the user's order whatever
        the server runs concurrently; a chat client's operation rate makes that cheap.
        """
        while not stream.closed:
            op = self.store.next_op()
            if op is None or op.not_before > time.monotonic():
                wait = None if op is None else op.not_before - time.monotonic()
                self._ops_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._ops_ready.wait()
                continue
            self.store.mark_sent(op.op_id)
            try:
                result = await self._submit(stream, op)
            except DeadlineExceeded:
                # Outcome unknown; the same op id is safe to send again.
                continue
            except ThreadlineError:
                return  # the stream ended: resend after reconnecting
            self._handle_result(result)

    async def _submit(self, stream: RealtimeStream, op: PendingOp) -> realtime_pb2.OperationResult:
        payload = op.to_proto()
        if isinstance(payload, realtime_pb2.SendMessage):
            return await stream.send_message(
                payload.thread_id,
                payload.text,
                list(payload.attachment_ids),
                client_op_id=payload.client_op_id,
            )
        return await stream.operation(payload)

    def _handle_result(self, result: realtime_pb2.OperationResult) -> None:
        op = self.store.pending_op(result.client_op_id)
        if op is not None and result.WhichOneof("outcome") == "rejected":
            error = from_status_proto(result.rejected)
            if is_retryable(error) and op.attempts < self.max_op_attempts:
                delay = self.backoff.delay(max(op.attempts - 1, 0), retry_after=error.retry_after)
                self.store.defer(op.op_id, delay, OpError.from_exception(error))
                self._ops_ready.set()
                return
        self.store.apply_result(result)

    # -- store notifications --------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.LOCAL:
            self._ops_ready.set()
        for outcome in change.outcomes:
            self._outcomes[outcome.op.op_id] = outcome
            while len(self._outcomes) > _MAX_OUTCOMES:
                self._outcomes.popitem(last=False)
            for waiter in self._waiters.pop(outcome.op.op_id, []):
                if not waiter.done():
                    waiter.set_result(outcome)
            if outcome.conflict is not None:
                self._spawn(self._resolve(outcome.conflict))

    def _fill_joined(self, events: Iterable[realtime_pb2.Event]) -> None:
        """A thread the user was added to arrives as its bare record: fetch what a snapshot would
        have had for it (read state, unread count, newest message, recent history)."""
        for event in events:
            if event.kind == realtime_pb2.EVENT_KIND_THREAD_CREATED and event.thread.last_seq:
                self._spawn(self._load_joined(event.thread.id))

    async def _load_joined(self, thread_id: str) -> None:
        # A resume will not replay the THREAD_CREATED again, so a fill-in cut off by a lost
        # connection or a restarting server is retried until it lands or the thread is gone.
        backoff = Backoff(initial=0.2, maximum=5.0)
        for attempt in itertools.count():
            if thread_id not in self.state.threads.by_id:
                return
            try:
                summary = await self.client.get_thread(thread_id)
                page = await self.client.list_messages(
                    thread_id,
                    thread_service_pb2.ListMessagesRequest.DIRECTION_BACKWARD,
                    page_size=self.history,
                )
            except ThreadlineError as exc:
                if not exc.retryable:  # removed again meanwhile: its THREAD_REMOVED covers it
                    logger.info("joined thread %s not loaded: %s", thread_id, exc.code)
                    return
                await asyncio.sleep(backoff.delay(attempt, retry_after=exc.retry_after))
                continue
            self.store.apply_joined(summary, page.messages)
            return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, info: ConflictInfo) -> None:
        try:
            value = self.resolver(info)
            if inspect.isawaitable(value):
                value = await value
        except Exception:
            logger.exception("conflict resolver failed; keeping the server's value")
            return
        if value is None:
            return
        op = info.op
        base = info.server_version
        try:
            if op.kind is OpKind.EDIT_MESSAGE:
                self.store.queue_edit(op.target_id, str(value["text"]), base_version=base)
            elif op.kind is OpKind.DELETE_MESSAGE:
                self.store.queue_delete(op.target_id, base_version=base)
            elif op.kind is OpKind.UPDATE_THREAD:
                self.store.queue_thread_update(op.target_id, value, base_version=base)
        except (KeyError, ValueError):
            logger.warning("conflict resolution for a resource no longer here", exc_info=True)


def _as_exception(error: OpError) -> ThreadlineError:
    code = grpc.StatusCode[error.code] if error.code in grpc.StatusCode.__members__ else None
    return make_error(code or grpc.StatusCode.UNKNOWN, error.message, reason=error.reason)
