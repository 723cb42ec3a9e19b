"""A stream session's outbound queue: order, waking its one writer, the close marker and the
slow-consumer overflow (the deque that replaced asyncio.Queue must keep all of them)."""

from __future__ import annotations

import asyncio

from threadline_server.domain.models import Principal
from threadline_server.errors import RateLimited
from threadline_server.realtime.session import Close, EventBytes, StreamSession


def _session(max_frames: int = 4) -> StreamSession:
    session = StreamSession(Principal("u1", "iss", "s1", 0.0), max_frames=max_frames)
    session.overflow = lambda: (RateLimited(0.0, "slow"), b"overflow")
    return session


def _event(seq: int) -> EventBytes:
    out = EventBytes(f"e{seq}".encode())
    out.change_seq = seq
    return out


async def test_the_writer_waits_for_a_frame_and_gets_them_in_order():
    session = _session()
    waiting = asyncio.create_task(session.next())
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing queued: it waits
    session.deliver(_event(1))
    session.send(b"pong")
    session.deliver(_event(2))
    assert await waiting == b"e1"
    assert session.next_nowait() == b"pong"
    assert await session.next() == b"e2"
    assert session.next_nowait() is None and session.queued() == 0


async def test_a_writer_cancelled_while_waiting_leaves_the_queue_usable():
    session = _session()
    waiting = asyncio.create_task(session.next())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    session.deliver(_event(3))
    assert await session.next() == b"e3"


async def test_close_comes_after_what_was_queued_and_stops_further_frames():
    session = _session()
    session.deliver(_event(1))
    session.close(None, b"bye")
    session.deliver(_event(2))
    session.send(b"late")
    assert await session.next() == b"e1"
    closing = await session.next()
    assert isinstance(closing, Close) and closing.final_frame == b"bye"
    assert session.next_nowait() is None


async def test_overflow_drops_the_backlog_and_closes_with_the_slow_consumer_frame():
    session = _session(max_frames=2)
    for seq in (1, 2, 3):
        session.deliver(_event(seq))
    closing = await session.next()  # the two queued events were dropped
    assert isinstance(closing, Close)
    assert closing.final_frame == b"overflow"
    assert isinstance(closing.error, RateLimited)
    assert session.queued() == 0
