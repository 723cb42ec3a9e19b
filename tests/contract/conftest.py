"""Blob backends for the contract suites: every test parametrized with `blob_backend` runs once
on local disk (behind its real HTTP handlers) and once on GCS (gcp-storage-emulator in a
subprocess, started once per session, a fresh bucket per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.blob_servers import GcsEmulator, local_blob_server
from threadline_server.blobs.gcs import GcsBlobStore
from threadline_server.domain.uploads import BlobStore


@dataclass
class Backend:
    name: str
    store: BlobStore
    http: httpx.AsyncClient
    emulator: GcsEmulator | None = None


def gcs_store(running: GcsEmulator) -> GcsBlobStore:
    """A GcsBlobStore on a fresh emulator bucket: anonymous API calls, URLs signed with the
    generated service-account key."""
    return GcsBlobStore.from_settings(
        running.new_bucket(),
        endpoint=running.endpoint,
        credentials_file=str(running.key_file),
        anonymous=True,
    )


@pytest.fixture(params=["local", "gcs"])
async def blob_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with httpx.AsyncClient(timeout=30) as client:
        if request.param == "local":
            async with local_blob_server(tmp_path / "data") as server:
                yield Backend("local", server.store, client)
            return
        running: GcsEmulator = request.getfixturevalue("emulator")
        yield Backend("gcs", gcs_store(running), client, running)


@pytest.fixture
async def gcs_backend(emulator: GcsEmulator) -> AsyncIterator[Backend]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield Backend("gcs", gcs_store(emulator), client, emulator)
