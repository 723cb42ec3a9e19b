"""`threadline serve | migrate | token | cleanup | config-table | edge-config`: parse, call, print.

The server (grpc, SQLAlchemy, aiohttp, Alembic: seconds of imports) is imported inside the
commands that run it, so `threadline token` loads only the settings and the embedded issuer
(tests/e2e/test_cli_token.py checks which modules it imports).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from threadline_server.config import Settings, WebSettings, config_table, load_settings

if TYPE_CHECKING:
    from threadline_server.app import Endpoints, ThreadlineServer

cli = typer.Typer(help="Threadline: a gRPC-first realtime messaging backend.", no_args_is_help=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="TOML config file (or THREADLINE_CONFIG).")
]

# grpc's add_insecure_port reports any failed bind with this RuntimeError and no OS reason.
_GRPC_BIND_FAILED = "Failed to bind to address "


def _settings(config: str | None) -> Settings:
    from threadline_server.observability import setup_logging

    settings = load_settings(config)
    setup_logging(settings.log_level, settings.log_format)
    return settings


WebOpt = Annotated[
    bool | None,
    typer.Option(
        "--web/--no-web",
        help="Run the grpc-web edge (Envoy) or not; default: web.mode (auto: when installed).",
    ),
]


@cli.command("serve")
def serve_cmd(config: ConfigOpt = None, web: WebOpt = None) -> None:
    """Run the server until SIGTERM/SIGINT (then drain)."""
    from threadline_server.app import serve

    settings = _settings(config)
    if web is not None:
        mode = "on" if web else "off"
        settings = settings.model_copy(
            update={"web": settings.web.model_copy(update={"mode": mode})}
        )

    def started(app: ThreadlineServer, ep: Endpoints) -> None:
        s = app.settings
        storage = s.storage.backend if s.storage.backend == "local" else f"gcs:{s.storage.bucket}"
        print(f"threadline: gRPC listening on {s.server.host}:{ep.grpc_port}", flush=True)
        print(f"threadline: HTTP listening on {s.server.host}:{ep.http_port}", flush=True)
        print(f"threadline: database {app.db.dialect} ({_redacted(s.database_url)})", flush=True)
        if ep.web_port:
            print(f"threadline: grpc-web edge on http://{s.server.host}:{ep.web_port}", flush=True)
            # The web app needs the edge: without one the page could not reach the server.
            print(f"threadline: web app on http://{s.server.host}:{ep.http_port}/", flush=True)
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(f"threadline: event loop {loop}", flush=True)
        # The last line: tests/support/process.py waits for it.
        print(f"threadline: storage {storage}; auth {s.auth.mode} (issuer {ep.issuer})", flush=True)

    host = settings.server.host
    run = _event_loop_runner(settings.server.event_loop)
    try:
        run(serve(settings, started))
    except RuntimeError as exc:
        if not str(exc).startswith(_GRPC_BIND_FAILED):
            raise
        _cannot_listen(host, settings.server.port, _why_unbindable(host, settings.server.port))
    except OSError as exc:
        # The side HTTP listener (aiohttp, via asyncio's create_server) binds before gRPC
        # does; its bind errors carry the OS's reason and the address. Other OSErrors (disk,
        # database) are not about this port and keep their traceback.
        http_port = settings.server.http_port
        if exc.errno is None or "bind" not in str(exc) or str(http_port) not in str(exc):
            raise
        _cannot_listen(host, http_port, os.strerror(exc.errno).lower(), "http_port")


def _event_loop_runner(name: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """asyncio.run, or uvloop's: measured, not assumed (docs/performance.md)."""
    if name != "uvloop":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        print(
            "threadline: server.event_loop is uvloop but uvloop is not installed "
            "(pip install 'threadline[fast]'); set server.event_loop / "
            "THREADLINE_SERVER__EVENT_LOOP to asyncio",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    return uvloop.run


def _cannot_listen(host: str, port: int, why: str, setting: str = "port") -> NoReturn:
    """One line instead of a traceback: which address, why, and the setting that moves it."""
    env = f"THREADLINE_SERVER__{setting.upper()}"
    print(
        f"threadline: cannot listen on {host}:{port} ({why}); set server.{setting} / {env}",
        file=sys.stderr,
    )
    raise typer.Exit(1)


def _why_unbindable(host: str, port: int) -> str:
    """The OS's reason a bind fails, found by trying one: gRPC's own error does not carry it."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve the host: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR, so only a live listener (not TIME_WAIT) conflicts.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return "bind failed"


@cli.command("edge-config")
def edge_config_cmd(
    config: ConfigOpt = None,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            help="Another cluster node's gRPC address (host:port), repeatable: the edge then "
            "spreads calls round robin over this node and its peers."
        ),
    ] = None,
) -> None:
    """Print the Envoy config of the grpc-web edge, for operators who run their own Envoy."""
    from threadline_server.edge.envoy_config import default_origins, envoy_config

    settings = _settings(config)
    s = settings.server
    origins = settings.web.allowed_origins or default_origins(settings, s.http_port)
    # web.port 0 means "a free one at start": show the default port then.
    port = settings.web.port or WebSettings.model_fields["port"].default
    print(
        json.dumps(
            envoy_config(
                settings,
                web_port=port,
                grpc_port=s.port,
                origins=origins,
                peers=[_address(p) for p in peer or []],
            ),
            indent=2,
        )
    )


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{value!r} is not host:port")
    return host, int(port)


@cli.command("migrate")
def migrate_cmd(config: ConfigOpt = None) -> None:
    """Apply pending schema migrations."""
    from threadline_server.app import run_migrations

    settings = _settings(config)
    asyncio.run(run_migrations(settings))
    print(f"threadline: migrated {_redacted(settings.database_url)}")


def _positive_ttl(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be a positive number of seconds, not {value}")
    return value


@cli.command("token")
def token_cmd(
    user_id: Annotated[str, typer.Argument(help="The user id (token subject).")],
    ttl: Annotated[
        int | None,
        typer.Option(
            help="Lifetime in seconds (default: auth.embedded_token_ttl_s).",
            callback=_positive_ttl,
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="Display name claim.")] = "",
    config: ConfigOpt = None,
) -> None:
    """Mint a token signed by the embedded issuer (embedded auth mode only)."""
    # issuer.py, not app.py: minting needs a key file and `cryptography`, not the server.
    from threadline_server.issuer import mint_offline

    settings = load_settings(config)
    # Plain stderr lines, not the server's log set-up: that module brings the metrics library,
    # and the only lines here are the key's creation and a permissions warning.
    logging.basicConfig(level=settings.log_level, format="threadline: %(message)s")
    if settings.auth.mode != "embedded":
        raise typer.BadParameter("tokens can only be minted in embedded auth mode")
    claims = {"name": name} if name else {}
    try:
        token = mint_offline(settings, user_id, ttl, **claims)
    except ValueError as exc:  # an empty user id, a non-positive configured TTL, a bad key file
        print(f"threadline: cannot mint a token: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(token)


@cli.command("cleanup")
def cleanup_cmd(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; change nothing.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Remove orphaned uploads (never completed, never attached, or of deleted messages)."""
    from threadline_server.app import cleanup

    settings = _settings(config)
    result = asyncio.run(cleanup(settings, dry_run=dry_run))
    verb = "would remove" if dry_run else "removed"
    for upload in result.uploads:
        print(
            f"{verb} upload {upload.id} ({upload.state}, {upload.size_bytes} bytes, "
            f"{upload.file_name!r})"
        )
    for key in result.stray_keys:
        print(f"{verb} stray object {key}")
    for upload in result.failed:
        print(f"could not remove upload {upload.id} yet (retried on the next sweep)")
    print(
        f"threadline: {verb} {len(result.uploads)} uploads and "
        f"{len(result.stray_keys)} stray objects"
    )


@cli.command("config-table")
def config_table_cmd() -> None:
    """Print the Markdown table of every setting (as in docs/config.md)."""
    print(config_table(), end="")


def _redacted(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def main() -> None:
    cli()
