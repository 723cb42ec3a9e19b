"""What one node tells the others of a commit, on `<prefix>:events`: each event's cursor, kind,
thread, actor, op id, its one recipient if it is personal, whom it was addressed to, and the
event as clients get it (encoded once by the committing node, without the op id, which only
the author's copy carries).

    node id \\n  ( u32 header length, header JSON, u32 event length, event bytes )*

The receiving node checks each recipient itself (against the thread's members as it knows
them), so a list from Redis can narrow delivery, never widen it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_LENGTH = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class RemoteEvent:
    change_seq: int
    kind: int
    thread_id: str
    actor_id: str
    client_op_id: str
    user_id: str  # the one recipient of a personal change (read marker, added, removed); else ""
    raw: bytes  # threadline.v1.Event, without client_op_id
    # Whom the committing node addressed it to: the receiving node delivers to those of them
    # it finds among the thread's members itself (it narrows, never widens, by this list).
    recipients: tuple[str, ...] = ()


def pack(node_id: str, events: Sequence[RemoteEvent]) -> bytes:
    parts = [node_id.encode(), b"\n"]
    for e in events:
        header = json.dumps(
            [
                e.change_seq,
                e.kind,
                e.thread_id,
                e.actor_id,
                e.client_op_id,
                e.user_id,
                list(e.recipients),
            ],
            separators=(",", ":"),
        ).encode()
        parts += [_LENGTH.pack(len(header)), header, _LENGTH.pack(len(e.raw)), e.raw]
    return b"".join(parts)


def unpack(data: bytes) -> tuple[str, list[RemoteEvent]]:
    """Raises ValueError on anything malformed (the caller drops it: the changes table still
    has every change, and the gap it leaves is repaired from there)."""
    node, sep, rest = data.partition(b"\n")
    if not sep:
        raise ValueError("no node id")
    out: list[RemoteEvent] = []
    at = 0
    try:
        while at < len(rest):
            (size,) = _LENGTH.unpack_from(rest, at)
            at += _LENGTH.size
            seq, kind, thread, actor, op, user, recipients = json.loads(rest[at : at + size])
            at += size
            (size,) = _LENGTH.unpack_from(rest, at)
            at += _LENGTH.size
            raw = bytes(rest[at : at + size])
            if len(raw) != size:
                raise ValueError("truncated event")
            at += size
            out.append(
                RemoteEvent(
                    int(seq), int(kind), thread, actor, op, user, raw, tuple(map(str, recipients))
                )
            )
    except (struct.error, TypeError) as exc:
        raise ValueError(str(exc)) from exc
    return node.decode(), out
