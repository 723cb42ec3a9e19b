"""Two SDK clients chat through a real server; a third user sees nothing and gets NOT_FOUND."""

from __future__ import annotations

import pytest

from threadline.v1 import realtime_pb2 as rt
from threadline_client import ThreadlineClient
from threadline_client.errors import InvalidArgument, NotFound, Unauthenticated


async def test_alice_and_bob_chat_carol_sees_nothing(target, token):
    async with (
        ThreadlineClient(target, lambda: token("alice")) as alice,
        ThreadlineClient(target, lambda: token("bob")) as bob,
        ThreadlineClient(target, lambda: token("carol")) as carol,
    ):
        thread = await alice.create_thread("Lunch?", ["bob"])
        async with alice.open_stream() as a, bob.open_stream() as b, carol.open_stream() as c:
            result = await a.send_message(thread.id, "noon at the usual place?")
            assert result.WhichOneof("outcome") == "confirmed"
            assert result.confirmed.message.seq == 1

            event = await b.wait_for_event(lambda e: e.kind == rt.EVENT_KIND_MESSAGE_CREATED)
            assert event.message.text == "noon at the usual place?"
            assert event.message.author_id == "alice" and event.message.seq == 1

            reply = await b.send_message(thread.id, "yes!")
            assert reply.confirmed.message.seq == 2
            own = await a.wait_for_event(lambda e: e.message.seq == 2)
            assert own.message.text == "yes!"

            with pytest.raises(TimeoutError):
                await c.wait_for_event(lambda e: True, timeout=0.5)
            rejected = await c.send_message(thread.id, "hi?")
            assert rejected.WhichOneof("outcome") == "rejected"

        history = [m.text async for m in bob.iter_messages(thread.id)]
        assert history == ["yes!", "noon at the usual place?"]
        with pytest.raises(NotFound):
            await carol.get_thread(thread.id)
        with pytest.raises(NotFound):
            await carol.list_messages(thread.id)
        assert [s async for s in carol.iter_threads()] == []
        with pytest.raises(InvalidArgument) as err:
            await alice.create_thread("", ["bob"])
        assert [f for f, _ in err.value.field_violations] == ["thread.title"]


async def test_sdk_reports_bad_token_as_unauthenticated(target):
    async with ThreadlineClient(target, lambda: "not-a-token") as client:
        with pytest.raises(Unauthenticated) as err:
            await client.get_me()
        assert err.value.reason == "TOKEN_INVALID"
