"""The canonical, comparable view of a client's server state: `snapshot_view` and its rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from threadline_client.state.models import ClientState, Snapshot
from threadline_client.state.store import ClientStore


class ThreadRow(NamedTuple):
    """One thread in a `SnapshotView`."""

    title: str
    description: str
    tags: tuple[str, ...]
    archived: bool
    participants: tuple[str, ...]
    version: int
    last_seq: int


class MessageRow(NamedTuple):
    """One message in a `SnapshotView`."""

    id: str
    seq: int
    text: str
    deleted: bool
    version: int


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """The server state a client holds, in a canonical comparable form (no local overlays).

    Attributes:
        threads: Visible threads by id.
        messages: Per visible thread id, its known messages by `seq` (an empty tuple if none).
    """

    threads: dict[str, ThreadRow]
    messages: dict[str, tuple[MessageRow, ...]]


def snapshot_view(source: ClientState | Snapshot) -> SnapshotView:
    """Returns the canonical view of a client's state or of a freshly loaded snapshot.

    Only server copies count: pending sends, edits and updates are left out, so a client that
    has caught up compares equal to a fresh snapshot of the same user (with enough history).

    Args:
        source: A client's state, or a `Snapshot` (reduced into a new store first).
    """
    if isinstance(source, Snapshot):
        store = ClientStore()
        store.apply_snapshot(source, epoch="", change_seq=0)
        source = store.state
    threads: dict[str, ThreadRow] = {}
    messages: dict[str, tuple[MessageRow, ...]] = {}
    for tid, view in source.threads.by_id.items():
        s = view.server
        threads[tid] = ThreadRow(
            s.title,
            s.description,
            tuple(s.tags),
            s.archived,
            tuple(sorted(s.participant_ids)),
            s.version,
            view.last_seq,
        )
        rows = [
            MessageRow(m.server.id, m.server.seq, m.server.text, m.server.deleted, m.server.version)
            for m in source.messages.by_thread.get(tid, ())
            if m.server is not None
        ]
        messages[tid] = tuple(sorted(rows, key=lambda r: r.seq))
    return SnapshotView(threads, messages)
