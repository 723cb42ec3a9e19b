"""AdminService: what operators see of a node (live streams, index use); admins only."""

from __future__ import annotations

from typing import Any

import grpc

from threadline.v1 import admin_service_pb2 as adm
from threadline.v1 import admin_service_pb2_grpc
from threadline_server.domain import paging
from threadline_server.domain.models import Principal
from threadline_server.domain.ports import Store
from threadline_server.domain.validation import Violations, page_size
from threadline_server.errors import PermissionDenied
from threadline_server.observability import Metrics
from threadline_server.realtime.broker import LocalBroker
from threadline_server.realtime.session import StreamSession
from threadline_server.transport import codec, frames
from threadline_server.transport.compression import DEFAULT_THRESHOLD
from threadline_server.transport.guard import Authenticator, guarded

Ctx = grpc.aio.ServicerContext[Any, Any]

_KINDS = {"connect": adm.STREAM_KIND_CONNECT, "subscribe": adm.STREAM_KIND_SUBSCRIBE}


def _position(s: StreamSession) -> tuple[float, str]:
    """Keyset order of connections: oldest first (wall clock, so it can span nodes)."""
    return (s.opened_at_wall, s.session_id)


def _connection(s: StreamSession) -> adm.Connection:
    return adm.Connection(
        session_id=s.session_id,
        user_id=s.user_id,
        kind=_KINDS.get(s.info.kind, adm.STREAM_KIND_UNSPECIFIED),
        peer=s.info.peer,
        client_name=s.info.client_name,
        client_version=s.info.client_version,
        open_time=codec.ts_epoch(s.opened_at_wall),
        last_activity_time=codec.ts_epoch(s.last_activity_wall()),
        token_expire_time=codec.ts_epoch(s.principal.expires_at),
        queued_frames=s.queued(),
    )


@guarded
class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    metrics: Metrics | None = None  # set by app.py; the guard counts errors by code
    compression_threshold = DEFAULT_THRESHOLD  # set by app.py; responses under it go plain

    def __init__(
        self,
        auth: Authenticator,
        store: Store,
        broker: LocalBroker,
        admins: list[str],
        *,
        page_bytes: int,
    ) -> None:
        self.page_bytes = page_bytes  # frames.budget(settings): pages stay under the frame limit
        self.auth = auth
        self.store = store
        self.broker = broker
        self.admins = frozenset(admins)

    def _require_admin(self, principal: Principal) -> None:
        # An impersonation token (`act`) acts as its subject, never as an operator.
        if principal.user_id not in self.admins or principal.actor:
            raise PermissionDenied("AdminService is for the users in auth.admin_users")

    async def ListConnections(  # type: ignore[override]
        self, request: adm.ListConnectionsRequest, context: Ctx, principal: Principal
    ) -> adm.ListConnectionsResponse:
        self._require_admin(principal)
        v = Violations()
        size = page_size(v, "page_size", request.page_size)
        params = {"user": request.user_id}
        after: tuple[float, str] | None = None
        if request.page_token:
            pos = paging.decode(request.page_token, params)
            if not isinstance(pos.get("t"), float | int) or not isinstance(pos.get("s"), str):
                v.add("page_token", "page_token is malformed")
            else:
                after = (float(pos["t"]), str(pos["s"]))
        v.raise_if_any()
        sessions = sorted(
            (
                s
                for s in self.broker.all_sessions()
                if not request.user_id or s.user_id == request.user_id
            ),
            key=_position,
        )
        users_online = len({s.user_id for s in sessions})
        if after is not None:
            sessions = [s for s in sessions if _position(s) > after]
        rows = [(s, _connection(s)) for s in sessions[:size]]
        page = paging.fit(rows, lambda row: frames.item_size(row[1].ByteSize()), self.page_bytes)
        token = ""
        if page and len(page) < len(sessions):
            last = _position(page[-1][0])
            token = paging.encode({"t": last[0], "s": last[1]}, params)
        return adm.ListConnectionsResponse(
            connections=[c for _, c in page], users_online=users_online, next_page_token=token
        )

    async def GetIndexUsage(  # type: ignore[override]
        self, request: adm.GetIndexUsageRequest, context: Ctx, principal: Principal
    ) -> adm.GetIndexUsageResponse:
        self._require_admin(principal)
        backend, stats = await self.store.index_usage()
        return adm.GetIndexUsageResponse(
            backend=backend,
            indexes=[
                adm.IndexUsage(
                    table=i.table, index=i.index, scans=i.scans, tuples_read=i.tuples_read
                )
                for i in stats
            ],
        )
