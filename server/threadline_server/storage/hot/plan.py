"""The send transaction's decisions, apart from any driver: which items of a group commit are
replays, refusals or new messages, which seqs they get, and the rows and events they write.

The driver-level writers (hot.sqlite, hot.postgres) run the statements around these steps:

    existing ops + members  ->  plan_batch  ->  bump threads  ->  allocate  ->  build  ->
    reserve change cursors  ->  number  ->  insert  ->  COMMIT

so both dialects make exactly the same decisions, and the same ones as the SQLAlchemy path
(MessageStore._send_batch) that still writes sends with attachments.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from threadline_server.domain.models import Event, EventKind, Message
from threadline_server.domain.ports import SendItem, SendOutcome
from threadline_server.errors import DomainError, IdempotencyKeyReused, NotFound, Unavailable

Outcome = SendOutcome | DomainError


@dataclass(frozen=True, slots=True)
class PriorOp:
    """An idempotency record found for one of the batch's keys."""

    payload_hash: bytes
    resource_id: str
    change_seq: int


@dataclass
class BatchPlan:
    """What the batch will do, decided from the records and memberships read in its
    transaction. `replays` point at an earlier commit (a PriorOp) or at an earlier item of the
    same batch (its index)."""

    items: Sequence[SendItem]
    members: Mapping[str, frozenset[str]]
    outcomes: list[Outcome | None]
    replays: dict[int, PriorOp | int] = field(default_factory=dict)
    by_thread: dict[str, list[int]] = field(default_factory=dict)  # accepted, in item order

    def thread_counts(self) -> list[tuple[str, int]]:
        """(thread id, new messages) in thread id order: rows are locked in that order, so two
        batches (on two nodes) never wait on each other in a cycle."""
        return [(tid, len(self.by_thread[tid])) for tid in sorted(self.by_thread)]


@dataclass
class Written:
    """The new messages of a batch (with the items they came from), their change cursors and
    events; the inserts take the rows column by column."""

    indexes: list[int] = field(default_factory=list)  # of each message's item in the batch
    items: list[SendItem] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    change_seqs: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def message_ids(self) -> list[str]:
        return [m.id for m in self.messages]

    @property
    def thread_ids(self) -> list[str]:
        return [m.thread_id for m in self.messages]

    @property
    def seqs(self) -> list[int]:
        return [m.seq for m in self.messages]

    @property
    def authors(self) -> list[str]:
        return [m.author_id for m in self.messages]

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self.messages]

    @property
    def op_ids(self) -> list[str]:
        return [i.client_op_id for i in self.items]

    @property
    def hashes(self) -> list[bytes]:
        return [i.payload_hash for i in self.items]


def op_keys(items: Sequence[SendItem]) -> list[tuple[str, str]]:
    """The batch's distinct idempotency keys."""
    return list(dict.fromkeys((i.user_id, i.client_op_id) for i in items))


def thread_ids(items: Sequence[SendItem]) -> list[str]:
    return list(dict.fromkeys(i.thread_id for i in items))


def plan_batch(
    items: Sequence[SendItem],
    existing: Mapping[tuple[str, str], PriorOp],
    members: Mapping[str, frozenset[str]],
) -> BatchPlan:
    """Replays answer from their record; a key reused for another payload, or a thread the
    sender is not in, is refused alone; everything else is accepted."""
    plan = BatchPlan(items, members, [None] * len(items))
    first_of: dict[tuple[str, str], int] = {}
    for idx, item in enumerate(items):
        key = (item.user_id, item.client_op_id)
        prior = existing.get(key)
        if prior is not None:
            if prior.payload_hash != item.payload_hash:
                plan.outcomes[idx] = IdempotencyKeyReused(item.client_op_id)
            else:
                plan.replays[idx] = prior
        elif key in first_of:
            if items[first_of[key]].payload_hash != item.payload_hash:
                plan.outcomes[idx] = IdempotencyKeyReused(item.client_op_id)
            else:
                plan.replays[idx] = first_of[key]
        elif item.user_id not in members.get(item.thread_id, ()):
            plan.outcomes[idx] = NotFound("thread", item.thread_id)
        else:
            first_of[key] = idx
            plan.by_thread.setdefault(item.thread_id, []).append(idx)
    return plan


def allocate(plan: BatchPlan, last_seqs: Mapping[str, int]) -> list[tuple[int, int]]:
    """(item index, seq) of every message to write, in item order, from each bumped thread's new
    `last_seq`. A thread missing from `last_seqs` was deleted since the member check: its items
    get NotFound."""
    seq_of: dict[int, int] = {}
    for thread_id, idxs in plan.by_thread.items():
        last = last_seqs.get(thread_id)
        if last is None:
            for idx in idxs:
                plan.outcomes[idx] = NotFound("thread", thread_id)
            continue
        for offset, idx in enumerate(idxs):
            seq_of[idx] = last - len(idxs) + 1 + offset
    return sorted(seq_of.items())


def build(
    plan: BatchPlan,
    seqs: list[tuple[int, int]],
    now: datetime,
    ids: Sequence[str] | None = None,
) -> Written:
    """The new messages (their change cursors come from `number`). `ids` holds one message id
    per item where the database was given them already (hot.postgres); else they are made here."""
    out = Written()
    for idx, seq in seqs:
        item = plan.items[idx]
        message_id = ids[idx] if ids is not None else uuid.uuid4().hex
        out.indexes.append(idx)
        out.items.append(item)
        out.messages.append(
            Message(message_id, item.thread_id, seq, item.user_id, item.text, 1, False, now, None)
        )
    return out


def number(plan: BatchPlan, w: Written, first_change: int) -> None:
    """Gives the new messages their change cursors (in item order, from `first_change`), their
    events and their senders' outcomes."""
    for offset, (idx, message) in enumerate(zip(w.indexes, w.messages, strict=True)):
        change = first_change + offset
        w.change_seqs.append(change)
        w.events.append(
            Event(
                change,
                EventKind.MESSAGE_CREATED,
                message.thread_id,
                message.seq,
                1,
                message.author_id,
                message.created_at,
                message,
                plan.members[message.thread_id],
                w.items[offset].client_op_id,
            )
        )
        plan.outcomes[idx] = SendOutcome(message, change, False)


def finish(plan: BatchPlan, earlier: Mapping[str, Message]) -> list[Outcome]:
    """Every item's outcome once the batch committed. `earlier` holds the first version of each
    message a replay names (read after the commit); one missing was deleted with its thread."""
    for idx, target in plan.replays.items():
        if isinstance(target, int):
            original = plan.outcomes[target]
            if isinstance(original, SendOutcome):
                plan.outcomes[idx] = SendOutcome(original.message, original.change_seq, True)
            else:
                plan.outcomes[idx] = original
        elif target.resource_id in earlier:
            plan.outcomes[idx] = SendOutcome(earlier[target.resource_id], target.change_seq, True)
        else:
            plan.outcomes[idx] = NotFound("message", target.resource_id)
    return [o if o is not None else Unavailable("INTERNAL", "lost outcome") for o in plan.outcomes]


def replayed_ids(plan: BatchPlan) -> list[str]:
    """Messages whose first version the replays of this batch answer with."""
    return list(
        dict.fromkeys(t.resource_id for t in plan.replays.values() if isinstance(t, PriorOp))
    )
