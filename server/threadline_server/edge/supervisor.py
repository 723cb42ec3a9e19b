"""Runs Envoy as a child process and keeps it running.

The edge is a convenience in front of the real service, so its failures are contained: a crash
is logged, counted and followed by a restart after a capped, jittered backoff; the gRPC server
never depends on it. The child is tied to our life (the kernel's parent-death signal), so a
SIGKILLed Threadline never leaves an orphan Envoy holding the port for its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from threadline_server.edge.envoy_config import loopback_for

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 15.0
_STABLE_AFTER_S = 30.0  # a run this long resets the backoff
_STOP_GRACE_S = 5.0


class EdgeError(RuntimeError):
    """Envoy could not be started (bad binary, config refused, port taken)."""


def _tied_to_us(argv: list[str]) -> list[str]:
    """The command line that makes the kernel send Envoy SIGTERM when we die. util-linux's
    setpriv sets the parent-death signal and execs; a Python preexec_fn would do the same but
    forces fork(), which gRPC's fork handlers warn about on every start."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


class EnvoySupervisor:
    """Starts Envoy with a config file, waits until it listens, restarts it when it dies."""

    def __init__(
        self,
        binary: Path,
        config_path: Path,
        host: str,
        port: int,
        *,
        concurrency: int = 1,
        max_backoff_s: float = 30.0,
        on_restart: Callable[[], None] = lambda: None,
        on_state: Callable[[bool], None] = lambda _up: None,
    ) -> None:
        self.binary = binary
        self.config_path = config_path
        self.host = loopback_for(host)  # where the readiness probe connects
        self.port = port
        self.concurrency = concurrency
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self._on_restart = on_restart
        self._on_state = on_state
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._tail: deque[str] = deque(maxlen=20)  # Envoy's last words, for the error message
        self._relay_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Starts Envoy and returns once it accepts connections. If it cannot (the port is
        taken, say), that is logged and treated like a crash: the supervisor keeps retrying in
        the background and the gRPC server runs on regardless."""
        try:
            await self._spawn()
        except (EdgeError, OSError) as exc:
            logger.error("grpc-web edge did not start (retrying in the background): %s", exc)
        self._watcher = asyncio.create_task(self._watch(), name="edge-supervisor")

    async def _spawn(self) -> None:
        self._tail.clear()
        argv = [
            str(self.binary),
            "--config-path",
            str(self.config_path),
            "--disable-hot-restart",  # no shared memory: several edges may run on one machine
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            "warning",
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *_tied_to_us(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._relay_task = asyncio.create_task(self._relay(self._proc), name="edge-log")
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                break
            if await self._listening():
                self._on_state(True)
                return
            await asyncio.sleep(0.05)
        await self._terminate()
        detail = " | ".join(self._tail) or "no output"
        raise EdgeError(f"envoy did not start listening on {self.host}:{self.port}: {detail}")

    async def _listening(self) -> bool:
        try:
            _reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _relay(self, proc: asyncio.subprocess.Process) -> None:
        """Envoy's log lines (warnings and worse) into ours."""
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line[-300:])
                # While we stop it, Envoy's own warnings ("caught SIGTERM") are expected.
                level = logging.INFO if self._stopping else logging.WARNING
                logger.log(level, "envoy: %s", line[-1000:])

    async def _watch(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            code = await self._proc.wait() if self._proc is not None else None
            if self._stopping:
                return
            self._on_state(False)
            if time.monotonic() - started >= _STABLE_AFTER_S:
                attempt = 0
            delay = random.uniform(0, min(self.max_backoff_s, 0.1 * 2**attempt))  # full jitter
            logger.warning(
                "grpc-web edge exited with %s; restarting in %.2f s (gRPC is unaffected)",
                code,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._spawn()
            except (EdgeError, OSError) as exc:
                logger.error("grpc-web edge restart failed: %s", exc)
                continue
            self.restarts += 1
            self._on_restart()

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._terminate()
        self._on_state(False)

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
