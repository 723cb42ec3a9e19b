"""Frames assembled from cached event bytes equal frames serialized the ordinary way."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline_server.domain import models, paging
from threadline_server.errors import InvalidArgument
from threadline_server.transport import codec


def _event(seq: int, op: str = "") -> models.Event:
    now = datetime.now(UTC)
    msg = models.Message(f"m{seq}", "t1", seq, "alice", "x" * (seq * 50), 1, False, now, None)
    return models.Event(
        seq,
        models.EventKind.MESSAGE_CREATED,
        "t1",
        seq,
        1,
        "alice",
        now,
        msg,
        frozenset({"alice", "bob"}),
        op,
    )


def test_batch_frame_from_cached_bytes_matches_normal_serialization():
    events = [_event(i, "op-1") for i in range(1, 200, 37)]
    cached = [codec.encode_event(e, for_author=False) for e in events]
    expected = rs.ConnectResponse(
        frame=rt.ServerFrame(events=rt.EventBatch(events=[codec.event(e, False) for e in events]))
    )
    decoded = rs.ConnectResponse.FromString(codec.events_frame_bytes(cached))
    assert decoded == expected
    replay = rs.ConnectResponse.FromString(codec.events_frame_bytes(cached, replay=True))
    assert replay.frame.events.replay


def test_author_copy_carries_the_op_id_and_others_do_not():
    e = _event(1, "op-9")
    assert rt.Event.FromString(codec.encode_event(e, True)).client_op_id == "op-9"
    assert rt.Event.FromString(codec.encode_event(e, False)).client_op_id == ""
    assert codec.encode_event(e, False).change_seq == 1


def test_page_tokens_are_bound_to_their_parameters():
    token = paging.encode({"s": 5}, {"thread": "a"})
    assert paging.decode(token, {"thread": "a"}) == {"s": 5}
    for bad, params in [
        (token, {"thread": "b"}),
        ("!!!", {"thread": "a"}),
        ("e30", {"thread": "a"}),
    ]:
        with pytest.raises(InvalidArgument) as err:
            paging.decode(bad, params)
        assert err.value.violations[0].field == "page_token"
