"""Real blob backends for tests: the local store behind its aiohttp handlers on a loopback port,
and gcp-storage-emulator in a subprocess with a locally generated service-account key."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from threadline_server.blobs.local import LocalBlobStore
from threadline_server.transport.blob_http import LocalBlobHttp


@dataclass
class LocalServer:
    store: LocalBlobStore
    http: LocalBlobHttp
    base_url: str


@asynccontextmanager
async def local_blob_server(
    data_dir: Path,
    clock: Callable[[], float] = time.time,
    write_chunk: int | None = None,
) -> AsyncIterator[LocalServer]:
    """LocalBlobStore plus its handlers on 127.0.0.1:0, mounted as the lead mounts them."""
    base = {"url": ""}
    store = LocalBlobStore.open(data_dir, lambda: base["url"], clock=clock)
    http = LocalBlobHttp(store) if write_chunk is None else LocalBlobHttp(store, write_chunk)
    app = web.Application()
    http.add_routes(app.router)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    base["url"] = f"http://127.0.0.1:{port}"
    try:
        yield LocalServer(store, http, base["url"])
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GcsEmulator:
    endpoint: str
    key_file: Path
    public_key: rsa.RSAPublicKey

    def new_bucket(self) -> str:
        """A fresh bucket, so listings in one test never see another test's objects."""
        name = f"tl-{uuid.uuid4().hex[:12]}"
        response = httpx.post(f"{self.endpoint}/storage/v1/b", json={"name": name})
        response.raise_for_status()
        return name


def write_service_account(path: Path) -> rsa.RSAPublicKey:
    """A service-account JSON key with a fresh RSA key: what `gcloud iam service-accounts keys
    create` gives, minus Google having the public half (the emulator does not need it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "threadline-test",
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": "uploads@threadline-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return key.public_key()


@contextmanager
def gcs_emulator(workdir: Path) -> Iterator[GcsEmulator]:
    """gcp-storage-emulator on a free loopback port, in memory, stopped afterwards."""
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen(
        [str(exe), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory", "-q"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{endpoint}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.1)
        key_file = workdir / "signer.json"
        public_key = write_service_account(key_file)
        yield GcsEmulator(endpoint, key_file, public_key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
