"""The cache rules that keep reads exact: version-checked message hits, no older version over a
newer one, no fill from a read that raced a membership change, updateOnRead, LRU and TTL."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from threadline_server.domain.models import Event, EventKind, Message, Thread
from threadline_server.storage.cache import CachePolicy, MembershipCache, MessageCache, ReadCaches

NOW = datetime(2026, 11, 29, tzinfo=UTC)
ON = CachePolicy(max_size=10, ttl_s=60)


def message(version: int, text: str = "hi", mid: str = "m1") -> Message:
    return Message(mid, "t1", 1, "alice", text, version, False, NOW, NOW)


def thread(*members: str) -> Thread:
    return Thread(
        id="t1",
        title="t",
        description="",
        tags=(),
        participant_ids=tuple(members),
        archived=False,
        creator_id="alice",
        last_seq=0,
        version=1,
        created_at=NOW,
        updated_at=NOW,
    )


def event(kind: EventKind, payload: Message | Thread) -> Event:
    return Event(1, kind, "t1", 1, 1, "alice", NOW, payload)


def test_message_hits_only_the_exact_version_and_never_goes_back():
    seen: list[bool] = []
    cache = MessageCache(ON, lambda _n, hit: seen.append(hit))
    cache.put(message(2, "edited"))
    assert cache.get("m1", 2) == message(2, "edited")
    assert cache.get("m1", 1) is None  # an older version is read from the database
    cache.fill(message(1, "original"))  # a slow read finishing late
    assert cache.get("m1", 2) == message(2, "edited")
    assert seen == [True, False, True]


def test_membership_fill_from_a_read_that_raced_a_write_is_dropped():
    cache = MembershipCache(ON, lambda _n, _h: None)
    generation = cache.generation  # a reader misses and starts reading the database
    cache.put("t1", ["alice"])  # meanwhile bob's removal commits
    cache.fill("t1", ["alice", "bob"], generation)  # the reader's old answer arrives
    assert cache.get("t1") == frozenset({"alice"})

    cache.invalidate("t1")
    generation = cache.generation
    cache.fill("t1", ["alice"], generation)  # no write in between: kept
    assert cache.get("t1") == frozenset({"alice"})


def test_events_update_and_invalidate_in_commit_order():
    caches = ReadCaches(ON, ON)
    caches.apply(
        [
            event(EventKind.THREAD_CREATED, thread("alice", "bob")),
            event(EventKind.MESSAGE_CREATED, message(1)),
            event(EventKind.MESSAGE_UPDATED, message(2, "edited")),
        ]
    )
    assert caches.memberships.get("t1") == frozenset({"alice", "bob"})
    assert caches.messages.get("m1", 2) is not None
    caches.apply([event(EventKind.THREAD_REMOVED, thread())])  # a deletion: only removals
    assert caches.memberships.get("t1") is None


def test_update_on_read_off_keeps_reads_out_but_writes_in():
    policy = CachePolicy(max_size=10, ttl_s=60, update_on_read=False)
    messages = MessageCache(policy, lambda _n, _h: None)
    messages.fill(message(1))
    assert messages.get("m1", 1) is None
    messages.put(message(1))
    assert messages.get("m1", 1) is not None

    members = MembershipCache(policy, lambda _n, _h: None)
    members.fill("t1", ["alice"], members.generation)
    assert members.get("t1") is None


def test_size_zero_disables_and_lru_and_ttl_bound_entries():
    off = MessageCache(CachePolicy(0, 60), lambda _n, _h: None)
    off.put(message(1))
    assert off.get("m1", 1) is None and len(off) == 0

    small = MessageCache(CachePolicy(2, 60), lambda _n, _h: None)
    for mid in ("a", "b"):
        small.put(message(1, mid=mid))
    small.get("a", 1)  # a is now more recent than b
    small.put(message(1, mid="c"))
    assert small.get("a", 1) is not None and small.get("b", 1) is None and len(small) == 2

    short = MembershipCache(CachePolicy(10, 0.05), lambda _n, _h: None)
    short.put("t1", ["alice"])
    time.sleep(0.1)
    assert short.get("t1") is None


def test_unknown_threads_are_not_cached_and_clear_forgets_everything():
    cache = MembershipCache(ON, lambda _n, _h: None)
    cache.fill("made-up", [], cache.generation)  # no such thread
    assert len(cache) == 0
    cache.put("t1", ["alice"])
    generation = cache.generation
    cache.clear()  # a write whose COMMIT failed: anything may have changed
    cache.fill("t1", ["alice", "bob"], generation)  # a read from before the clear
    assert cache.get("t1") is None and len(cache) == 0
