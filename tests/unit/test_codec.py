"""Frames assembled from cached event bytes equal frames serialized the ordinary way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

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


def test_the_authors_copy_is_the_plain_bytes_plus_the_op_id_and_parses_the_same():
    e = _event(3, "op-7")
    plain, authored = codec.encode_event_pair(e)
    assert rt.Event.FromString(plain) == codec.event(e, False)
    assert rt.Event.FromString(authored) == codec.event(e, True)
    assert authored.startswith(plain) and authored.change_seq == plain.change_seq == 3
    no_op = codec.encode_event_pair(_event(4))
    assert no_op[0] is no_op[1]


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 12, 2, 13, 5, 7, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2026, 6, 1, 8, 0, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(2026, 6, 1, 8, 0, 0, 5),  # noqa: DTZ001  (naive: local time, as before)
    ],
)
def test_timestamps_equal_protobufs_own_conversion(value: datetime):
    expected = Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    assert codec.ts(value) == expected


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


@pytest.mark.parametrize("seconds", [0.0, 1764683107.123456, -1.5, 1e-9, 253402300799.5])
def test_epoch_timestamps_equal_protobufs_own_conversion(seconds: float):
    expected = Timestamp()
    expected.FromNanoseconds(int(seconds * 1e9))
    assert codec.ts_epoch(seconds) == expected


@pytest.mark.parametrize("sizes", [[1], [3], [1, 2, 3], [400, 1, 60]])
def test_live_frames_from_cached_framing_match_the_normal_serialization(sizes):
    # A live event's cached framing (a lone event's whole frame, or its batch item) must give
    # the very frame events_frame_bytes builds, for the author's copy and everyone else's.
    events = [_event(i, "op-1") for i in sizes]
    for author in (False, True):
        live = [codec.encode_event_pair(e)[author] for e in events]
        plain = [codec.EventBytes(bytes(e)) for e in live]  # no cached framing
        assert codec.events_frame_bytes(live) == codec.events_frame_bytes(plain)
        decoded = rs.ConnectResponse.FromString(codec.events_frame_bytes(live))
        assert list(decoded.frame.events.events) == [codec.event(e, author) for e in events]


def test_a_live_frame_may_mix_events_with_and_without_cached_framing():
    cached = codec.encode_event_pair(_event(2))[0]
    bare = codec.EventBytes(codec.event(_event(5), False).SerializeToString())
    plain = codec.EventBytes(bytes(cached))
    assert codec.events_frame_bytes([cached, bare]) == codec.events_frame_bytes([plain, bare])
    replay = rs.ConnectResponse.FromString(codec.events_frame_bytes([cached], replay=True))
    assert replay.frame.events.replay and len(replay.frame.events.events) == 1


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**21, 2**35 + 7])
def test_varints_match_protobufs_encoding(value):
    # Length prefixes in every size class the fast paths split on; protobuf's own encoder says
    # what the bytes must be.
    from google.protobuf.internal import encoder

    assert codec._varint(value) == encoder._VarintBytes(value)
