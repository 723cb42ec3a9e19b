"""The SDK entry point: a grpc.aio channel with Threadline's settings and typed unary helpers.

`ThreadlineClient` owns one channel (keepalive, message limits and a retry service config from
the reliability bar), authenticates every call through `BearerAuthInterceptor`, applies a default
deadline to unary calls, maps every failure to a `threadline_client.errors` exception, and opens
realtime streams (`open_stream`). The raw generated stubs stay reachable as `client.stubs` for
protocol-level tests.
"""

# `timeout=` arguments follow gRPC and asyncio.wait_for conventions, which callers of a gRPC
# SDK expect, rather than asking them to wrap every call in asyncio.timeout().
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from threadline.v1 import (
    message_pb2,
    realtime_pb2,
    realtime_service_pb2,
    thread_pb2,
    thread_service_pb2,
    upload_pb2,
    upload_service_pb2,
    user_pb2,
    user_service_pb2,
)
from threadline_client.auth import (
    DEFAULT_REFRESH_MARGIN,
    BearerAuthInterceptor,
    StaticToken,
    TokenCache,
    TokenProvider,
)
from threadline_client.channel import DEFAULT_CHANNEL_OPTIONS, DEFAULT_TIMEOUT, Stubs
from threadline_client.errors import from_rpc_error, make_error
from threadline_client.ids import new_op_id
from threadline_client.stream import RealtimeStream

__all__ = ["ThreadlineClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class ThreadlineClient:
    """An async Threadline client over one gRPC channel.

    Use `await ThreadlineClient.connect(...)`, or construct it and use `async with`; close it
    with `await client.close()` either way.

    Args:
        target: The server address, e.g. `localhost:50051`.
        token: A bearer token, or a provider called whenever a fresh token is needed.
        secure: Use TLS (with `credentials`, or the system roots when None).
        credentials: TLS channel credentials; implies `secure`.
        default_timeout: Deadline in seconds for unary calls and stream request/reply waits.
        options: Extra channel arguments; they override `DEFAULT_CHANNEL_OPTIONS` by key.
        refresh_margin: Seconds before a token's expiry to replace it (capped at a third of its
            lifetime).
        client_name: Sent in Hello for the server's logs.
        client_version: Sent in Hello for the server's logs.
    """

    def __init__(
        self,
        target: str,
        token: TokenProvider | str,
        *,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        options: Iterable[tuple[str, Any]] | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        client_name: str = "threadline-python",
        client_version: str = "0.1.0",
    ) -> None:
        provider: TokenProvider = StaticToken(token) if isinstance(token, str) else token
        self.target = target
        self.default_timeout = default_timeout
        self.client_name = client_name
        self.client_version = client_version
        self.auth = TokenCache(provider, margin=refresh_margin)
        self._refresh_margin = refresh_margin
        merged = dict(DEFAULT_CHANNEL_OPTIONS)
        merged.update(dict(options or ()))
        channel_options = list(merged.items())
        interceptors = [BearerAuthInterceptor(self.auth)]
        if secure or credentials is not None:
            self.channel = grpc.aio.secure_channel(
                target,
                credentials or grpc.ssl_channel_credentials(),
                options=channel_options,
                interceptors=interceptors,
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                target, options=channel_options, interceptors=interceptors
            )
        self.stubs = Stubs.for_channel(self.channel)
        self._streams: set[RealtimeStream] = set()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        target: str,
        token: TokenProvider | str,
        *,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        options: Iterable[tuple[str, Any]] | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        client_name: str = "threadline-python",
        client_version: str = "0.1.0",
        wait_ready: bool = True,
    ) -> ThreadlineClient:
        """Creates a client and (by default) waits until its channel is connected.

        Args:
            target: See the class.
            token: See the class.
            secure: See the class.
            credentials: See the class.
            default_timeout: See the class; also bounds the wait for the connection.
            options: See the class.
            refresh_margin: See the class.
            client_name: See the class.
            client_version: See the class.
            wait_ready: Wait for the channel to connect before returning.

        Raises:
            Unavailable: The channel did not connect within `default_timeout`.
        """
        client = cls(
            target,
            token,
            secure=secure,
            credentials=credentials,
            default_timeout=default_timeout,
            options=options,
            refresh_margin=refresh_margin,
            client_name=client_name,
            client_version=client_version,
        )
        if wait_ready:
            try:
                await client.wait_ready()
            except BaseException:
                await client.close()
                raise
        return client

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the channel is connected.

        Args:
            timeout: Seconds to wait; `default_timeout` when None.

        Raises:
            Unavailable: Not connected in time.
        """
        limit = self.default_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await self.channel.channel_ready()
        except TimeoutError as exc:
            raise make_error(
                grpc.StatusCode.UNAVAILABLE, f"could not connect to {self.target} in {limit:g} s"
            ) from exc

    async def close(self, grace: float | None = None) -> None:
        """Closes open streams, then the channel. Safe to call more than once.

        Args:
            grace: Seconds to let in-flight unary calls finish before cancelling them.
        """
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams):
            await stream.close()
        await self.channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------------

    async def _unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> _Resp:
        try:
            return await rpc(
                request,
                timeout=self.default_timeout if timeout is None else timeout,
                metadata=tuple(metadata) or None,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- ThreadService --------------------------------------------------------------------------

    async def create_thread(
        self,
        title: str,
        participant_ids: Iterable[str] = (),
        description: str = "",
        tags: Iterable[str] = (),
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.Thread:
        """Creates a thread; the caller is always a participant.

        Args:
            title: The title (required by the server).
            participant_ids: Other users to add.
            description: Optional description.
            tags: Optional tags.
            client_op_id: Idempotency key; a fresh one when None, so a retried call is safe.
            timeout: Deadline in seconds (`default_timeout` when None); the same on every call.
            metadata: Extra call metadata; the same on every call.

        Returns:
            The created thread.
        """
        request = thread_service_pb2.CreateThreadRequest(
            thread=thread_pb2.Thread(
                title=title,
                description=description,
                tags=list(tags),
                participant_ids=list(participant_ids),
            ),
            client_op_id=client_op_id or new_op_id(),
        )
        response = await self._unary(self.stubs.threads.CreateThread, request, timeout, metadata)
        return response.thread

    async def get_thread(
        self,
        thread_id: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.ThreadSummary:
        """Returns a thread with the caller's read state (NotFound when not a participant)."""
        request = thread_service_pb2.GetThreadRequest(thread_id=thread_id)
        response = await self._unary(self.stubs.threads.GetThread, request, timeout, metadata)
        return response.thread

    async def list_threads(
        self,
        filter: thread_service_pb2.ThreadFilter.ValueType = thread_service_pb2.THREAD_FILTER_ACTIVE,
        page_size: int = 0,
        page_token: str = "",
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_service_pb2.ListThreadsResponse:
        """Returns one page of the caller's threads, most recently active first.

        Args:
            filter: Active, archived or all threads.
            page_size: 0 for the server default (50); at most 200 is honoured.
            page_token: `next_page_token` of the previous page, with the same filter.
            timeout: See `create_thread`.
            metadata: See `create_thread`.
        """
        request = thread_service_pb2.ListThreadsRequest(
            filter=filter, page_size=page_size, page_token=page_token
        )
        return await self._unary(self.stubs.threads.ListThreads, request, timeout, metadata)

    async def iter_threads(
        self,
        filter: thread_service_pb2.ThreadFilter.ValueType = thread_service_pb2.THREAD_FILTER_ACTIVE,
        page_size: int = 0,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[thread_pb2.ThreadSummary]:
        """Yields every thread matching `filter`, fetching pages as needed.

        Args:
            filter: See `list_threads`.
            page_size: See `list_threads`.
            timeout: Deadline per page request.
        """
        token = ""
        while True:
            page = await self.list_threads(filter, page_size, token, timeout=timeout)
            for summary in page.threads:
                yield summary
            token = page.next_page_token
            if not token:
                return

    async def update_thread(
        self,
        thread_id: str,
        *,
        title: str | None = None,
        description: str | None = None,
        tags: Iterable[str] | None = None,
        expected_version: int = 0,
        client_op_id: str | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.Thread:
        """Changes the given fields of a thread; the update mask lists exactly those.

        Args:
            thread_id: The thread.
            title: New title, or None to leave it.
            description: New description, or None to leave it.
            tags: New tags (replacing all), or None to leave them.
            expected_version: If non-zero, apply only at this version (else `Aborted` with
                `current_version`).
            client_op_id: Idempotency key; fresh when None.
            timeout: See `create_thread`.
            metadata: See `create_thread`.

        Returns:
            The updated thread.
        """
        thread = thread_pb2.Thread(id=thread_id)
        paths: list[str] = []
        if title is not None:
            thread.title = title
            paths.append("title")
        if description is not None:
            thread.description = description
            paths.append("description")
        if tags is not None:
            thread.tags.extend(tags)
            paths.append("tags")
        request = thread_service_pb2.UpdateThreadRequest(
            thread=thread,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version,
            client_op_id=client_op_id or new_op_id(),
        )
        response = await self._unary(self.stubs.threads.UpdateThread, request, timeout, metadata)
        return response.thread

    async def delete_thread(
        self,
        thread_id: str,
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Deletes a thread with its messages (creator only, else `PermissionDenied`)."""
        request = thread_service_pb2.DeleteThreadRequest(
            thread_id=thread_id, client_op_id=client_op_id or new_op_id()
        )
        await self._unary(self.stubs.threads.DeleteThread, request, timeout, metadata)

    async def archive_thread(
        self,
        thread_id: str,
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.Thread:
        """Archives a thread and returns it."""
        request = thread_service_pb2.ArchiveThreadRequest(
            thread_id=thread_id, client_op_id=client_op_id or new_op_id()
        )
        response = await self._unary(self.stubs.threads.ArchiveThread, request, timeout, metadata)
        return response.thread

    async def unarchive_thread(
        self,
        thread_id: str,
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.Thread:
        """Unarchives a thread and returns it."""
        request = thread_service_pb2.UnarchiveThreadRequest(
            thread_id=thread_id, client_op_id=client_op_id or new_op_id()
        )
        response = await self._unary(self.stubs.threads.UnarchiveThread, request, timeout, metadata)
        return response.thread

    async def add_participants(
        self,
        thread_id: str,
        user_ids: Iterable[str],
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.Thread:
        """Adds users to a thread (ids already present are ignored) and returns it."""
        request = thread_service_pb2.AddParticipantsRequest(
            thread_id=thread_id, user_ids=list(user_ids), client_op_id=client_op_id or new_op_id()
        )
        response = await self._unary(self.stubs.threads.AddParticipants, request, timeout, metadata)
        return response.thread

    async def remove_participants(
        self,
        thread_id: str,
        user_ids: Iterable[str],
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.Thread:
        """Removes users from a thread and returns it (empty when the caller removed itself)."""
        request = thread_service_pb2.RemoveParticipantsRequest(
            thread_id=thread_id, user_ids=list(user_ids), client_op_id=client_op_id or new_op_id()
        )
        response = await self._unary(
            self.stubs.threads.RemoveParticipants, request, timeout, metadata
        )
        return response.thread

    async def list_messages(
        self,
        thread_id: str,
        direction: thread_service_pb2.ListMessagesRequest.Direction.ValueType = (
            thread_service_pb2.ListMessagesRequest.DIRECTION_BACKWARD
        ),
        page_size: int = 0,
        page_token: str = "",
        start_seq: int = 0,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_service_pb2.ListMessagesResponse:
        """Returns one page of a thread's messages (tombstones included).

        Args:
            thread_id: The thread.
            direction: BACKWARD (newest first, below `start_seq`) or FORWARD (above it).
            page_size: 0 for the server default (50); at most 200 is honoured.
            page_token: `next_page_token` of the previous page (same thread and direction).
            start_seq: Exclusive start for the first page; 0 starts at the newest or oldest.
            timeout: See `create_thread`.
            metadata: See `create_thread`.
        """
        request = thread_service_pb2.ListMessagesRequest(
            thread_id=thread_id,
            direction=direction,
            page_size=page_size,
            page_token=page_token,
            start_seq=start_seq,
        )
        return await self._unary(self.stubs.threads.ListMessages, request, timeout, metadata)

    async def iter_messages(
        self,
        thread_id: str,
        direction: thread_service_pb2.ListMessagesRequest.Direction.ValueType = (
            thread_service_pb2.ListMessagesRequest.DIRECTION_BACKWARD
        ),
        page_size: int = 0,
        start_seq: int = 0,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[message_pb2.Message]:
        """Yields every message of a thread in `direction`, fetching pages as needed.

        Args:
            thread_id: See `list_messages`.
            direction: See `list_messages`.
            page_size: See `list_messages`.
            start_seq: See `list_messages`.
            timeout: Deadline per page request.
        """
        token = ""
        while True:
            page = await self.list_messages(
                thread_id, direction, page_size, token, start_seq, timeout=timeout
            )
            for message in page.messages:
                yield message
            token = page.next_page_token
            if not token:
                return

    async def mark_read(
        self,
        thread_id: str,
        read_seq: int,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> thread_pb2.ReadMarker:
        """Moves the caller's read marker forward (never back); returns it with the unread count."""
        request = thread_service_pb2.MarkReadRequest(thread_id=thread_id, read_seq=read_seq)
        response = await self._unary(self.stubs.threads.MarkRead, request, timeout, metadata)
        return response.read_marker

    # -- UserService ----------------------------------------------------------------------------

    async def get_me(
        self,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> user_service_pb2.GetMeResponse:
        """Returns the caller's profile, online state and preferences."""
        request = user_service_pb2.GetMeRequest()
        return await self._unary(self.stubs.users.GetMe, request, timeout, metadata)

    async def update_preferences(
        self,
        *,
        theme: user_pb2.Theme.ValueType | None = None,
        locale: str | None = None,
        time_zone: str | None = None,
        notifications_enabled: bool | None = None,
        expected_version: int = 0,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> user_pb2.UserPreferences:
        """Changes the given preference fields; the update mask lists exactly those.

        Args:
            theme: New theme, or None to leave it.
            locale: New locale, or None to leave it.
            time_zone: New time zone, or None to leave it.
            notifications_enabled: New setting, or None to leave it.
            expected_version: If non-zero, apply only at this version (else `Aborted`).
            timeout: See `create_thread`.
            metadata: See `create_thread`.

        Returns:
            The preferences after the change.
        """
        preferences = user_pb2.UserPreferences()
        paths: list[str] = []
        if theme is not None:
            preferences.theme = theme
            paths.append("theme")
        if locale is not None:
            preferences.locale = locale
            paths.append("locale")
        if time_zone is not None:
            preferences.time_zone = time_zone
            paths.append("time_zone")
        if notifications_enabled is not None:
            preferences.notifications_enabled = notifications_enabled
            paths.append("notifications_enabled")
        request = user_service_pb2.UpdatePreferencesRequest(
            preferences=preferences,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version,
        )
        response = await self._unary(self.stubs.users.UpdatePreferences, request, timeout, metadata)
        return response.preferences

    # -- UploadService --------------------------------------------------------------------------

    async def create_upload(
        self,
        file_name: str,
        content_type: str,
        size_bytes: int,
        client_op_id: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> upload_service_pb2.CreateUploadResponse:
        """Declares an upload; the response has the signed URL, method and headers to use."""
        request = upload_service_pb2.CreateUploadRequest(
            file_name=file_name,
            content_type=content_type,
            size_bytes=size_bytes,
            client_op_id=client_op_id or new_op_id(),
        )
        return await self._unary(self.stubs.uploads.CreateUpload, request, timeout, metadata)

    async def complete_upload(
        self,
        upload_id: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> upload_pb2.Upload:
        """Verifies the uploaded bytes and returns the now ready upload."""
        request = upload_service_pb2.CompleteUploadRequest(upload_id=upload_id)
        response = await self._unary(self.stubs.uploads.CompleteUpload, request, timeout, metadata)
        return response.upload

    async def get_download_url(
        self,
        upload_id: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> upload_service_pb2.GetDownloadUrlResponse:
        """Returns a short-lived signed download URL and its expiry."""
        request = upload_service_pb2.GetDownloadUrlRequest(upload_id=upload_id)
        return await self._unary(self.stubs.uploads.GetDownloadUrl, request, timeout, metadata)

    # -- RealtimeService ------------------------------------------------------------------------

    async def submit(
        self,
        frame: realtime_pb2.ClientFrame,
        session_id: str = "",
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> realtime_pb2.ServerFrame:
        """Sends one client frame without a stream (the grpc-web path).

        Args:
            frame: send_message, operation, typing, ping, ack or refresh_auth.
            session_id: A Subscribe session of the same user (needed for ack, typing,
                refresh_auth).
            timeout: See `create_thread`.
            metadata: See `create_thread`.

        Returns:
            The answer frame (operation_result, pong or auth_refreshed; empty for ack/typing).
        """
        request = realtime_service_pb2.SubmitRequest(frame=frame, session_id=session_id)
        response = await self._unary(self.stubs.realtime.Submit, request, timeout, metadata)
        return response.frame

    def open_stream(
        self,
        hello: realtime_pb2.Hello | None = None,
        *,
        resume: realtime_pb2.SyncState | None = None,
        heartbeat: bool = True,
        auto_refresh: bool = True,
    ) -> RealtimeStream:
        """Prepares a realtime stream; enter it with `async with` (or `await stream.start()`).

        Args:
            hello: The Hello to send; one with this client's name and version when None.
            resume: A sync state to resume from (set as `hello.sync_state`).
            heartbeat: Send Ping at the Welcome's heartbeat interval (off to test idle timeouts).
            auto_refresh: Send RefreshAuth before the token expires (off to test expiry).

        Returns:
            The stream, not yet started.
        """
        if hello is None:
            hello = realtime_pb2.Hello(
                client_name=self.client_name, client_version=self.client_version
            )
        else:
            copy = realtime_pb2.Hello()
            copy.CopyFrom(hello)
            hello = copy
        if resume is not None:
            hello.sync_state.CopyFrom(resume)
        stream = RealtimeStream(
            self.stubs.realtime,
            self.auth,
            hello,
            default_timeout=self.default_timeout,
            heartbeat=heartbeat,
            auto_refresh=auto_refresh,
            refresh_margin=self._refresh_margin,
            on_close=self._streams.discard,
        )
        self._streams.add(stream)
        return stream
