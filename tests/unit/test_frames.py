"""Byte bounds of frames and pages: cutting rules and the startup check that one item fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from threadline.v1 import realtime_service_pb2 as rs
from threadline_server.config import Settings
from threadline_server.domain.paging import fit
from threadline_server.transport import codec, frames


def settings(**server: int) -> Settings:
    return Settings(server={"data_dir": Path("unused"), **server})  # type: ignore[arg-type]


def test_chunk_cuts_by_framed_bytes_and_never_leaves_an_item_behind():
    items = [b"a" * 100, b"b" * 100, b"c" * 100, b"d" * 500, b"e"]
    groups = list(frames.chunk(items, 210))
    assert [b"".join(g) for g in groups] == [
        b"a" * 100 + b"b" * 100,  # 2 x (1 tag + 1 length + 100)
        b"c" * 100,
        b"d" * 500,  # larger than the budget alone: still sent, on its own
        b"e",
    ]
    assert [i for g in groups for i in g] == items


def test_chunk_of_nothing_is_no_frame():
    assert list(frames.chunk([], 100)) == []


def test_a_chunked_frame_is_exactly_the_size_counted():
    events = [b"x" * n for n in (10, 200, 3000, 70_000)]
    for group in frames.chunk(events, 1 << 20):
        frame = codec.events_frame_bytes(group, replay=True)
        decoded = rs.ConnectResponse.FromString(frame)
        assert [len(e.SerializeToString()) for e in decoded.frame.events.events] == [
            len(e) for e in group
        ]
        assert len(frame) <= sum(frames.item_size(len(e)) for e in group) + 16


def test_fit_keeps_the_longest_prefix_within_budget_and_at_least_one():
    assert fit([5, 5, 5], lambda n: n, 10) == [5, 5]
    assert fit([50, 1], lambda n: n, 10) == [50]
    assert fit([], lambda n: n, 10) == []
    assert fit([1, 2, 3], lambda n: n, 100) == [1, 2, 3]


def test_item_size_counts_tag_and_length_prefix():
    assert frames.item_size(0) == 2
    assert frames.item_size(127) == 129
    assert frames.item_size(128) == 131
    assert frames.item_size(102_400) == 102_404


def test_defaults_leave_room_for_the_largest_items():
    s = settings()
    largest = frames.check_limits(s)
    assert largest.event > s.limits.max_message_bytes
    assert max(largest.event, largest.summary, largest.conflict) <= frames.budget(s)
    assert largest.client_frame <= s.server.max_receive_message_bytes


def test_a_send_limit_below_the_largest_item_refuses_to_start():
    with pytest.raises(ValueError, match=r"server\.max_send_message_bytes"):
        frames.check_limits(settings(max_send_message_bytes=100_000))


def test_a_receive_limit_below_the_largest_message_refuses_to_start():
    with pytest.raises(ValueError, match=r"server\.max_receive_message_bytes"):
        frames.check_limits(settings(max_receive_message_bytes=100_000))


def test_largest_items_grow_with_the_limits():
    small = frames.largest_items(settings())
    wide = frames.largest_items(
        Settings(
            server={"data_dir": Path("unused")},  # type: ignore[arg-type]
            limits={"max_message_bytes": 200_000, "max_participants": 500},  # type: ignore[arg-type]
        )
    )
    assert wide.event >= small.event + 97_600
    assert wide.summary > small.summary + 400 * 128
