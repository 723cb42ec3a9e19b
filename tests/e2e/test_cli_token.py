"""`threadline token` as a user runs it: a real process, fast because it loads no server code."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Any of these in the token command's imports means it pulls in the server (seconds of start-up).
SERVER_MODULES = {
    "grpc",
    "sqlalchemy",
    "aiohttp",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "google",
    "prometheus_client",
    "threadline_server.app",
    "threadline_server.auth",
    "threadline_server.observability",
    "threadline_server.transport",
    "threadline_server.storage",
}


def _token(
    data_dir: Path, *args: str, importtime: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env["THREADLINE_SERVER__DATA_DIR"] = str(data_dir)
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "threadline_server", "token", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return decoded


@pytest.mark.parametrize("ttl", ["0", "-5"])
def test_non_positive_ttl_is_a_usage_error(tmp_path: Path, ttl: str) -> None:
    result = _token(tmp_path / "data", "alice", "--ttl", ttl)
    assert result.returncode == 2
    assert f"must be a positive number of seconds, not {ttl}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_token_loads_no_server_modules(tmp_path: Path) -> None:
    result = _token(tmp_path / "data", "alice", "--ttl", "90", importtime=True)
    assert result.returncode == 0, result.stderr
    claims = _claims(result.stdout.strip())
    assert claims["sub"] == "alice"
    assert int(str(claims["exp"])) - int(str(claims["iat"])) == 90
    # `-X importtime` writes "import time: self | cumulative | module" per module imported.
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "threadline_server.issuer" in imported  # the parse found the token path's modules
    loaded_server = sorted(
        name
        for name in imported
        if any(name == m or name.startswith(m + ".") for m in SERVER_MODULES)
    )
    assert loaded_server == []
