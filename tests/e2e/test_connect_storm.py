"""Connecting is cheap for returning users: profiles are written only when new or changed, and
the lookups every connect makes (profile, resume point, presence peers) are batched. The
batching itself is covered deterministically in tests/unit/test_batching.py; here the server
keeps its promises through real streams on both databases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline.v1 import user_service_pb2 as us
from threadline.v1 import user_service_pb2_grpc as usg
from threadline_server.app import ThreadlineServer
from threadline_server.domain.models import UserClaims


@pytest.fixture
async def uncached(settings_factory):
    """A server without the users cache: every authentication reaches the store."""
    import grpc

    app = ThreadlineServer(settings_factory(caches={"users": {"max_size": 0, "ttl_s": 60}}))
    await app.start()
    try:
        assert app.endpoints is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.endpoints.grpc_port}") as ch:
            yield app, ch
    finally:
        await app.stop(grace=0.5)


class UserWrites:
    """INSERT and UPDATE statements on the users table, as the server runs them."""

    def __init__(self, app: ThreadlineServer) -> None:
        self._engine = app.db.engine.sync_engine
        self.statements: list[str] = []

    def _seen(self, _c: Any, _cur: Any, statement: str, _p: Any, _ctx: Any, _m: Any) -> None:
        head = " ".join(statement.split()[:3]).upper()
        if head.startswith(("INSERT INTO USERS", "UPDATE USERS")):
            self.statements.append(head)

    def __enter__(self) -> UserWrites:
        event.listen(self._engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


async def _connect_all(channel, tokens: list[str]) -> None:
    streams = [RawStream(channel, t) for t in tokens]
    await asyncio.gather(*(s.hello() for s in streams))
    for s in streams:
        s.cancel()


async def test_returning_users_with_unchanged_claims_write_nothing(uncached):
    app, channel = uncached
    users = [f"storm-{i}" for i in range(12)]
    tokens = [app.mint(u, 600, name=f"Name {u}", email=f"{u}@example.com") for u in users]
    with UserWrites(app) as first:
        await _connect_all(channel, tokens)
    assert len(first.statements) == len(users)  # each new user written once
    # A storm of returning users (each twice at once) needs no write transaction at all: it
    # connects even while the node's write lock is held by something else.
    with UserWrites(app) as again:
        async with app.db.write_lock:
            await asyncio.wait_for(_connect_all(channel, tokens + tokens), timeout=30)
    assert again.statements == []

    renamed = app.mint(users[3], 600, name="Renamed", email=f"{users[3]}@example.com")
    with UserWrites(app) as changed:
        await _connect_all(channel, [renamed, *tokens[4:8]])
    assert changed.statements == ["UPDATE USERS SET"]
    me = await usg.UserServiceStub(channel).GetMe(us.GetMeRequest(), metadata=bearer(renamed))
    assert me.user.display_name == "Renamed"


async def test_a_batch_of_profiles_writes_the_new_the_changed_and_the_last_of_a_user(server):
    store = server.store
    await store.upsert_users([UserClaims("p-a", "A"), UserClaims("p-b", "B")])
    with UserWrites(server) as writes:
        await store.upsert_users(
            [
                UserClaims("p-a", "A"),  # unchanged
                UserClaims("p-b", "B", "b@example.com"),  # changed
                UserClaims("p-c", "first"),
                UserClaims("p-c", "second"),  # of two for one user, the later wins
            ]
        )
    assert sorted(writes.statements) == ["INSERT INTO USERS", "UPDATE USERS SET"]
    for user_id, name, email in [
        ("p-a", "A", ""),
        ("p-b", "B", "b@example.com"),
        ("p-c", "second", ""),
    ]:
        user, _prefs = await store.get_user(user_id)
        assert (user.display_name, user.email) == (name, email)


async def test_presence_peers_of_many_users_come_from_one_batch(server, channel, token):
    t1 = await create_thread(channel, token("pp-ann"), "pp-bob")
    await create_thread(channel, token("pp-bob"), "pp-cy", "pp-dee")
    assert t1
    peers = await server.store.co_participants(["pp-ann", "pp-bob", "pp-cy", "pp-nobody"])
    assert peers == {
        "pp-ann": frozenset({"pp-bob"}),
        "pp-bob": frozenset({"pp-ann", "pp-cy", "pp-dee"}),
        "pp-cy": frozenset({"pp-bob", "pp-dee"}),
        "pp-nobody": frozenset(),
    }


async def test_claims_too_long_for_the_profile_columns_are_stored_cut_and_sign_in_works(
    uncached,
):
    server, channel = uncached
    long_name = "N\x00" + "n" * 400  # an identity provider's data: never the caller's mistake
    tok = server.mint("long-claims", 600, name=long_name, email="e" * 400 + "@example.com")
    await _connect_all(channel, [tok, server.mint("short-claims", 600, name="Short")])
    me = await usg.UserServiceStub(channel).GetMe(us.GetMeRequest(), metadata=bearer(tok))
    assert me.user.display_name == ("N" + "n" * 400)[:256]
    assert len(me.user.email) == 320
    with UserWrites(server) as again:
        await _connect_all(channel, [tok])  # stored as the columns hold it: nothing to rewrite
    assert again.statements == []
