"""A port already taken: `threadline serve` says so in one line and exits 1, no traceback.

Real processes: one `threadline serve` holds its ports, a second is started on one of them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import ServerProcess, free_port


@pytest.fixture
def running(tmp_path: Path, db_url: str):
    proc = ServerProcess(tmp_path / "first", db_url)
    proc.start()
    yield proc
    proc.stop()


def _serve(running: ServerProcess, data_dir: Path, grpc_port: int, http_port: int):
    env = {
        **running.env,
        "THREADLINE_SERVER__DATA_DIR": str(data_dir),
        "THREADLINE_SERVER__PORT": str(grpc_port),
        "THREADLINE_SERVER__HTTP_PORT": str(http_port),
        "THREADLINE_DATABASE__URL": "",  # its own SQLite file: the first server's is not touched
    }
    return subprocess.run(
        [sys.executable, "-m", "threadline_server", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grpc_port_in_use(running: ServerProcess, tmp_path: Path) -> None:
    second = _serve(running, tmp_path / "second", running.grpc_port, free_port())
    assert second.returncode == 1, second.stderr
    line = (
        f"threadline: cannot listen on 127.0.0.1:{running.grpc_port} (address already in use); "
        "set server.port / THREADLINE_SERVER__PORT"
    )
    assert line in second.stderr.splitlines()
    assert "Traceback" not in second.stderr + second.stdout
    assert "listening" not in second.stdout


def test_http_port_in_use(running: ServerProcess, tmp_path: Path) -> None:
    second = _serve(running, tmp_path / "second", free_port(), running.http_port)
    assert second.returncode == 1, second.stderr
    line = (
        f"threadline: cannot listen on 127.0.0.1:{running.http_port} (address already in use); "
        "set server.http_port / THREADLINE_SERVER__HTTP_PORT"
    )
    assert line in second.stderr.splitlines()
    assert "Traceback" not in second.stderr + second.stdout
