"""clients/python/examples/chat.py as a user runs it: a real process on pipes, a real server.

Its tokens come from the real `threadline token` (run by the chat, with the server's settings).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

from threadline_client import ThreadlineClient
from threadline_server.app import ThreadlineServer

CHAT = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples" / "chat.py"


class ChatProcess:
    """The chat on pipes: type lines, wait for output lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, target: str, *args: str, **env: str) -> ChatProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHAT),
            "--target",
            target,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**clean, **env},
        )
        return cls(proc)

    async def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    async def expect(self, wanted: str, timeout: float = 30.0) -> None:
        """Reads output until a line equal to `wanted` (generous timeout: a hang, not speed)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while wanted not in self.lines:
                raw = await self.proc.stdout.readline()
                assert raw, f"chat ended before {wanted!r}; output: {self.lines}"
                self.lines.append(raw.decode().rstrip("\n"))

    async def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Waits for the chat to exit (stdin left open); returns (status, stdout, stderr)."""
        async with asyncio.timeout(timeout):
            out, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, "\n".join([*self.lines, out.decode()]), err.decode()


def _cli_env(server: ThreadlineServer) -> dict[str, str]:
    """The settings `threadline token` needs to sign for this server's issuer."""
    assert server.endpoints is not None
    return {
        "THREADLINE_SERVER__DATA_DIR": str(server.settings.server.data_dir),
        "THREADLINE_SERVER__HTTP_PORT": str(server.endpoints.http_port),
    }


async def test_own_send_is_pending_then_confirmed_in_place(
    server: ThreadlineServer, target: str, token: Callable[..., str]
) -> None:
    chat = await ChatProcess.start(target, "--user", "alice", **_cli_env(server))
    try:
        await chat.expect("signed in as alice; /threads to list, /quit to leave")
        await chat.type("/new Lunch bob")
        await chat.expect("== Lunch")
        await chat.type("noon?")
        await chat.expect("  alice: noon? ✓")
        # Shown at once as pending, then the same line confirmed (into a pipe: a ✓ line).
        assert chat.lines[-2:] == ["  alice: noon? …", "  alice: noon? ✓"]
        async with ThreadlineClient(target, lambda: token("bob")) as bob:
            (summary,) = [s async for s in bob.iter_threads()]
            texts = [m.text async for m in bob.iter_messages(summary.thread.id)]
        assert texts == ["noon?"]
        await chat.type("/quit")
        status, _, err = await chat.finish()
    finally:
        if chat.proc.returncode is None:
            chat.proc.kill()
            await chat.proc.wait()
    assert status == 0, err
    assert "Traceback" not in err


async def test_failing_token_provider_is_one_line_and_status_1(
    server: ThreadlineServer, target: str
) -> None:
    # `threadline token` refuses to mint outside embedded mode: the provider fails every time.
    env = {**_cli_env(server), "THREADLINE_AUTH__MODE": "clerk"}
    chat = await ChatProcess.start(target, "--user", "alice", **env)
    status, out, err = await chat.finish()  # stdin stays open: it must not wait for input
    assert status == 1
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("chat: cannot get a token for alice: threadline token exited 2: ")
    assert "tokens can only be minted in embedded auth mode" in line


async def test_refused_token_gives_up_with_one_line(target: str) -> None:
    chat = await ChatProcess.start(target, "--token", "a.b.c")
    status, out, err = await chat.finish()
    assert status == 1, out
    assert err.splitlines() == [
        "chat: gave up connecting: UNAUTHENTICATED: invalid token: not a well-formed JWT "
        "[TOKEN_INVALID]"
    ]
