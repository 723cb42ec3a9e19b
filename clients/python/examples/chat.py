"""A terminal chat on `ThreadlineSession`: run it in two terminals against `threadline serve`.

    threadline serve                                   # embedded auth on localhost:50051
    python clients/python/examples/chat.py --user alice
    python clients/python/examples/chat.py --user bob

`--user NAME` mints tokens with `threadline token NAME` (same environment and config as the
server, so the same data directory and ports); `--token JWT` uses a token you already have.

Commands (anything else is sent to the open thread):

    /threads                 list your threads (numbered)
    /new TITLE [USER ...]    create a thread (quote a title with spaces) and open it
    /open N                  open thread N and show its recent messages
    /edit TEXT               replace the text of your last message here
    /delete                  delete your last message here
    /archive                 archive the open thread (/unarchive to undo)
    /retry                   resend failed messages with their original ids
    /quit                    leave

Sends show up at once (pending, marked `…`) and are confirmed in place; if the server goes away
the session reconnects on its own and sends what you typed meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import shutil
import sys

from threadline.v1 import realtime_pb2
from threadline_client import (
    Change,
    ChangeKind,
    ConnectionState,
    LocalMessage,
    OpStatus,
    ThreadlineSession,
    ThreadView,
)


def token_command(user: str) -> list[str]:
    """The command that mints a token for `user` (the CLI on PATH, else this interpreter's)."""
    cli = shutil.which("threadline")
    if cli:
        return [cli, "token", user]
    return [sys.executable, "-m", "threadline_server", "token", user]


async def mint(user: str) -> str:
    """Runs `threadline token USER` and returns the token (a token provider for the SDK)."""
    process = await asyncio.create_subprocess_exec(
        *token_command(user), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"threadline token failed: {err.decode().strip()}")
    return out.decode().strip().splitlines()[-1]


HELP = (__doc__ or "").split("Commands", 1)[-1].split("Sends show", 1)[0].rstrip()


class Chat:
    """Terminal front end: prints what changes, turns input lines into session calls."""

    def __init__(self, session: ThreadlineSession) -> None:
        self.session = session
        self.numbered: list[ThreadView] = []
        session.store.subscribe(self.on_change)

    @property
    def me(self) -> str:
        return self.session.state.user.id

    def say(self, text: str) -> None:
        print(text, flush=True)

    def title(self, thread_id: str) -> str:
        view = self.session.store.thread(thread_id)
        return view.title if view is not None else thread_id[:8]

    def line(self, m: LocalMessage) -> str:
        mark = " …" if m.pending else (" (edited)" if m.edited else "")
        text = "(deleted)" if m.deleted else m.text
        return f"  {m.author_id}: {text}{mark}"

    # -- notifications --------------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.CONNECTION and change.connection is not None:
            self.say(f"-- {change.connection.value}")
        for event in change.events:
            self.on_event(event)
        for outcome in change.outcomes:
            if outcome.status is OpStatus.REJECTED and outcome.error is not None:
                self.say(f"!! {outcome.op.kind.value} failed: {outcome.error} (/retry to resend)")
            elif outcome.status is OpStatus.CONFLICT:
                self.say("!! your change conflicted with another one; kept the server's version")

    def on_event(self, event: realtime_pb2.Event) -> None:
        kind = event.kind
        active = self.session.state.ui.active_thread
        if kind == realtime_pb2.EVENT_KIND_MESSAGE_CREATED and event.actor_id != self.me:
            where = "" if event.thread_id == active else f"[{self.title(event.thread_id)}] "
            self.say(f"{where}{event.message.author_id}: {event.message.text}")
            if event.thread_id == active:
                self.session.mark_read(event.thread_id, event.message.seq)
        elif kind == realtime_pb2.EVENT_KIND_MESSAGE_UPDATED and event.actor_id != self.me:
            self.say(f"{event.message.author_id} edited: {event.message.text}")
        elif kind == realtime_pb2.EVENT_KIND_MESSAGE_DELETED and event.actor_id != self.me:
            self.say(f"{event.message.author_id} deleted a message")
        elif kind == realtime_pb2.EVENT_KIND_THREAD_CREATED and event.actor_id != self.me:
            self.say(f"-- {event.actor_id} added you to “{event.thread.title}” (/threads)")

    # -- commands -------------------------------------------------------------------------------

    async def handle(self, text: str) -> bool:
        """Runs one input line; returns False to quit."""
        if not text.startswith("/"):
            active = self.session.state.ui.active_thread
            if active is None:
                self.say("open a thread first (/threads, /open N, /new TITLE USER...)")
            elif text:
                self.session.send(active, text)
            return True
        try:
            words = shlex.split(text)
        except ValueError as exc:
            self.say(f"!! {exc}")
            return True
        command, args = words[0], words[1:]
        if command == "/quit":
            return False
        handler = {
            "/threads": self.cmd_threads,
            "/new": self.cmd_new,
            "/open": self.cmd_open,
            "/edit": self.cmd_edit,
            "/delete": self.cmd_delete,
            "/archive": self.cmd_archive,
            "/unarchive": self.cmd_archive,
            "/retry": self.cmd_retry,
        }.get(command)
        if handler is None:
            self.say(HELP)
            return True
        try:
            await handler(command, args)
        except (KeyError, ValueError, IndexError) as exc:
            self.say(f"!! {exc}")
        return True

    async def cmd_threads(self, command: str, args: list[str]) -> None:
        threads = self.session.state.threads
        self.numbered = [*threads.active, *threads.archived]
        if not self.numbered:
            self.say("no threads yet: /new TITLE USER...")
        for n, view in enumerate(self.numbered, 1):
            flags = " (archived)" if view.archived else ""
            unread = f" [{view.unread_count} unread]" if view.unread_count else ""
            people = ", ".join(p for p in view.participant_ids if p != self.me) or "just you"
            self.say(f"{n:>3}. {view.title} — {people}{unread}{flags}")

    async def cmd_new(self, command: str, args: list[str]) -> None:
        if not args:
            raise ValueError("usage: /new TITLE [USER ...]")
        view = await self.session.create_thread(args[0], args[1:])
        self.open(view)

    async def cmd_open(self, command: str, args: list[str]) -> None:
        if not self.numbered:
            await self.cmd_threads(command, [])
        self.open(self.numbered[int(args[0]) - 1])

    def open(self, view: ThreadView) -> None:
        self.session.set_active_thread(view.id)
        self.say(f"== {view.title}")
        items = self.session.state.messages.by_thread.get(view.id, [])
        for m in items[-20:]:
            self.say(self.line(m))
        if view.unread_count:
            self.session.mark_read(view.id)

    def my_last(self) -> LocalMessage:
        active = self.session.state.ui.active_thread
        items = self.session.state.messages.by_thread.get(active or "", [])
        for m in reversed(items):
            if m.author_id == self.me and m.id and not m.deleted:
                return m
        raise ValueError("no message of yours here to change")

    async def cmd_edit(self, command: str, args: list[str]) -> None:
        if not args:
            raise ValueError("usage: /edit TEXT")
        self.session.edit(self.my_last().id, " ".join(args))

    async def cmd_delete(self, command: str, args: list[str]) -> None:
        self.session.delete(self.my_last().id)

    async def cmd_archive(self, command: str, args: list[str]) -> None:
        active = self.session.state.ui.active_thread
        if active is None:
            raise ValueError("open a thread first")
        self.session.archive(active, command == "/archive")

    async def cmd_retry(self, command: str, args: list[str]) -> None:
        failed = list(self.session.state.ops.failed)
        for op_id in failed:
            self.session.retry(op_id)
        self.say(f"resending {len(failed)} operation(s)")


async def main(argv: list[str] | None = None) -> int:
    """Parses arguments, runs the chat until /quit or end of input."""
    parser = argparse.ArgumentParser(description="A terminal chat on ThreadlineSession.")
    parser.add_argument("--target", default="localhost:50051", help="server address")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a bearer token (JWT)")
    who.add_argument("--user", help="mint tokens for this user with `threadline token`")
    parser.add_argument("--debug", action="store_true", help="log the SDK's debug output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)

    user = args.user
    provider = args.token if args.token else (lambda: mint(user))
    session = await ThreadlineSession.connect(args.target, provider, start=False)
    chat = Chat(session)
    await session.start()
    try:
        try:
            await session.wait_connection(ConnectionState.ONLINE, timeout=15)
        except TimeoutError:
            chat.say(f"!! not online yet ({session.last_error}); still trying in the background")
        else:
            chat.say(f"signed in as {chat.me}; /threads to list, /quit to leave")
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:  # end of input
                break
            if not await chat.handle(line.strip()):
                break
        # Give queued sends a moment to go out before leaving.
        with contextlib.suppress(TimeoutError):
            await session.wait_until(lambda s: not s.ops.pending, timeout=5)
    finally:
        await session.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
