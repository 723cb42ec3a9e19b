"""Large messages never wedge resume or history: every frame and page the server builds is cut by
bytes as well as by count, and always makes progress.

Before the byte bounds, a resume after 60 messages of 30 KB built one EventBatch over the 1 MiB
send limit: the stream died with RESOURCE_EXHAUSTED on every retry. A history page of 200
messages of 100 KB did the same to ListMessages.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.conftest import bearer
from tests.e2e.test_realtime_delivery import create_thread
from tests.support.raw_stream import RawStream
from threadline.v1 import message_pb2
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer

BIG = 102_400  # limits.max_message_bytes by default: the largest message allowed
COUNT = 1_000
IN_FLIGHT = 32
FORWARD = ts.ListMessagesRequest.DIRECTION_FORWARD
BACKWARD = ts.ListMessagesRequest.DIRECTION_BACKWARD


def big_text(i: int, size: int = BIG) -> str:
    head = f"{i:05d}:"
    return head + "x" * (size - len(head))


async def send_many(stream: RawStream, thread_id: str, texts: list[str], tag: str) -> None:
    """Pipelined sends in order (up to IN_FLIGHT unanswered, as a busy client does), each
    confirmed: the stream keeps submit order, so message i gets seq i + 1."""
    window: deque[asyncio.Future[rt.ServerFrame]] = deque()

    async def settle(reply: asyncio.Future[rt.ServerFrame]) -> None:
        result = (await asyncio.wait_for(reply, 60)).operation_result
        assert result.WhichOneof("outcome") == "confirmed", result

    for i, text in enumerate(texts):
        rid = stream.send(
            rt.ClientFrame(
                send_message=rt.SendMessage(
                    client_op_id=f"{tag}-{i}", thread_id=thread_id, text=text
                )
            )
        )
        # Held here: the reply may arrive before we wait for it, and RawStream files it then.
        window.append(stream._replies[rid])
        if len(window) >= IN_FLIGHT:
            await settle(window.popleft())
    while window:
        await settle(window.popleft())


async def history(
    channel: grpc.aio.Channel, tok: str, thread_id: str, direction: int
) -> tuple[list[message_pb2.Message], int]:
    """Every message of a thread by paging at the largest page size, checking each page is
    within the frame limit and never empty; and how many pages it took."""
    stub = tsg.ThreadServiceStub(channel)
    out: list[message_pb2.Message] = []
    page_token, pages = "", 0
    while True:
        page = await stub.ListMessages(
            ts.ListMessagesRequest(
                thread_id=thread_id, page_size=200, page_token=page_token, direction=direction
            ),
            metadata=bearer(tok),
        )
        pages += 1
        assert page.messages and page.ByteSize() <= 1_048_576
        out.extend(page.messages)
        page_token = page.next_page_token
        if not page_token:
            return out, pages


def digest(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode()).hexdigest() for t in texts]


def message_events(events: list[rt.Event]) -> list[rt.Event]:
    return [e for e in events if e.kind == rt.EVENT_KIND_MESSAGE_CREATED]


async def read_resume(
    frames: grpc.aio.StreamStreamCall | grpc.aio.UnaryStreamCall,
) -> tuple[list[rt.Event], int, rt.SyncComplete]:
    """Reads a resumed stream up to SyncComplete: the replayed events, how many event frames
    carried them, and the SyncComplete."""
    events: list[rt.Event] = []
    batches = 0
    while True:
        response = await frames.read()
        assert response is not grpc.aio.EOF, "stream ended before SyncComplete"
        frame = response.frame
        assert response.ByteSize() <= 1_048_576
        kind = frame.WhichOneof("kind")
        assert kind in ("welcome", "events", "sync_complete"), frame
        if kind == "events":
            assert frame.events.replay
            batches += 1
            events.extend(frame.events.events)
        elif kind == "sync_complete":
            return events, batches, frame.sync_complete


async def test_thousand_largest_messages_resume_and_page_exactly(
    server: ThreadlineServer, channel, token
):
    alice_tok, bob_tok = token("alice"), token("bob")
    thread_id = await create_thread(channel, alice_tok, "bob")
    alice = RawStream(channel, alice_tok)
    await alice.hello()
    texts = [big_text(i) for i in range(COUNT)]
    await send_many(alice, thread_id, texts, "big")
    alice.cancel()
    expected = digest(texts)
    epoch = (await server.store.resume_point())[0]
    state = rt.SyncState(epoch=epoch, change_seq=0)

    # Resume from cursor 0 on Connect: every message once, in order, in many bounded frames.
    call = rsg.RealtimeServiceStub(channel).Connect(metadata=bearer(bob_tok))
    await call.write(rs.ConnectRequest(frame=rt.ClientFrame(hello=rt.Hello(sync_state=state))))
    events, batches, done = await read_resume(call)
    call.cancel()
    replayed = message_events(events)
    assert [e.thread_seq for e in replayed] == list(range(1, COUNT + 1))
    assert digest([e.message.text for e in replayed]) == expected
    assert done.recovered and done.event_count == len(events)
    assert batches >= COUNT * BIG // 1_048_576

    # The same on Subscribe (the browser's stream).
    sub = rsg.RealtimeServiceStub(channel).Subscribe(
        rs.SubscribeRequest(hello=rt.Hello(sync_state=state)), metadata=bearer(bob_tok)
    )
    events, _, done = await read_resume(sub)
    sub.cancel()
    replayed = message_events(events)
    assert [e.thread_seq for e in replayed] == list(range(1, COUNT + 1))
    assert digest([e.message.text for e in replayed]) == expected
    assert done.recovered

    # History by paging at the largest page size: pages are cut by bytes, never empty, and
    # together hold every message once, in order.
    messages, pages = await history(channel, bob_tok, thread_id, FORWARD)
    assert [m.seq for m in messages] == list(range(1, COUNT + 1))
    assert digest([m.text for m in messages]) == expected
    assert pages >= COUNT * BIG // 1_048_576


async def test_backward_history_pages_large_messages(channel, token):
    """The SDK's default direction (newest first) cuts pages the same way."""
    tok = token("alice")
    thread_id = await create_thread(channel, tok)
    alice = RawStream(channel, tok)
    await alice.hello()
    await send_many(alice, thread_id, [big_text(i) for i in range(40)], "back")
    alice.cancel()
    messages, _ = await history(channel, tok, thread_id, BACKWARD)
    assert [m.seq for m in messages] == list(range(40, 0, -1))


@pytest.fixture
async def many_threads(settings_factory) -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
    """A server whose thread-write budget is lifted (25 threads exceed its burst of 10)."""
    app = ThreadlineServer(settings_factory(limits={"thread_writes_per_minute": 0}))
    endpoints = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}") as ch:
            yield ch, app.mint("alice", 600)
    finally:
        await app.stop(grace=0.5)


async def test_thread_list_with_large_last_messages_pages_by_bytes(many_threads):
    channel, tok = many_threads
    alice = RawStream(channel, tok)
    await alice.hello()
    threads = [await create_thread(channel, tok, "bob") for _ in range(25)]
    for i, thread_id in enumerate(threads):
        await alice.send_message(thread_id, big_text(i), f"last-{i}")
    alice.cancel()
    stub = tsg.ThreadServiceStub(channel)
    listed: list[str] = []
    page_token = ""
    pages = 0
    while True:
        page = await stub.ListThreads(
            ts.ListThreadsRequest(page_size=200, page_token=page_token), metadata=bearer(tok)
        )
        pages += 1
        assert page.threads and page.ByteSize() <= 1_048_576
        assert all(len(s.last_message.text) == BIG for s in page.threads)
        listed.extend(s.thread.id for s in page.threads)
        page_token = page.next_page_token
        if not page_token:
            break
    assert sorted(listed) == sorted(threads) and len(listed) == len(set(listed))
    assert pages >= 3


async def test_live_burst_of_large_messages_arrives_in_bounded_batches(channel, token):
    """A burst queued for a live stream is batched by bytes, not only by count."""
    thread_id = await create_thread(channel, token("alice"), "bob")
    bob = RawStream(channel, token("bob"))
    await bob.hello()
    alice = RawStream(channel, token("alice"))
    await alice.hello()
    texts = [big_text(i, 30_000) for i in range(60)]
    await send_many(alice, thread_id, texts, "burst")
    received = await bob.events(60, timeout=30)
    assert [e.message.text for e in message_events(received)] == texts
    alice.cancel()
    bob.cancel()
