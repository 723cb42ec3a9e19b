"""ThreadlineSession + ClientStore against a real server.

Optimistic operations show at once and are confirmed in place (same local id, never a
duplicate); rejected ones roll back into `failed` with the server's reason and nobody else sees
them; a failed op is retried with its original id; a conflict goes through the resolver; a
session survives a server restart and a pause, resuming from its cursor; and after every test
the client's view equals a fresh snapshot's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from tests.support.process import free_port
from threadline_client import Backoff, ThreadlineClient
from threadline_client.session import ThreadlineSession, load_snapshot
from threadline_client.state import (
    ClientState,
    ConflictInfo,
    ConnectionState,
    LocalMessage,
    MessageStatus,
    OpKind,
    OpStatus,
    SnapshotView,
    snapshot_view,
)
from threadline_server.app import ThreadlineServer

FAST = Backoff(initial=0.05, maximum=0.5)
TokenFn = Callable[[], str]


@contextlib.asynccontextmanager
async def online(target: str, token: TokenFn, **kwargs: Any) -> AsyncIterator[ThreadlineSession]:
    session = await ThreadlineSession.connect(target, token, backoff=FAST, **kwargs)
    try:
        await session.wait_connection(ConnectionState.ONLINE)
        yield session
    finally:
        await session.close()


async def fresh_view(target: str, token: TokenFn) -> SnapshotView:
    async with ThreadlineClient(target, token) as client:
        return snapshot_view(await load_snapshot(client, history=200))


def messages(state: ClientState, thread_id: str) -> list[LocalMessage]:
    return list(state.messages.by_thread.get(thread_id, []))


def texts(state: ClientState, thread_id: str) -> list[str]:
    return [m.text for m in messages(state, thread_id)]


def has_text(thread_id: str, text: str) -> Callable[[ClientState], bool]:
    return lambda s: any(
        m.text == text and m.status is MessageStatus.SENT for m in messages(s, thread_id)
    )


async def assert_converged(target: str, *sessions: tuple[ThreadlineSession, TokenFn]) -> None:
    """Each session's server view equals a fresh snapshot of its user (after events settle)."""
    for session, token in sessions:
        expected = await fresh_view(target, token)
        await session.wait_until(lambda s, e=expected: snapshot_view(s) == e, timeout=10)


async def test_optimistic_send_is_pending_at_once_then_confirmed_in_place(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Lunch", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        assert thread.id in alice.state.threads.by_id
        views: list[list[str]] = []
        alice.store.subscribe(
            lambda _: views.append([m.local_id for m in messages(alice.state, thread.id)])
        )

        local_id = alice.send(thread.id, "noon?")
        [pending] = messages(alice.state, thread.id)
        assert (pending.local_id, pending.status, pending.id, pending.seq) == (
            local_id,
            MessageStatus.PENDING,
            "",
            0,
        )
        assert alice.state.messages.pending == [pending]

        outcome = await alice.wait_op(local_id)
        assert outcome.status is OpStatus.CONFIRMED
        assert messages(alice.state, thread.id) == [pending]  # the same object, updated
        assert pending.status is MessageStatus.SENT and pending.seq == 1 and pending.id
        assert pending.local_id == local_id and alice.state.messages.pending == []

        await bob.wait_until(has_text(thread.id, "noon?"))
        assert texts(bob.state, thread.id) == ["noon?"]
        assert bob.state.threads.by_id[thread.id].unread_count == 1
        # Never two items for one message, at any notification.
        assert views and all(ids.count(local_id) == 1 and len(ids) == 1 for ids in views)
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_rejected_send_rolls_back_into_failed_and_nobody_sees_it(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Limits", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        limit = alice.state.sync.limits
        assert limit is not None
        too_long = "x" * (limit.max_message_bytes + 1)
        local_id = alice.send(thread.id, too_long)
        assert messages(alice.state, thread.id)[0].status is MessageStatus.PENDING

        outcome = await alice.wait_op(local_id)
        assert outcome.status is OpStatus.REJECTED
        assert messages(alice.state, thread.id) == []
        assert alice.state.messages.pending == []
        [failed] = alice.state.messages.failed
        assert failed.local_id == local_id and failed.status is MessageStatus.FAILED
        assert failed.error is not None
        assert (failed.error.code, failed.error.reason) == ("INVALID_ARGUMENT", "FIELD_INVALID")
        assert alice.state.ui.errors[-1].source == f"op:{local_id}"

        # Retrying resends the same op id (and fails the same way: nothing was stored).
        assert alice.retry(local_id) == local_id
        again = await alice.wait_op(local_id)
        assert again.status is OpStatus.REJECTED and again.op.op_id == local_id
        assert [m.local_id for m in alice.state.messages.failed] == [local_id]

        alice.send(thread.id, "ok")
        await bob.wait_until(has_text(thread.id, "ok"))
        assert texts(bob.state, thread.id) == ["ok"]
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_editing_someone_elses_message_is_rejected_and_rolled_back(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Edits", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        bobs = bob.send(thread.id, "bob's words")
        assert (await bob.wait_op(bobs)).status is OpStatus.CONFIRMED
        await alice.wait_until(has_text(thread.id, "bob's words"))
        [target_message] = messages(alice.state, thread.id)

        op_id = alice.edit(target_message.id, "alice's words")
        assert target_message.text == "alice's words" and target_message.pending
        outcome = await alice.wait_op(op_id)
        assert outcome.status is OpStatus.REJECTED
        assert target_message.text == "bob's words" and not target_message.pending
        [record] = alice.state.messages.failed
        assert (record.local_id, record.op, record.id) == (
            op_id,
            OpKind.EDIT_MESSAGE,
            target_message.id,
        )
        assert record.error is not None and record.error.code == "PERMISSION_DENIED"
        assert texts(bob.state, thread.id) == ["bob's words"]
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_failed_send_succeeds_on_retry_with_the_same_op_id(target, token):
    alice_token, carol_token = (lambda: token("alice")), (lambda: token("carol"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Invite only", [])
        async with online(target, alice_token) as alice, online(target, carol_token) as carol:
            local_id = carol.send(thread.id, "let me in")
            outcome = await carol.wait_op(local_id)
            assert outcome.status is OpStatus.REJECTED
            assert outcome.error is not None and outcome.error.code == "NOT_FOUND"

            await client.add_participants(thread.id, ["carol"])
            await carol.wait_until(lambda s: thread.id in s.threads.by_id)
            assert carol.retry(local_id) == local_id
            [pending] = messages(carol.state, thread.id)
            assert pending.local_id == local_id and pending.pending
            assert (await carol.wait_op(local_id)).status is OpStatus.CONFIRMED
            assert pending.status is MessageStatus.SENT and carol.state.messages.failed == []

            await alice.wait_until(has_text(thread.id, "let me in"))
            assert texts(alice.state, thread.id) == ["let me in"]
            await assert_converged(target, (alice, alice_token), (carol, carol_token))


async def test_edit_delete_thread_update_archive_and_mark_read(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Plans", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        first = alice.send(thread.id, "see you at noon")
        second = alice.send(thread.id, "bring snacks")
        assert (await alice.wait_op(second)).status is OpStatus.CONFIRMED
        mine = alice.store.message(first)
        assert mine is not None and mine.seq == 1

        edit = alice.edit(first, "see you at one")
        delete = alice.delete(second)
        assert mine.text == "see you at one" and mine.pending
        assert (await alice.wait_op(edit)).status is OpStatus.CONFIRMED
        assert (await alice.wait_op(delete)).status is OpStatus.CONFIRMED
        assert (mine.text, mine.version, mine.edited) == ("see you at one", 2, True)
        await bob.wait_until(has_text(thread.id, "see you at one"))
        await bob.wait_until(lambda s: [m.deleted for m in messages(s, thread.id)] == [False, True])

        rename = alice.update_thread(thread.id, title="Plans (final)", tags=["weekend"])
        view = alice.state.threads.by_id[thread.id]
        assert view.title == "Plans (final)" and view.pending
        assert (await alice.wait_op(rename)).status is OpStatus.CONFIRMED
        await bob.wait_until(lambda s: s.threads.by_id[thread.id].title == "Plans (final)")

        archive = alice.archive(thread.id)
        assert alice.state.threads.archived == [view] and alice.state.threads.active == []
        assert (await alice.wait_op(archive)).status is OpStatus.CONFIRMED
        await bob.wait_until(lambda s: [v.id for v in s.threads.archived] == [thread.id])

        bob_view = bob.state.threads.by_id[thread.id]
        assert bob_view.unread_count == 1  # the tombstone does not count
        mark = bob.mark_read(thread.id)
        assert mark is not None and (bob_view.read_seq, bob_view.unread_count) == (2, 0)
        assert (await bob.wait_op(mark)).status is OpStatus.CONFIRMED
        assert (bob_view.read_seq, bob_view.unread_count, bob_view.pending) == (2, 0, False)
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_conflicting_title_goes_through_the_resolver(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    seen: list[ConflictInfo] = []

    def merge_titles(conflict: ConflictInfo) -> dict[str, Any]:
        seen.append(conflict)
        return {"title": f"{conflict.server.title} + {conflict.client.title}"}

    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Base", ["bob"])
    async with (
        online(target, alice_token) as alice,
        online(target, bob_token, resolver=merge_titles) as bob,
    ):
        # Bob edits offline from version 1 while Alice renames it: a real overlap on `title`.
        await bob.stop()
        bobs = bob.update_thread(thread.id, title="Bob's")
        alices = alice.update_thread(thread.id, title="Alice's")
        assert (await alice.wait_op(alices)).status is OpStatus.CONFIRMED
        await bob.start()
        outcome = await bob.wait_op(bobs)
        assert outcome.status is OpStatus.CONFLICT
        # The resolution is resubmitted from the server's version with a new op id.
        for session in (alice, bob):
            await session.wait_until(
                lambda s: (
                    s.threads.by_id[thread.id].server.title == "Alice's + Bob's"
                    and not s.threads.by_id[thread.id].pending
                )
            )
        [conflict] = seen
        assert conflict.fields == ("title",) and conflict.server_version == 2
        assert (conflict.base.title, conflict.server.title, conflict.client.title) == (
            "Base",
            "Alice's",
            "Bob's",
        )
        assert bob.state.threads.by_id[thread.id].version == 3
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_default_resolver_keeps_the_server_value(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Base", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        await bob.stop()
        bobs = bob.update_thread(thread.id, title="Bob's")
        assert bob.state.threads.by_id[thread.id].title == "Bob's"
        alices = alice.update_thread(thread.id, title="Alice's")
        assert (await alice.wait_op(alices)).status is OpStatus.CONFIRMED
        await bob.start()
        assert (await bob.wait_op(bobs)).status is OpStatus.CONFLICT
        view = bob.state.threads.by_id[thread.id]
        assert (view.title, view.version, view.pending) == ("Alice's", 2, False)
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_paused_session_resumes_and_gets_what_it_missed(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Catch-up", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        first = alice.send(thread.id, "one")
        await bob.wait_until(has_text(thread.id, "one"))
        await bob.stop()
        cursor = bob.state.sync.change_seq

        alice.send(thread.id, "two")
        alice.edit(first, "one (edited)")
        last = alice.send(thread.id, "three")
        assert (await alice.wait_op(last)).status is OpStatus.CONFIRMED
        later = await alice.create_thread("Made while away", ["bob"])

        await bob.start()
        await bob.wait_connection(ConnectionState.ONLINE)
        assert bob.state.sync.recovered is True  # replayed from the cursor, no snapshot
        assert bob.state.sync.change_seq > cursor
        assert texts(bob.state, thread.id) == ["one (edited)", "two", "three"]
        assert later.id in bob.state.threads.by_id
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_resync_required_reloads_the_snapshot_and_keeps_identities(target, token):
    alice_token, bob_token = (lambda: token("alice")), (lambda: token("bob"))
    async with ThreadlineClient(target, alice_token) as client:
        thread = await client.create_thread("Epochs", ["bob"])
    async with online(target, alice_token) as alice, online(target, bob_token) as bob:
        first = alice.send(thread.id, "one")
        await bob.wait_until(has_text(thread.id, "one"))
        [seen] = messages(bob.state, thread.id)
        await bob.stop()
        # A cursor from another epoch (e.g. a restored database) cannot be resumed.
        bob.state.sync.epoch = "some-other-epoch"
        queued = bob.send(thread.id, "typed while away")

        alice.edit(first, "one, edited")
        rename = alice.update_thread(thread.id, title="Epochs (renamed)")
        assert (await alice.wait_op(rename)).status is OpStatus.CONFIRMED

        await bob.start()
        assert (await bob.wait_op(queued)).status is OpStatus.CONFIRMED
        assert bob.state.sync.recovered is False and bob.state.sync.resyncs == 1
        assert bob.state.sync.epoch != "some-other-epoch"
        assert bob.store.message(seen.local_id) is seen and seen.text == "one, edited"
        assert texts(bob.state, thread.id) == ["one, edited", "typed while away"]
        assert bob.state.threads.by_id[thread.id].title == "Epochs (renamed)"
        await alice.wait_until(has_text(thread.id, "typed while away"))
        await assert_converged(target, (alice, alice_token), (bob, bob_token))


async def test_session_survives_a_server_restart(settings_factory):
    settings = settings_factory(server={"port": free_port(), "http_port": free_port()})
    app = ThreadlineServer(settings)
    await app.start()
    target = f"127.0.0.1:{settings.server.port}"
    # Minted once: the key lives in the data dir and the issuer URL keeps its port.
    alice_jwt, bob_jwt = app.mint("alice", 3600), app.mint("bob", 3600)
    alice_token, bob_token = (lambda: alice_jwt), (lambda: bob_jwt)
    try:
        async with ThreadlineClient(target, alice_token) as client:
            thread = await client.create_thread("Restart", ["bob"])
        states: list[ConnectionState] = []
        alice_session = await ThreadlineSession.connect(
            target, alice_token, backoff=FAST, start=False
        )
        alice_session.store.subscribe(
            lambda c: states.append(c.connection) if c.connection is not None else None
        )
        await alice_session.start()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(alice_session.close)
            alice = alice_session
            await alice.wait_connection(ConnectionState.ONLINE)
            bob = await stack.enter_async_context(online(target, bob_token))

            before = alice.send(thread.id, "before")
            assert (await alice.wait_op(before)).status is OpStatus.CONFIRMED
            await bob.wait_until(has_text(thread.id, "before"))

            await app.stop(grace=0.5)
            await alice.wait_connection(ConnectionState.RECONNECTING)
            await bob.wait_connection(ConnectionState.RECONNECTING)
            during = alice.send(thread.id, "while the server was down")
            assert messages(alice.state, thread.id)[-1].pending
            await asyncio.sleep(0.3)  # a few failed reconnect attempts

            app = ThreadlineServer(settings)
            await app.start()
            assert (await alice.wait_op(during, timeout=30)).status is OpStatus.CONFIRMED
            await bob.wait_until(has_text(thread.id, "while the server was down"), timeout=30)
            assert texts(bob.state, thread.id) == ["before", "while the server was down"]
            for session in (alice, bob):
                await session.wait_connection(ConnectionState.ONLINE)
                assert session.state.sync.recovered is True  # resumed by replay
            await assert_converged(target, (alice, alice_token), (bob, bob_token))

        assert states[:3] == [
            ConnectionState.CONNECTING,
            ConnectionState.SYNCING,
            ConnectionState.ONLINE,
        ]
        assert states[3] is ConnectionState.RECONNECTING
        reconnected = states.index(ConnectionState.ONLINE, 3)
        assert states[reconnected - 1] is ConnectionState.SYNCING
        assert set(states[3:reconnected]) <= {ConnectionState.RECONNECTING, ConnectionState.SYNCING}
        assert states[-1] is ConnectionState.OFFLINE
    finally:
        await app.stop(grace=0.5)
