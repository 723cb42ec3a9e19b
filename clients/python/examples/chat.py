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

Sends show up at once (pending, marked `…`) and are confirmed in place (on a terminal the line
is rewritten; into a pipe a `✓` line follows); if the server goes away the session reconnects on
its own and sends what you typed meanwhile. A token that cannot be had (`threadline token`
failing, a refused `--token`) ends the chat with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import shutil
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TextIO, TypeVar

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


def _one_line(text: str) -> str:
    """A CLI's error output as one line (Typer draws usage errors in a box over several)."""
    words = [line.strip(" │╭╮╰╯─\t") for line in text.splitlines()]
    kept = [w for w in words if w and not w.startswith(("Usage:", "Try '"))]
    return " ".join(kept) or "no error output"


async def mint(user: str) -> str:
    """Runs `threadline token USER` and returns the token."""
    try:
        process = await asyncio.create_subprocess_exec(
            *token_command(user), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise RuntimeError(f"cannot run threadline token: {exc}") from exc
    out, err = await process.communicate()
    if process.returncode != 0:
        why = _one_line(err.decode(errors="replace"))
        raise RuntimeError(f"threadline token exited {process.returncode}: {why}")
    return out.decode().strip().splitlines()[-1]


class TokenSource:
    """The SDK's token provider for `--user`: mints with `threadline token`.

    A failure is fatal for the chat (`on_failure`): what makes minting fail here (a config for
    another auth mode, no `threadline` to run) is not fixed by retrying, so the SDK's retries
    would only repeat the error until the user gives up.
    """

    def __init__(self, user: str) -> None:
        self.user = user
        self.on_failure: Callable[[str], None] = lambda why: None
        self._first: str | None = None

    async def prefetch(self) -> None:
        """Mints the first token now, so a failure ends the chat before anything starts."""
        self._first = await mint(self.user)

    async def __call__(self) -> str:
        if self._first is not None:
            token, self._first = self._first, None
            return token
        try:
            return await mint(self.user)
        except Exception as exc:
            self.on_failure(f"cannot get a token for {self.user}: {exc}")
            raise


class Stopped(Exception):
    """The chat must end; the message is the one line it prints."""


T = TypeVar("T")

HELP = (__doc__ or "").split("Commands", 1)[-1].split("Sends show", 1)[0].rstrip()


class Screen:
    """Prints lines, and shows a new version of a line it printed under a key.

    On a terminal the line is rewritten in place (ANSI: save the cursor, up one row, clear,
    write, restore) if it is still the last one and fits one row; once anything was printed or
    typed below it, the rows to go up are not known for sure (wrapped input, log output), so
    the new version is printed below instead. Into a pipe nothing can be rewritten: the new
    version follows as a line of its own, marked `✓`.
    """

    def __init__(self, out: TextIO, *, interactive: bool) -> None:
        self.out = out
        self.interactive = interactive
        self.written = 0  # lines printed, and input lines the terminal echoed
        self.keyed: dict[str, int] = {}  # key -> `written` just after its line (if one row)

    def _one_row(self, text: str) -> bool:
        return len(text) < shutil.get_terminal_size().columns

    def say(self, text: str, key: str | None = None) -> None:
        print(text, file=self.out, flush=True)
        self.written += 1
        if key is not None:
            self.keyed[key] = self.written if self._one_row(text) else -1

    def typed(self) -> None:
        """The terminal echoed an input line below what was printed."""
        if self.interactive:
            self.written += 1

    def update(self, key: str, text: str) -> None:
        """Shows the new version of the line printed under `key`."""
        after = self.keyed.pop(key, None)
        if after is None:
            return
        if not self.interactive:
            self.say(f"{text} ✓")
        elif after == self.written and self._one_row(text):
            self.out.write(f"\x1b7\x1b[1F\x1b[2K{text}\x1b8")
            self.out.flush()
        else:
            self.say(text)


class Chat:
    """Terminal front end: prints what changes, turns input lines into session calls."""

    def __init__(self, session: ThreadlineSession, screen: Screen) -> None:
        self.session = session
        self.screen = screen
        self.numbered: list[ThreadView] = []
        self.closing = False
        self.stopped: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        session.store.subscribe(self.on_change)

    def stop(self, why: str) -> None:
        """Ends the chat: `why` is printed as its last line and the exit status is 1."""
        if not self.stopped.done():
            self.stopped.set_result(why)

    async def until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Awaits `awaitable`; raises Stopped instead if the chat must end first."""
        task = asyncio.ensure_future(awaitable)
        waits: list[asyncio.Future[Any]] = [task, self.stopped]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self.stopped.done():
            task.cancel()
            raise Stopped(self.stopped.result())
        return task.result()

    @property
    def me(self) -> str:
        return self.session.state.user.id

    def say(self, text: str) -> None:
        self.screen.say(text)

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
            # OFFLINE without /quit: the session gave up (a token the server keeps refusing).
            if change.connection is ConnectionState.OFFLINE and not self.closing:
                self.stop(f"gave up connecting: {self.session.last_error or 'stopped'}")
        self.show_own(change)
        for event in change.events:
            self.on_event(event)
        for outcome in change.outcomes:
            if outcome.status is OpStatus.REJECTED and outcome.error is not None:
                self.say(f"!! {outcome.op.kind.value} failed: {outcome.error} (/retry to resend)")
            elif outcome.status is OpStatus.CONFLICT:
                self.say("!! your change conflicted with another one; kept the server's version")

    def show_own(self, change: Change) -> None:
        """Your own sends and edits: shown at once as pending, then confirmed in place."""
        active = self.session.state.ui.active_thread
        for m in change.messages:
            if m.local_id in self.screen.keyed and not m.pending:
                self.screen.update(m.local_id, self.line(m))
            elif change.kind is ChangeKind.LOCAL and m.pending and m.thread_id == active:
                self.screen.say(self.line(m), key=m.local_id)
        for m in change.removed:  # a rejected send leaves the thread for messages.failed
            self.screen.update(m.local_id, f"  {m.author_id}: {m.text} (failed)")

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


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Input lines, read by a daemon thread: a blocked read never holds up leaving (a thread
    of the default executor would keep the process alive until the user pressed Enter)."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        while True:
            line = sys.stdin.readline()
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line or None)  # "" is end of input
            except RuntimeError:  # the loop closed: the chat is over
                return
            if not line:
                return

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return lines


async def main(argv: list[str] | None = None) -> int:
    """Parses arguments, runs the chat until /quit or end of input; 1 when a token fails."""
    parser = argparse.ArgumentParser(description="A terminal chat on ThreadlineSession.")
    parser.add_argument("--target", default="localhost:50051", help="server address")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a bearer token (JWT)")
    who.add_argument("--user", help="mint tokens for this user with `threadline token`")
    parser.add_argument("--debug", action="store_true", help="log the SDK's debug output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    if not args.debug:
        # The chat prints connection changes and errors itself; the SDK's warnings would say
        # the same again between the chat's lines.
        logging.getLogger("threadline_client").setLevel(logging.ERROR)

    source = TokenSource(args.user) if args.user else None
    try:
        if source is not None:
            try:
                await source.prefetch()
            except Exception as exc:
                raise Stopped(f"cannot get a token for {args.user}: {exc}") from None
        session = await ThreadlineSession.connect(args.target, source or args.token, start=False)
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        chat = Chat(session, Screen(sys.stdout, interactive=interactive))
        if source is not None:
            source.on_failure = chat.stop
        await session.start()
        try:
            await run(chat)
        finally:
            chat.closing = True
            await session.close()
    except Stopped as stop:
        print(f"chat: {stop}", file=sys.stderr, flush=True)
        return 1
    return 0


async def run(chat: Chat) -> None:
    """Reads commands until /quit or end of input (Stopped if the chat must end)."""
    session = chat.session
    lines = _stdin_lines(asyncio.get_running_loop())
    try:
        await chat.until_stopped(session.wait_connection(ConnectionState.ONLINE, timeout=15))
    except TimeoutError:
        chat.say(f"!! not online yet ({session.last_error}); still trying in the background")
    else:
        chat.say(f"signed in as {chat.me}; /threads to list, /quit to leave")
    while (line := await chat.until_stopped(lines.get())) is not None:
        chat.screen.typed()
        if not await chat.handle(line.strip()):
            break
    # Give queued sends a moment to go out before leaving.
    with contextlib.suppress(TimeoutError):
        await chat.until_stopped(session.wait_until(lambda s: not s.ops.pending, timeout=5))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
