"""`threadline serve | migrate | token`: parse arguments, call app.py, print."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from threadline_server.app import (
    Endpoints,
    ThreadlineServer,
    cleanup,
    mint_offline,
    run_migrations,
    serve,
)
from threadline_server.config import Settings, config_table, load_settings
from threadline_server.observability import setup_logging

cli = typer.Typer(help="Threadline: a gRPC-first realtime messaging backend.", no_args_is_help=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="TOML config file (or THREADLINE_CONFIG).")
]


def _settings(config: str | None) -> Settings:
    settings = load_settings(config)
    setup_logging(settings.log_level, settings.log_format)
    return settings


@cli.command("serve")
def serve_cmd(config: ConfigOpt = None) -> None:
    """Run the server until SIGTERM/SIGINT (then drain)."""
    settings = _settings(config)

    def started(app: ThreadlineServer, ep: Endpoints) -> None:
        s = app.settings
        storage = s.storage.backend if s.storage.backend == "local" else f"gcs:{s.storage.bucket}"
        print(f"threadline: gRPC listening on {s.server.host}:{ep.grpc_port}", flush=True)
        print(f"threadline: HTTP listening on {s.server.host}:{ep.http_port}", flush=True)
        print(f"threadline: database {app.db.dialect} ({_redacted(s.database_url)})", flush=True)
        print(f"threadline: storage {storage}; auth {s.auth.mode} (issuer {ep.issuer})", flush=True)

    asyncio.run(serve(settings, started))


@cli.command("migrate")
def migrate_cmd(config: ConfigOpt = None) -> None:
    """Apply pending schema migrations."""
    settings = _settings(config)
    asyncio.run(run_migrations(settings))
    print(f"threadline: migrated {_redacted(settings.database_url)}")


@cli.command("token")
def token_cmd(
    user_id: Annotated[str, typer.Argument(help="The user id (token subject).")],
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    name: Annotated[str, typer.Option(help="Display name claim.")] = "",
    config: ConfigOpt = None,
) -> None:
    """Mint a token signed by the embedded issuer (embedded auth mode only)."""
    settings = _settings(config)
    if settings.auth.mode != "embedded":
        raise typer.BadParameter("tokens can only be minted in embedded auth mode")
    claims = {"name": name} if name else {}
    print(mint_offline(settings, user_id, ttl, **claims))


@cli.command("cleanup")
def cleanup_cmd(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; change nothing.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Remove orphaned uploads (never completed, never attached, or of deleted messages)."""
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
