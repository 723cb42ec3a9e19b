"""Node-local read caches: message versions and thread memberships (LRU with a TTL each).

Why a cached read is never older than an acknowledged write:

* Caches are updated from committed events, in commit order, inside the store's after-commit
  step (under the write lock), so before the write's caller can acknowledge it.
* A message lookup names the version it wants (a change row records it): only an entry of
  exactly that version hits. An entry can be superseded, never wrong.
* A membership fill after a read miss is dropped when any membership changed since the read
  began (a generation counter): a read that raced a write cannot put the old list back.
* A write that fails at COMMIT may have committed without its after-commit step: memberships
  are then forgotten altogether (Database.on_unknown_outcome).

Multi-node deployments need the same events on every node (the broker's job) to keep these
caches exact; see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachetools import TTLCache

from threadline_server.domain.models import Event, EventKind, Message, Thread

# (cache name, hit) -> None: counts lookups for the hit-ratio metrics.
LookupHook = Callable[[str, bool], None]

_MESSAGE_KINDS = frozenset(
    {EventKind.MESSAGE_CREATED, EventKind.MESSAGE_UPDATED, EventKind.MESSAGE_DELETED}
)
_MEMBERSHIP_KINDS = frozenset({EventKind.THREAD_CREATED, EventKind.THREAD_UPDATED})


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Size, lifetime and whether read misses fill the cache (the seed's updateOnRead)."""

    max_size: int
    ttl_s: float
    update_on_read: bool = True


def _store(policy: CachePolicy) -> TTLCache[str, object] | None:
    if policy.max_size <= 0 or policy.ttl_s <= 0:
        return None  # disabled
    return TTLCache(maxsize=policy.max_size, ttl=policy.ttl_s)


class MessageCache:
    """The newest known version of recently written or read messages, by id."""

    name = "messages"

    def __init__(self, policy: CachePolicy, on_lookup: LookupHook) -> None:
        self._policy = policy
        self._entries = _store(policy)
        self._on_lookup = on_lookup

    def get(self, message_id: str, version: int) -> Message | None:
        if self._entries is None:
            return None
        cached = self._entries.get(message_id)
        hit = isinstance(cached, Message) and cached.version == version
        self._on_lookup(self.name, hit)
        return cached if hit else None  # type: ignore[return-value]

    def put(self, message: Message) -> None:
        """Write-through from a committed event; an older version never replaces a newer one."""
        if self._entries is None:
            return
        cached = self._entries.get(message.id)
        if not isinstance(cached, Message) or cached.version <= message.version:
            self._entries[message.id] = message

    def fill(self, message: Message) -> None:
        """After a read miss: only where reads may fill (updateOnRead)."""
        if self._policy.update_on_read:
            self.put(message)

    def clear(self) -> None:
        if self._entries is not None:
            self._entries.clear()

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)


class MembershipCache:
    """Who belongs to a thread, by thread id. Read on every history page and typing signal."""

    name = "threads"

    def __init__(self, policy: CachePolicy, on_lookup: LookupHook) -> None:
        self._policy = policy
        self._entries = _store(policy)
        self._on_lookup = on_lookup
        self._generation = 0

    @property
    def generation(self) -> int:
        """Take this before reading the database for a later `fill`."""
        return self._generation

    def get(self, thread_id: str) -> frozenset[str] | None:
        if self._entries is None:
            return None
        cached = self._entries.get(thread_id)
        self._on_lookup(self.name, cached is not None)
        return cached  # type: ignore[return-value]

    def fill(self, thread_id: str, members: Iterable[str], generation: int) -> None:
        """After a read miss, unless a membership changed since `generation` was taken. No
        members means no such thread: not kept, so probing made-up ids evicts nothing."""
        members = frozenset(members)
        if (
            self._entries is not None
            and self._policy.update_on_read
            and members
            and generation == self._generation
        ):
            self._entries[thread_id] = members

    def put(self, thread_id: str, members: Iterable[str]) -> None:
        self._generation += 1
        if self._entries is not None:
            self._entries[thread_id] = frozenset(members)

    def invalidate(self, thread_id: str) -> None:
        self._generation += 1
        if self._entries is not None:
            self._entries.pop(thread_id, None)

    def clear(self) -> None:
        """Forget everything (a write whose outcome is unknown may have changed anything)."""
        self._generation += 1
        if self._entries is not None:
            self._entries.clear()

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)


class ReadCaches:
    """The store's caches, kept exact by `apply` on every committed batch of events."""

    def __init__(
        self,
        messages: CachePolicy,
        threads: CachePolicy,
        on_lookup: LookupHook = lambda _name, _hit: None,
    ) -> None:
        self.messages = MessageCache(messages, on_lookup)
        self.memberships = MembershipCache(threads, on_lookup)

    @classmethod
    def disabled(cls) -> ReadCaches:
        off = CachePolicy(0, 0)
        return cls(off, off)

    def forget(self, kind: EventKind, thread_id: str) -> None:
        """Another node's change, known only by its kind (cluster.delivery): a membership
        change reloads the thread's members at the next read. Messages need nothing: the
        message cache is keyed by version, so a newer one is never answered from it."""
        if kind in _MEMBERSHIP_KINDS or kind == EventKind.THREAD_REMOVED:
            self.memberships.invalidate(thread_id)

    def apply(self, events: Iterable[Event]) -> None:
        """Called after COMMIT, in commit order, before anyone is told of the write."""
        for event in events:
            payload = event.payload
            if event.kind in _MESSAGE_KINDS and isinstance(payload, Message):
                self.messages.put(payload)
            elif event.kind in _MEMBERSHIP_KINDS and isinstance(payload, Thread):
                self.memberships.put(event.thread_id, payload.participant_ids)
            elif event.kind == EventKind.THREAD_REMOVED:
                # A member left or the thread is gone; the next read reloads the list.
                self.memberships.invalidate(event.thread_id)
