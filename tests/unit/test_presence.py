"""PresenceTracker rules: state not edges, the offline grace, a failing lookup never raises and
is retried, nothing is announced after close."""

from __future__ import annotations

import asyncio

from threadline_server.domain.models import Event
from threadline_server.realtime.presence import PresenceTracker

GRACE = 0.05


class World:
    """Who is connected (as the broker would say) and what got published."""

    def __init__(self, peers: frozenset[str] = frozenset({"bob"})) -> None:
        self.connected: set[str] = {"bob"}
        self.published: list[tuple[str, bool, frozenset[str]]] = []
        self.peers = peers
        self.failures = 0

    async def lookup(self, _user: str) -> frozenset[str]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database unavailable")
        return self.peers

    def publish(self, events: list[Event]) -> None:
        for e in events:
            state = e.payload
            self.published.append((state.user_id, state.online, e.recipients))  # type: ignore[union-attr]

    def tracker(self) -> PresenceTracker:
        tracker = PresenceTracker(self.publish, self.lookup, self.connected.__contains__, GRACE)
        tracker.connected("bob")  # bob is online on this node
        return tracker


async def settle(seconds: float = GRACE * 3) -> None:
    await asyncio.sleep(seconds)


async def test_online_then_offline_after_the_grace_and_no_flicker_on_reconnect():
    world = World()
    tracker = world.tracker()
    world.connected.add("alice")
    tracker.connected("alice")
    assert world.published == []  # announced once her stream has caught up...
    assert [p.user_id for p in await tracker.snapshot("alice")] == ["bob"]
    assert world.published[-1] == ("alice", True, frozenset({"bob"}))  # ...by its snapshot

    world.connected.discard("alice")  # a blip: gone and back within the grace
    tracker.disconnected("alice", 0.0)
    world.connected.add("alice")
    tracker.connected("alice")
    await tracker.snapshot("alice")
    await settle()
    assert len([p for p in world.published if p[0] == "alice"]) == 1

    world.connected.discard("alice")
    tracker.disconnected("alice", 0.0)
    await settle()
    assert world.published[-1] == ("alice", False, frozenset({"bob"}))
    await tracker.close()


async def test_a_failing_lookup_never_raises_and_is_retried():
    world = World()
    tracker = world.tracker()
    world.failures = 2
    world.connected.add("alice")
    tracker.connected("alice")
    assert await tracker.snapshot("alice") == []  # advisory: the stream goes on
    await settle(GRACE * 6)  # the announcement fails once more, then is retried
    assert ("alice", True, frozenset({"bob"})) in world.published
    await tracker.close()


async def test_nothing_is_announced_after_close():
    world = World()
    tracker = world.tracker()
    world.connected.add("alice")
    tracker.connected("alice")
    await tracker.snapshot("alice")
    await tracker.close()
    before = list(world.published)
    world.connected.discard("alice")
    tracker.disconnected("alice", 0.0)
    await settle()
    assert world.published == before
