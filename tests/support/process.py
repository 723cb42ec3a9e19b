"""Runs `threadline serve` as a real process, for crash, signal and CLI tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`threadline serve` with its own data directory and fixed loopback ports."""

    def __init__(self, data_dir: Path, db_url: str, **env: str) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")},
            "THREADLINE_SERVER__DATA_DIR": str(data_dir),
            "THREADLINE_SERVER__PORT": str(self.grpc_port),
            "THREADLINE_SERVER__HTTP_PORT": str(self.http_port),
            "THREADLINE_DATABASE__URL": db_url,
            "THREADLINE_LIMITS__OPERATIONS_PER_MINUTE": "0",
            "THREADLINE_WEB__MODE": "off",  # the grpc-web edge has its own tests
            **env,
        }
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def cli(self, *args: str) -> str:
        """Runs another `threadline` subcommand against the same configuration."""
        result = subprocess.run(
            [sys.executable, "-m", "threadline_server", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return result.stdout.strip()

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threadline_server", "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if "storage" in line and "auth" in line:  # the last line `serve` prints when ready
                return
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.output))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_output()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_output()
        return code

    def _close_output(self) -> None:
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self.output.extend(self.proc.stdout.readlines())
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_output()
