"""Shared fixtures: a real server on loopback, on SQLite (default) or PostgreSQL.

Set THREADLINE_TEST_DATABASE_URL=postgresql+asyncpg://... to run the same suite on PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support.blob_servers import GcsEmulator, gcs_emulator
from threadline_server.app import ThreadlineServer
from threadline_server.config import Settings
from threadline_server.storage.db import migrate

PG_URL = os.environ.get("THREADLINE_TEST_DATABASE_URL", "")
TABLES = (
    "uploads",
    "changes",
    "operations",
    "message_revisions",
    "thread_revisions",
    "messages",
    "thread_members",
    "threads",
    "users",
    "server_state",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure the server explicitly; stray THREADLINE_* settings must not leak in."""
    for key in list(os.environ):
        if key.startswith("THREADLINE_") and not key.startswith("THREADLINE_TEST_"):
            monkeypatch.delenv(key)


_pg_migrated = False


async def _reset_postgres() -> None:
    global _pg_migrated
    if not _pg_migrated:
        engine = create_async_engine(PG_URL)
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        await engine.dispose()
        await migrate(PG_URL)
        _pg_migrated = True
        return
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    await engine.dispose()


@pytest.fixture
async def db_url(tmp_path: Path) -> str:
    if PG_URL:
        await _reset_postgres()
        return PG_URL
    return f"sqlite+aiosqlite:///{tmp_path / 'threadline.db'}"


def make_settings(data_dir: Path, db_url: str, **sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "http_port": 0, "data_dir": data_dir, "shutdown_grace_s": 1.0},
        "database": {"url": db_url},
        # Throughput tests send hundreds of messages a second; the limit has its own tests.
        "limits": {"operations_per_minute": 0},
        # The grpc-web edge (Envoy) has its own tests; the others talk gRPC directly.
        "web": {"mode": "off"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def settings_factory(tmp_path: Path, db_url: str) -> Callable[..., Settings]:
    def factory(**sections: dict[str, Any]) -> Settings:
        return make_settings(tmp_path / "data", db_url, **sections)

    return factory


@pytest.fixture
async def server(settings_factory: Callable[..., Settings]) -> AsyncIterator[ThreadlineServer]:
    app = ThreadlineServer(settings_factory())
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


@pytest.fixture
def target(server: ThreadlineServer) -> str:
    assert server.endpoints is not None
    return f"127.0.0.1:{server.endpoints.grpc_port}"


@pytest.fixture
def token(server: ThreadlineServer) -> Callable[..., str]:
    def mint(user: str, ttl_s: int = 600, **claims: Any) -> str:
        return server.mint(user, ttl_s, **claims)

    return mint


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as ch:
        yield ch


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """gcp-storage-emulator in a subprocess, once per session (each user takes a new bucket)."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as running:
        yield running


def bearer(tok: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tok}"),)
