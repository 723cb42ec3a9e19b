"""Private helpers shared by the store's parts: proto copies, times, keys, and `_Delta`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from threadline.v1 import message_pb2, realtime_pb2, thread_pb2
from threadline_client.state.models import (
    _MESSAGE_OPS,
    _THREAD_OPS,
    Change,
    ChangeKind,
    LocalMessage,
    OpOutcome,
    PendingOp,
    ThreadView,
)

_MAX_UI_ERRORS = 50  # ui.errors is a notification log for people, not an audit trail


def _copy_message(m: message_pb2.Message) -> message_pb2.Message:
    out = message_pb2.Message()
    out.CopyFrom(m)
    return out


def _copy_thread(t: thread_pb2.Thread) -> thread_pb2.Thread:
    out = thread_pb2.Thread()
    out.CopyFrom(t)
    return out


def _dt(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, name)
    return ts.ToDatetime(tzinfo=UTC)


def _seconds(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


class _Delta:
    """What one reducer call changed; becomes a `Change`."""

    __slots__ = ("events", "messages", "outcomes", "removed", "threads")

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.messages: dict[int, LocalMessage] = {}
        self.removed: dict[int, LocalMessage] = {}
        self.events: list[realtime_pb2.Event] = []
        self.outcomes: list[OpOutcome] = []

    def touch(self, message: LocalMessage) -> None:
        self.messages[id(message)] = message
        self.removed.pop(id(message), None)

    def drop(self, message: LocalMessage) -> None:
        self.removed[id(message)] = message
        self.messages.pop(id(message), None)

    def empty(self) -> bool:
        return not (self.threads or self.messages or self.removed or self.events or self.outcomes)

    def change(self, kind: ChangeKind) -> Change:
        return Change(
            kind,
            frozenset(self.threads),
            tuple(self.messages.values()),
            tuple(self.removed.values()),
            tuple(self.events),
            tuple(self.outcomes),
        )


def _message_key(local_id: str) -> str:
    return f"m:{local_id}"


def _thread_key(thread_id: str) -> str:
    return f"t:{thread_id}"


def _op_key(op: PendingOp) -> str:
    if op.kind in _MESSAGE_OPS:
        return _message_key(op.local_id)
    if op.kind in _THREAD_OPS:
        return _thread_key(op.target_id)
    return f"o:{op.op_id}"


def _activity(view: ThreadView) -> float:
    last = view.last_message
    last_time = last.create_time.seconds if last is not None and last.HasField("create_time") else 0
    return max(float(last_time), _seconds(view.update_time), _seconds(view.create_time))
