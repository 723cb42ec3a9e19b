"""ThreadService, UserService and UploadService: decode, one domain call, encode."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import grpc

from threadline.v1 import (
    thread_service_pb2 as ts,
)
from threadline.v1 import (
    thread_service_pb2_grpc,
    upload_service_pb2_grpc,
    user_service_pb2_grpc,
)
from threadline.v1 import (
    upload_service_pb2 as us,
)
from threadline.v1 import (
    user_service_pb2 as usr,
)
from threadline_server.domain.limits import Budget, RateLimits
from threadline_server.domain.models import Principal
from threadline_server.domain.ports import Broker, Store
from threadline_server.domain.threads import Threads
from threadline_server.domain.uploads import Uploads
from threadline_server.domain.validation import Violations
from threadline_server.observability import Metrics
from threadline_server.transport import codec
from threadline_server.transport.compression import DEFAULT_THRESHOLD
from threadline_server.transport.guard import Authenticator, guarded

Ctx = grpc.aio.ServicerContext[Any, Any]

_FILTERS = {0: False, 1: False, 2: True, 3: None}
PREFERENCE_FIELDS = ("theme", "locale", "time_zone", "notifications_enabled")

_Rpc = TypeVar("_Rpc", bound=Callable[..., Awaitable[Any]])


class _Budgeted(Protocol):
    limits: RateLimits


def charged(budget: Budget) -> Callable[[_Rpc], _Rpc]:
    """The RPC spends one token of the user's `budget` before anything else runs: a refused call
    (RESOURCE_EXHAUSTED, RATE_LIMITED, RetryInfo, raised through the guard) has read and written
    nothing. The decorator is the one place an RPC names its budget; reads spend none."""

    def decorate(fn: _Rpc) -> _Rpc:
        @functools.wraps(fn)
        async def spend_then_call(
            self: _Budgeted, request: Any, context: Ctx, principal: Principal
        ) -> Any:
            await self.limits.spend(budget, principal.user_id)
            return await fn(self, request, context, principal)

        return cast("_Rpc", spend_then_call)

    return decorate


@guarded
class ThreadServicer(thread_service_pb2_grpc.ThreadServiceServicer):
    metrics: Metrics | None = None  # set by app.py; the guard counts errors by code
    compression_threshold = DEFAULT_THRESHOLD  # set by app.py; responses under it go plain

    def __init__(self, auth: Authenticator, threads: Threads, limits: RateLimits) -> None:
        self.auth = auth
        self.threads = threads
        self.limits = limits

    @charged(Budget.THREAD_WRITES)
    async def CreateThread(  # type: ignore[override]
        self, request: ts.CreateThreadRequest, context: Ctx, principal: Principal
    ) -> ts.CreateThreadResponse:
        t = request.thread
        thread = await self.threads.create(
            principal.user_id,
            title=t.title,
            description=t.description,
            tags=list(t.tags),
            participant_ids=list(t.participant_ids),
            client_op_id=request.client_op_id,
        )
        return ts.CreateThreadResponse(thread=codec.thread(thread))

    async def GetThread(  # type: ignore[override]
        self, request: ts.GetThreadRequest, context: Ctx, principal: Principal
    ) -> ts.GetThreadResponse:
        summary = await self.threads.get(principal.user_id, request.thread_id)
        return ts.GetThreadResponse(thread=codec.summary(summary))

    async def ListThreads(  # type: ignore[override]
        self, request: ts.ListThreadsRequest, context: Ctx, principal: Principal
    ) -> ts.ListThreadsResponse:
        archived = _FILTERS.get(request.filter, False)
        items, token = await self.threads.list_threads(
            principal.user_id, archived=archived, size=request.page_size, token=request.page_token
        )
        return ts.ListThreadsResponse(
            threads=[codec.summary(s) for s in items], next_page_token=token
        )

    @charged(Budget.THREAD_WRITES)
    async def UpdateThread(  # type: ignore[override]
        self, request: ts.UpdateThreadRequest, context: Ctx, principal: Principal
    ) -> ts.UpdateThreadResponse:
        t = request.thread
        values: dict[str, Any] = {}
        for path in request.update_mask.paths:
            if path == "title":
                values["title"] = t.title
            elif path == "description":
                values["description"] = t.description
            elif path == "tags":
                values["tags"] = list(t.tags)
            else:
                values[path] = None  # rejected by the domain as an unknown field
        thread = await self.threads.update(
            principal.user_id,
            t.id,
            values,
            expected_version=request.expected_version,
            client_op_id=request.client_op_id,
        )
        return ts.UpdateThreadResponse(thread=codec.thread(thread))

    @charged(Budget.THREAD_WRITES)
    async def DeleteThread(  # type: ignore[override]
        self, request: ts.DeleteThreadRequest, context: Ctx, principal: Principal
    ) -> ts.DeleteThreadResponse:
        await self.threads.delete(principal.user_id, request.thread_id, request.client_op_id)
        return ts.DeleteThreadResponse()

    @charged(Budget.THREAD_WRITES)
    async def ArchiveThread(  # type: ignore[override]
        self, request: ts.ArchiveThreadRequest, context: Ctx, principal: Principal
    ) -> ts.ArchiveThreadResponse:
        thread = await self.threads.set_archived(
            principal.user_id, request.thread_id, True, request.client_op_id
        )
        return ts.ArchiveThreadResponse(thread=codec.thread(thread))

    @charged(Budget.THREAD_WRITES)
    async def UnarchiveThread(  # type: ignore[override]
        self, request: ts.UnarchiveThreadRequest, context: Ctx, principal: Principal
    ) -> ts.UnarchiveThreadResponse:
        thread = await self.threads.set_archived(
            principal.user_id, request.thread_id, False, request.client_op_id
        )
        return ts.UnarchiveThreadResponse(thread=codec.thread(thread))

    @charged(Budget.PARTICIPANT_CHANGES)
    async def AddParticipants(  # type: ignore[override]
        self, request: ts.AddParticipantsRequest, context: Ctx, principal: Principal
    ) -> ts.AddParticipantsResponse:
        thread = await self.threads.add_participants(
            principal.user_id, request.thread_id, list(request.user_ids), request.client_op_id
        )
        return ts.AddParticipantsResponse(thread=codec.thread(thread))

    @charged(Budget.PARTICIPANT_CHANGES)
    async def RemoveParticipants(  # type: ignore[override]
        self, request: ts.RemoveParticipantsRequest, context: Ctx, principal: Principal
    ) -> ts.RemoveParticipantsResponse:
        thread = await self.threads.remove_participants(
            principal.user_id, request.thread_id, list(request.user_ids), request.client_op_id
        )
        return ts.RemoveParticipantsResponse(thread=codec.thread(thread) if thread else None)

    async def ListMessages(  # type: ignore[override]
        self, request: ts.ListMessagesRequest, context: Ctx, principal: Principal
    ) -> ts.ListMessagesResponse:
        forward = request.direction == ts.ListMessagesRequest.DIRECTION_FORWARD
        items, token = await self.threads.list_messages(
            principal.user_id,
            request.thread_id,
            forward=forward,
            start_seq=request.start_seq,
            size=request.page_size,
            token=request.page_token,
        )
        return ts.ListMessagesResponse(
            messages=[codec.message(m) for m in items], next_page_token=token
        )

    @charged(Budget.READ_MARKERS)
    async def MarkRead(  # type: ignore[override]
        self, request: ts.MarkReadRequest, context: Ctx, principal: Principal
    ) -> ts.MarkReadResponse:
        marker = await self.threads.mark_read(
            principal.user_id, request.thread_id, request.read_seq
        )
        return ts.MarkReadResponse(read_marker=codec.read_marker(marker))


@guarded
class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    metrics: Metrics | None = None  # set by app.py; the guard counts errors by code
    compression_threshold = DEFAULT_THRESHOLD  # set by app.py; responses under it go plain

    def __init__(
        self, auth: Authenticator, store: Store, broker: Broker, limits: RateLimits
    ) -> None:
        self.auth = auth
        self.store = store
        self.broker = broker
        self.limits = limits

    async def GetMe(  # type: ignore[override]
        self, request: usr.GetMeRequest, context: Ctx, principal: Principal
    ) -> usr.GetMeResponse:
        user, prefs = await self.store.get_user(principal.user_id)
        return usr.GetMeResponse(
            user=codec.user(user),
            online=self.broker.online(principal.user_id),
            preferences=codec.preferences(prefs),
        )

    @charged(Budget.PREFERENCES)
    async def UpdatePreferences(  # type: ignore[override]
        self, request: usr.UpdatePreferencesRequest, context: Ctx, principal: Principal
    ) -> usr.UpdatePreferencesResponse:
        v = Violations()
        p = request.preferences
        values: dict[str, Any] = {}
        if not request.update_mask.paths:
            v.add("update_mask", "update_mask must name at least one field")
        for path in request.update_mask.paths:
            if path not in PREFERENCE_FIELDS:
                v.add("update_mask", f"unknown or read-only field {path!r}")
            else:
                values[path] = getattr(p, path)
        if "locale" in values and len(p.locale) > 35:
            v.add("preferences.locale", "locale is longer than 35 characters")
        if "time_zone" in values and len(p.time_zone) > 64:
            v.add("preferences.time_zone", "time_zone is longer than 64 characters")
        if "theme" in values and p.theme not in (0, 1, 2):
            v.add("preferences.theme", "unknown theme")
        v.raise_if_any()
        prefs = await self.store.update_preferences(
            principal.user_id, values, request.expected_version
        )
        return usr.UpdatePreferencesResponse(preferences=codec.preferences(prefs))


@guarded
class UploadServicer(upload_service_pb2_grpc.UploadServiceServicer):
    metrics: Metrics | None = None  # set by app.py; the guard counts errors by code
    compression_threshold = DEFAULT_THRESHOLD  # set by app.py; responses under it go plain

    def __init__(self, auth: Authenticator, uploads: Uploads, limits: RateLimits) -> None:
        self.auth = auth
        self.uploads = uploads
        self.limits = limits

    @charged(Budget.UPLOADS)
    async def CreateUpload(  # type: ignore[override]
        self, request: us.CreateUploadRequest, context: Ctx, principal: Principal
    ) -> us.CreateUploadResponse:
        upload, url = await self.uploads.create(
            principal.user_id,
            request.file_name,
            request.content_type,
            request.size_bytes,
            request.client_op_id,
        )
        return us.CreateUploadResponse(
            upload=codec.upload(upload),
            upload_url=url.url,
            upload_method=url.method,
            upload_headers=dict(url.headers),
            upload_url_expire_time=codec.ts(url.expires_at),
        )

    @charged(Budget.UPLOADS)
    async def CompleteUpload(  # type: ignore[override]
        self, request: us.CompleteUploadRequest, context: Ctx, principal: Principal
    ) -> us.CompleteUploadResponse:
        upload = await self.uploads.complete(principal.user_id, request.upload_id)
        return us.CompleteUploadResponse(upload=codec.upload(upload))

    async def GetDownloadUrl(  # type: ignore[override]
        self, request: us.GetDownloadUrlRequest, context: Ctx, principal: Principal
    ) -> us.GetDownloadUrlResponse:
        url = await self.uploads.download_url(principal.user_id, request.upload_id)
        return us.GetDownloadUrlResponse(download_url=url.url, expire_time=codec.ts(url.expires_at))
