"""The batch one node publishes of a commit's events (cluster.envelope): what is packed comes
back exactly, bytes of any content included, and anything malformed is refused as a whole."""

from __future__ import annotations

import pytest

from threadline_server.cluster.envelope import RemoteEvent, pack, unpack


def events() -> list[RemoteEvent]:
    return [
        RemoteEvent(
            41, 1, "t1", "alice", "op-1", "", b"\x0a\x00\xff\n event bytes", ("alice", "bob")
        ),
        RemoteEvent(42, 7, "t1", "bob", "", "bob", b""),  # personal: a read marker
        RemoteEvent(43, 5, "t2", "ålice", "op-ü", "", bytes(range(256)) * 40),
    ]


def test_a_batch_round_trips():
    assert unpack(pack("node-a", events())) == ("node-a", events())
    assert unpack(pack("node-a", [])) == ("node-a", [])


@pytest.mark.parametrize(
    "data",
    [
        b"no separator",
        b"node\n\x00\x00",  # a length cut short
        b"node\n\x00\x00\x00\x05[1,2]\x00\x00\x00\x00",  # a header of the wrong shape
        pack("node", events())[:-3],  # the last event's bytes cut short
    ],
)
def test_malformed_batches_are_refused(data: bytes):
    with pytest.raises(ValueError):
        unpack(data)
