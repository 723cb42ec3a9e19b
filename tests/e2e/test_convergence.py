"""A seeded, randomized convergence run: clients, chaos, one server restart, then one truth.

Four users (alice, bob, carol, dave), each a real `ThreadlineSession`, share a few threads.
A seeded schedule of about 100 steps has random clients issue operations optimistically:
sends, edits and deletes of their own messages, thread title / description / tags changes
(also two users at once from the same version, which the server merges three-way or answers
with a conflict), archive / unarchive, read markers, participant removals (and, in the `full`
mode, additions and re-additions) and new threads. Between
them, connections are cut at random points: a stream killed right after an operation went out
(outcome unknown, mid-send), a stream dropped at a random moment, a session paused for a while
(operations queue up offline). The server is stopped once mid-run and a new one is started on
the same port and data (SQLite file or PostgreSQL database) while clients keep queueing.

At the end every client reconnects and settles (online, nothing pending), and the run proves:

* every client's state equals the server's: its `snapshot_view`, read markers, unread counts
  and last messages equal a fresh snapshot of that user;
* no acknowledged message is lost and none is duplicated: the server's messages are exactly
  the confirmed sends (ids and (thread, seq) unique), each once, by its author in its thread;
* per-thread order: every thread's seqs are exactly 1..last_seq, no gaps;
* every confirmed operation is reflected exactly once: the versions confirmed for a message's
  edits/deletes and for a thread's changes are exactly 2..its current version (an operation
  applied twice or lost would leave a gap or an unexplained version), the resource of the last
  one is the current state, and every confirmed thread creation made exactly one thread;
* no operation got two outcomes, and the only refusals were NOT_FOUND (the user had been
  removed from the thread meanwhile).

Seeds: a fixed one plus three from `random.SystemRandom`, each its own test case whose id
carries the seed (a failure also notes it). `THREADLINE_TEST_SEED=<n>` adds a case for one
seed, to replay a failure's schedule (timing still varies from run to run).

The last test stops servers without grace in the middle of stream handshakes (the restart
above may do the same) and checks that the database stays usable for the next server.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tests.e2e.test_state_equivalence import Observed, assert_equivalent, fresh
from tests.support.process import free_port
from tests.support.raw_stream import RawStream
from threadline.v1 import message_pb2, thread_pb2, thread_service_pb2
from threadline.v1 import realtime_pb2 as rt
from threadline_client import Backoff, ThreadlineClient
from threadline_client.errors import (
    Cancelled,
    DeadlineExceeded,
    ThreadlineError,
    Unavailable,
    Unknown,
)
from threadline_client.session import ThreadlineSession
from threadline_client.state import Change, ConnectionState, OpKind, OpOutcome, OpStatus
from threadline_server.app import ThreadlineServer
from threadline_server.config import Settings

FIXED_SEED = 20261124
USERS = ("alice", "bob", "carol", "dave")
STEPS = 100
HISTORY = 500  # every message of every thread fits in one snapshot
FAST = Backoff(initial=0.05, maximum=0.4)
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")
TAGS = ("red", "green", "blue", "urgent", "later")
_RETRY_UNARY = (Unavailable, DeadlineExceeded, Cancelled, Unknown)


def _seeds() -> list[int]:
    system = random.SystemRandom()
    seeds = [FIXED_SEED, *(system.randrange(2**32) for _ in range(3))]
    extra = os.environ.get("THREADLINE_TEST_SEED")
    if extra:
        seeds.insert(0, int(extra))
    return seeds


# The fixed seed runs in `full` mode (participant additions too: a joined thread is filled in
# while messages keep arriving, being edited and deleted); the random seeds run with removals.
CASES = [pytest.param(FIXED_SEED, "full", id=f"seed={FIXED_SEED}-with-additions")] + [
    pytest.param(seed, "removals", id=f"seed={seed}") for seed in _seeds()
]


# -- bookkeeping ----------------------------------------------------------------------------------


@dataclass
class Unary:
    """A participant change sent with a unary RPC (retried with the same op id)."""

    user: str
    kind: str  # "add" or "remove"
    thread_id: str
    who: str
    op_id: str
    result: thread_pb2.Thread | None = None
    error: ThreadlineError | None = None
    attempts: int = 0


@dataclass
class Stats:
    """What the chaos actually did (printed with a failure, checked for a minimum)."""

    steps: Counter[str] = field(default_factory=Counter)
    cut_in_flight: int = 0  # streams killed with a sent, unanswered operation
    resent: int = 0  # confirmed operations that were sent more than once
    unary_retries: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "kind:status"


class Run:
    """The clients, the server and everything the clients were told."""

    def __init__(self, seed: int, mode: str, settings: Settings) -> None:
        self.seed = seed
        self.mode = mode
        self.rng = random.Random(seed)
        self.settings = settings
        self.target = f"127.0.0.1:{settings.server.port}"
        self.app: ThreadlineServer | None = None
        self.tokens: dict[str, Callable[[], str]] = {}
        self.sessions: dict[str, ThreadlineSession] = {}
        self.outcomes: dict[str, dict[str, OpOutcome]] = {u: {} for u in USERS}
        self.twice: list[tuple[str, str]] = []  # (user, op id) that got a second outcome
        self.unary: list[Unary] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.paused: dict[str, int] = {}  # user -> steps until resumed
        self.protected: set[tuple[str, str]] = set()  # (thread, user) never removed
        self.initial_threads: list[str] = []
        self.creates = 0
        self.counter = itertools.count(1)
        self.stats = Stats()

    # -- setup ----------------------------------------------------------------------------------

    async def start_server(self) -> None:
        self.app = ThreadlineServer(self.settings)
        await self.app.start()

    async def stop_server(self, grace: float) -> None:
        if self.app is not None:
            await self.app.stop(grace=grace)
            self.app = None

    async def open(self) -> None:
        await self.start_server()
        assert self.app is not None
        for user in USERS:
            # Minted once: the signing key lives in the data dir, the issuer keeps its port.
            self.tokens[user] = functools.partial(str, self.app.mint(user, 3600))
        async with ThreadlineClient(self.target, self.tokens["alice"]) as alice:
            everyone = await alice.create_thread("All hands", ["bob", "carol", "dave"])
            pair = await alice.create_thread("Pair", ["bob"])
        async with ThreadlineClient(self.target, self.tokens["carol"]) as carol:
            trio = await carol.create_thread("Trio", ["bob", "dave"], description=" ".join(WORDS))
        self.initial_threads = [everyone.id, pair.id, trio.id]
        for user in USERS:
            session = await ThreadlineSession.connect(
                self.target, self.tokens[user], backoff=FAST, history=HISTORY, start=False
            )
            session.store.subscribe(functools.partial(self._record, user))
            self.sessions[user] = session
            await session.start()
        for session in self.sessions.values():
            await session.wait_connection(ConnectionState.ONLINE)
        if self.mode == "full":
            # Make sure the run contains a join to a thread with history, and keep it.
            author = self.sessions["alice"]
            sent = author.send(pair.id, "before carol joined")
            assert (await author.wait_op(sent)).status is OpStatus.CONFIRMED
            join = Unary("alice", "add", pair.id, "carol", "add-carol-to-pair")
            await self._call(join)
            assert join.result is not None
            self.unary.append(join)
            self.protected.add((pair.id, "carol"))

    def _record(self, user: str, change: Change) -> None:
        for outcome in change.outcomes:
            seen = self.outcomes[user]
            if outcome.op.op_id in seen:
                self.twice.append((user, outcome.op.op_id))
            seen[outcome.op.op_id] = outcome

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.sessions.values()))
        await self.stop_server(0.5)

    # -- the schedule ---------------------------------------------------------------------------

    async def run(self) -> None:
        rng = self.rng
        restart_at = rng.randrange(STEPS * 2 // 5, STEPS * 3 // 5)
        forced_mid_send = {rng.randrange(5, STEPS // 3), rng.randrange(STEPS * 2 // 3, STEPS)}
        for step in range(STEPS):
            if step == restart_at:
                await self.restart()
            user = rng.choice(USERS)
            # A forced cut needs a connected user who can still post (removals may leave none).
            able = [u for u in USERS if u not in self.paused and self._threads(u)]
            if step in forced_mid_send and able:
                if not await self.cut_mid_send(rng.choice(able)):
                    self.stats.steps["cut_mid_send:skipped"] += 1
            else:
                await self.step(user)
            await self.tick_paused()
            await asyncio.sleep(rng.choice((0, 0.005, 0.01, 0.03, 0.06)))

    async def step(self, user: str) -> None:
        choices: list[tuple[str, int]] = [
            ("send", 30),
            ("edit", 10),
            ("delete", 5),
            ("update", 9),
            ("concurrent_update", 4),
            ("archive", 5),
            ("mark_read", 7),
            ("remove", 3),
            ("create", 2 if self.creates < 2 else 0),
            ("cut", 4),
            ("cut_mid_send", 3),
            ("pause", 2),
        ]
        if self.mode == "full":
            choices.append(("add", 4))
        names, weights = zip(*choices, strict=True)
        action = self.rng.choices(names, weights)[0]
        done = await getattr(self, action)(user)
        self.stats.steps[action if done is not False else f"{action}:skipped"] += 1

    def _text(self, user: str) -> str:
        words = " ".join(self.rng.sample(WORDS, 3))
        return f"{user}-{next(self.counter)} {words}"

    def _threads(self, user: str) -> list[str]:
        return sorted(self.sessions[user].state.threads.by_id)

    # -- operations (optimistic, through the session) ---------------------------------------

    async def send(self, user: str) -> bool:
        threads = self._threads(user)
        if not threads:
            return False
        self.sessions[user].send(self.rng.choice(threads), self._text(user))
        return True

    def _own_messages(self, user: str) -> list[str]:
        state = self.sessions[user].state
        return sorted(
            m.id
            for items in state.messages.by_thread.values()
            for m in items
            if m.author_id == user and m.server is not None and not m.deleted
        )

    async def edit(self, user: str) -> bool:
        mine = self._own_messages(user)
        if not mine:
            return False
        self.sessions[user].edit(self.rng.choice(mine), self._text(user))
        return True

    async def delete(self, user: str) -> bool:
        mine = self._own_messages(user)
        if not mine:
            return False
        self.sessions[user].delete(self.rng.choice(mine))
        return True

    async def update(self, user: str) -> bool:
        threads = self._threads(user)
        if not threads:
            return False
        session = self.sessions[user]
        view = session.state.threads.by_id[self.rng.choice(threads)]
        fields: dict[str, Any] = {}
        for name in self.rng.sample(("title", "description", "tags"), self.rng.randint(1, 2)):
            if name == "title":
                fields["title"] = f"{self.rng.choice(WORDS)} {next(self.counter)}"
            elif name == "description":
                words = view.description.split() or list(WORDS[:4])
                words[self.rng.randrange(len(words))] = f"{user}{next(self.counter)}"
                fields["description"] = " ".join(words)
            else:
                fields["tags"] = sorted(self.rng.sample(TAGS, self.rng.randint(0, 3)))
        session.update_thread(view.id, **fields)
        return True

    async def concurrent_update(self, user: str) -> bool:
        """Two users change the same thread from the same version at once: the server merges
        (different description words, tags) or answers a conflict (both changed the title)."""
        shared = [
            (tid, other)
            for tid in self._threads(user)
            for other in USERS
            if other != user and tid in self.sessions[other].state.threads.by_id
        ]
        if not shared:
            return False
        thread_id, other = self.rng.choice(sorted(shared))
        for who in (user, other):
            view = self.sessions[who].state.threads.by_id[thread_id]
            words = view.description.split() or list(WORDS[:4])
            words[self.rng.randrange(len(words))] = f"{who}{next(self.counter)}"
            fields: dict[str, Any] = {"description": " ".join(words)}
            if self.rng.random() < 0.5:
                fields["title"] = f"{who} {next(self.counter)}"
            if self.rng.random() < 0.5:
                fields["tags"] = sorted({*view.tags, self.rng.choice(TAGS)})
            self.sessions[who].update_thread(thread_id, **fields)
        return True

    async def archive(self, user: str) -> bool:
        threads = self._threads(user)
        if not threads:
            return False
        session = self.sessions[user]
        view = session.state.threads.by_id[self.rng.choice(threads)]
        session.archive(view.id, not view.archived)
        return True

    async def mark_read(self, user: str) -> bool:
        threads = self._threads(user)
        if not threads:
            return False
        return self.sessions[user].mark_read(self.rng.choice(threads)) is not None

    async def create(self, user: str) -> bool:
        others = [u for u in USERS if u != user]
        invited = self.rng.sample(others, self.rng.randint(1, len(others)))
        self.sessions[user].store.queue_create_thread(f"new {next(self.counter)}", invited)
        self.creates += 1
        return True

    # -- participant changes (unary, retried with the same op id) -------------------------------

    async def remove(self, user: str) -> bool:
        state = self.sessions[user].state
        mine = [v for v in state.threads.by_id.values() if v.creator_id == user]
        candidates = [
            (v.id, p)
            for v in mine
            for p in v.participant_ids
            if p != user and (v.id, p) not in self.protected
        ]
        if not candidates:
            return False
        thread_id, who = self.rng.choice(sorted(candidates))
        self._unary(Unary(user, "remove", thread_id, who, f"rm-{user}-{next(self.counter)}"))
        return True

    async def add(self, user: str) -> bool:
        state = self.sessions[user].state
        candidates = [
            (v.id, u)
            for v in state.threads.by_id.values()
            for u in USERS
            if u not in v.participant_ids
        ]
        if not candidates:
            return False
        thread_id, who = self.rng.choice(sorted(candidates))
        self._unary(Unary(user, "add", thread_id, who, f"add-{user}-{next(self.counter)}"))
        return True

    def _unary(self, call: Unary) -> None:
        self.unary.append(call)
        self.tasks.append(asyncio.create_task(self._call(call)))

    async def _call(self, call: Unary) -> None:
        client = self.sessions[call.user].client
        method = client.add_participants if call.kind == "add" else client.remove_participants
        for _ in range(200):
            call.attempts += 1
            try:
                call.result = await method(
                    call.thread_id, [call.who], client_op_id=call.op_id, timeout=2
                )
                return
            except _RETRY_UNARY:
                self.stats.unary_retries += 1
                await asyncio.sleep(0.05)
            except ThreadlineError as exc:
                call.error = exc
                return
        raise AssertionError(f"{call} never got an answer")

    # -- chaos ----------------------------------------------------------------------------------

    async def cut(self, user: str) -> bool:
        """Drops the user's stream at whatever point it is (the session reconnects)."""
        stream = self.sessions[user].stream
        if stream is None:
            return False
        if any(op.sent for op in self.sessions[user].state.ops.pending):
            self.stats.cut_in_flight += 1
        await stream.close(grace=self.rng.choice((0.0, 0.0, 0.01)))
        return True

    async def cut_mid_send(self, user: str) -> bool:
        """Sends a message and kills the stream once an operation is out but unanswered."""
        if user in self.paused:
            return False
        session = self.sessions[user]
        await session.wait_connection(ConnectionState.ONLINE, timeout=10)
        if not await self.send(user):
            return False
        # The flusher sends pending operations one at a time; wait until one is on the wire.
        # No await between the check and the close: its answer cannot have been applied.
        async with asyncio.timeout(5):
            while not (session.state.ops.pending and session.state.ops.pending[0].sent):
                await asyncio.sleep(0)
        stream = session.stream
        if stream is None:
            return False
        self.stats.cut_in_flight += 1
        await stream.close(grace=self.rng.choice((0.0, 0.0, 0.005, 0.02)))
        return True

    async def pause(self, user: str) -> bool:
        if user in self.paused:
            return False
        await self.sessions[user].stop()
        self.paused[user] = self.rng.randint(3, 15)
        return True

    async def tick_paused(self) -> None:
        for user in list(self.paused):
            self.paused[user] -= 1
            if self.paused[user] <= 0:
                del self.paused[user]
                await self.sessions[user].start()

    async def restart(self) -> None:
        """Stops the server, keeps issuing operations while it is down, starts a new one."""
        await self.stop_server(self.rng.choice((0.0, 0.3)))
        for _ in range(self.rng.randint(2, 6)):
            user = self.rng.choice(USERS)
            await (self.send if self.rng.random() < 0.6 else self.update)(user)
            await asyncio.sleep(self.rng.choice((0, 0.02, 0.05)))
        await self.start_server()
        self.stats.steps["restart"] += 1

    # -- the end --------------------------------------------------------------------------------

    async def settle(self) -> None:
        for user in list(self.paused):
            await self.sessions[user].start()
        self.paused.clear()
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout=60)
        for user, session in self.sessions.items():
            try:
                await session.wait_until(
                    lambda s: s.connection is ConnectionState.ONLINE and not s.ops.pending,
                    timeout=30,
                )
            except TimeoutError:
                pending = [(op.kind, op.attempts, op.error) for op in session.state.ops.pending]
                raise AssertionError(
                    f"{user} did not settle: {session.connection}, pending {pending}, "
                    f"last error {session.last_error}"
                ) from None


# -- the checks -----------------------------------------------------------------------------------


async def all_messages(client: ThreadlineClient, thread_id: str) -> list[message_pb2.Message]:
    forward = thread_service_pb2.ListMessagesRequest.DIRECTION_FORWARD
    return [m async for m in client.iter_messages(thread_id, forward, page_size=200)]


async def check_clients_equal_server(run: Run) -> dict[str, Observed]:
    views: dict[str, Observed] = {}
    for user, session in run.sessions.items():
        expected = await fresh(run.target, run.tokens[user])
        await assert_equivalent(session, expected, timeout=10, who=user)
        views[user] = expected
    return views


async def check_server_truth(run: Run, views: dict[str, Observed]) -> None:
    confirmed = {
        (user, op_id): outcome
        for user, outcomes in run.outcomes.items()
        for op_id, outcome in outcomes.items()
        if outcome.status is OpStatus.CONFIRMED
    }
    assert run.twice == [], f"operations answered twice: {run.twice}"
    # The only legitimate refusal here: the user was removed from the thread meanwhile.
    refused = [
        f"{user} {o.op.kind}: {o.error}"
        for user, outcomes in run.outcomes.items()
        for o in outcomes.values()
        if o.status is OpStatus.REJECTED and (o.error is None or o.error.code != "NOT_FOUND")
    ]
    refused += [
        f"{c.user} {c.kind}: {c.error}"
        for c in run.unary
        if c.error is not None and c.error.code is not grpc.StatusCode.NOT_FOUND
    ]
    assert refused == [], refused

    # Every thread is visible to its creator (creators are never removed).
    threads: dict[str, thread_pb2.Thread] = {}
    for view in views.values():
        for thread_id in view.view.threads:
            threads.setdefault(thread_id, thread_pb2.Thread())
    created = [
        o.resource.thread.id
        for o in confirmed.values()
        if o.op.kind is OpKind.CREATE_THREAD and o.resource is not None
    ]
    assert len(created) == len(set(created)), "a thread creation was applied twice"
    assert set(threads) == set(run.initial_threads) | set(created), "threads lost or extra"

    messages: dict[str, message_pb2.Message] = {}
    for thread_id in threads:
        reader = next(u for u, v in views.items() if thread_id in v.view.threads)
        async with ThreadlineClient(run.target, run.tokens[reader]) as client:
            summary = await client.get_thread(thread_id)
            threads[thread_id] = summary.thread
            items = await all_messages(client, thread_id)
        seqs = [m.seq for m in items]
        assert seqs == list(range(1, summary.thread.last_seq + 1)), f"seqs of {thread_id}: {seqs}"
        for m in items:
            assert m.id not in messages, f"message {m.id} twice"
            messages[m.id] = m

    # Messages: exactly the confirmed sends, each once, where it was sent, by its author.
    sends = {
        o.resource.message.id: (user, o)
        for (user, _), o in confirmed.items()
        if o.op.kind is OpKind.SEND_MESSAGE and o.resource is not None
    }
    assert len(sends) == sum(1 for o in confirmed.values() if o.op.kind is OpKind.SEND_MESSAGE), (
        "two confirmed sends share a message"
    )
    assert set(messages) == set(sends), (
        f"lost: {sorted(set(sends) - set(messages))}, unexplained: "
        f"{sorted(set(messages) - set(sends))}"
    )
    for message_id, (user, outcome) in sends.items():
        m = messages[message_id]
        assert (m.author_id, m.thread_id) == (user, outcome.op.thread_id)
        assert outcome.resource is not None and outcome.resource.message.version == 1
        assert outcome.resource.message.text == outcome.op.text

    # Message edits and deletes: versions 2..current, each once; the last one is current.
    changes: dict[str, list[message_pb2.Message]] = defaultdict(list)
    for o in confirmed.values():
        if o.op.kind in (OpKind.EDIT_MESSAGE, OpKind.DELETE_MESSAGE) and o.resource is not None:
            changes[o.resource.message.id].append(o.resource.message)
    for message_id, m in messages.items():
        versions = sorted(r.version for r in changes.get(message_id, ()))
        assert versions == list(range(2, m.version + 1)), f"message {message_id}: {versions}"
        if versions:
            last = max(changes[message_id], key=lambda r: r.version)
            assert (last.text, last.deleted) == (m.text, m.deleted), message_id

    # Thread changes (stream updates and archives, unary participant changes): the same.
    thread_changes: dict[str, list[thread_pb2.Thread]] = defaultdict(list)
    for o in confirmed.values():
        if o.op.kind is OpKind.UPDATE_THREAD and o.resource is not None:
            thread_changes[o.resource.thread.id].append(o.resource.thread)
    for call in run.unary:
        if call.result is not None:
            assert call.result.id == call.thread_id, call
            thread_changes[call.thread_id].append(call.result)
    for thread_id, t in threads.items():
        versions = sorted(r.version for r in thread_changes.get(thread_id, ()))
        assert versions == list(range(2, t.version + 1)), f"thread {thread_id}: {versions}"
        if versions:
            newest = max(thread_changes[thread_id], key=lambda r: r.version)
            fields = ("title", "description", "tags", "archived", "participant_ids")
            assert [getattr(newest, f) for f in fields] == [getattr(t, f) for f in fields]

    run.stats.resent = sum(1 for o in confirmed.values() if o.op.attempts > 1)
    run.stats.outcomes.update(
        f"{o.op.kind}:{o.status}" + (f":{o.error.code}" if o.error is not None else "")
        for outcomes in run.outcomes.values()
        for o in outcomes.values()
    )


@pytest.mark.parametrize(("seed", "mode"), CASES)
async def test_random_run_converges(
    seed: int, mode: str, settings_factory: Callable[..., Settings]
) -> None:
    """Random optimistic operations + cut connections + one server restart converge exactly.

    `removals`: participant changes are removals (and new threads with participants). `full`
    also adds participants, starting with carol joining a thread that has a message (kept to
    the end), then re-adds removed ones at random.
    """
    settings = settings_factory(
        server={"port": free_port(), "http_port": free_port()},
        limits={"operations_per_minute": 0},  # no rate limit
    )
    run = Run(seed, mode, settings)
    try:
        await run.open()
        await run.run()
        await run.settle()
        views = await check_clients_equal_server(run)
        await check_server_truth(run, views)
        # The chaos really happened (else this proves little).
        assert run.stats.steps["restart"] == 1
        assert run.stats.cut_in_flight >= 2, run.stats
        print(f"seed={seed} mode={mode} {run.stats}")  # shown with -rP or -s
    except BaseException as exc:
        exc.add_note(f"seed={seed} mode={mode} stats={run.stats}")
        raise
    finally:
        await run.close()
        gc.collect()  # anything the run leaked must warn here, not in some later test


async def test_a_server_stopped_mid_handshake_leaves_its_database_usable(
    settings_factory: Callable[..., Settings],
) -> None:
    """Stopping a server without grace while eight streams are saying Hello (resuming: the
    user upsert writes, replay reads), then starting a new one on the same port and data, thirty
    times: every new server starts, so no cancelled handler left a connection holding the
    SQLite write lock. (A regression test; it caught the bug in about half of its runs.)"""
    settings = settings_factory(
        server={"port": free_port(), "http_port": free_port()},
        database={"query_timeout_s": 1.0},
    )
    target = f"127.0.0.1:{settings.server.port}"
    app = ThreadlineServer(settings)
    await app.start()
    running = True
    jwt = app.mint("bob", 3600)
    rng = random.Random(2)
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            first = RawStream(channel, jwt)
            epoch = (await first.hello()).epoch
            first.cancel()
            for _ in range(30):
                streams = [RawStream(channel, jwt) for _ in range(8)]
                for stream in streams:
                    hello = rt.Hello(sync_state=rt.SyncState(epoch=epoch, change_seq=0))
                    stream.send(rt.ClientFrame(hello=hello))
                await asyncio.sleep(rng.random() * 0.01)
                await app.stop(grace=0)
                running = False
                for stream in streams:
                    stream.cancel()
                app = ThreadlineServer(settings)
                await app.start()
                running = True
    finally:
        if running:
            await app.stop(grace=0.5)
        gc.collect()  # a leaked connection must warn here, not in some later test
