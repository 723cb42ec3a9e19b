"""The Python driver of the language-neutral client-state cases (tests/cases/client_state).

Each case is a list of steps run against a `ClientStore`: server frames (canonical protobuf JSON,
decoded with `json_format.ParseDict`), snapshots, history pages, joined-thread fill-ins, local
actions and expectations. An expectation compares a projection of the state into plain JSON
(`project`) with the case's values; the TypeScript SDK runs the same files through its own
driver (clients/web/test/state_driver.ts) and projection, so both reducers are held to one
behaviour. See tests/cases/client_state/README.md for the format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from threadline.v1 import message_pb2, realtime_pb2, thread_pb2, user_service_pb2
from threadline_client.state import (
    Change,
    ClientStore,
    ConnectionState,
    LocalMessage,
    OpError,
    OpOutcome,
    PendingOp,
    Snapshot,
    ThreadView,
)
from threadline_client.state import core as state_core
from threadline_client.state import optimistic as state_optimistic
from threadline_client.state import reducer as state_reducer

CASES_DIR = Path(__file__).resolve().parents[1] / "cases" / "client_state"

# Registered so that Any details (ErrorInfo, RetryInfo, BadRequest) in the JSON decode.
DETAIL_TYPES = (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)

STEP_KINDS = frozenset({"server", "snapshot", "history", "joined", "local", "clock", "expect"})
# Keys allowed next to a step's kind.
STEP_EXTRAS: Mapping[str, frozenset[str]] = {
    "snapshot": frozenset({"epoch", "change_seq"}),
    "local": frozenset({"raises"}),
}
SERVER_KINDS = frozenset(
    {"welcome", "events", "operation_result", "sync_complete", "resync_required"}
)
# Action -> (required arguments, optional arguments).
LOCAL_ACTIONS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    "send": (frozenset({"thread_id", "text"}), frozenset({"op_id", "attachment_ids"})),
    "edit": (frozenset({"message", "text"}), frozenset({"base_version", "op_id"})),
    "delete": (frozenset({"message"}), frozenset({"base_version", "op_id"})),
    "update_thread": (frozenset({"thread_id", "fields"}), frozenset({"base_version", "op_id"})),
    "mark_read": (frozenset({"thread_id", "read_seq"}), frozenset({"op_id"})),
    "create_thread": (
        frozenset({"title"}),
        frozenset({"participant_ids", "description", "tags", "op_id"}),
    ),
    "mark_sent": (frozenset({"op_id"}), frozenset()),
    "defer": (frozenset({"op_id", "delay", "error"}), frozenset()),
    "fail": (frozenset({"op_id", "error"}), frozenset()),
    "retry": (frozenset({"local_id"}), frozenset()),
    "dismiss_failed": (frozenset({"local_id"}), frozenset()),
    "set_connection": (frozenset({"connection"}), frozenset()),
    "set_active_thread": (frozenset({"thread_id"}), frozenset()),
    "set_loading": (frozenset({"key", "loading"}), frozenset()),
    "add_error": (frozenset({"source", "error"}), frozenset()),
    "invalidate_sync": (frozenset(), frozenset()),
}
RAISES: Mapping[str, type[Exception]] = {"unknown": KeyError, "invalid": ValueError}
CASE_KEYS = frozenset({"name", "description", "user_id", "clock", "from_snapshot", "steps"})
# Objects at these keys are maps from ids (or field names): their key sets must match exactly.
EXACT_MAPS = frozenset({"by_id", "messages", "typing", "thread_seqs", "fields"})
RUNNER_KEYS = frozenset({"changes", "change", "returned"})


class CaseError(AssertionError):
    """A case file that does not follow the format (never skipped: it fails the run)."""


@dataclass(frozen=True, slots=True)
class Case:
    """One case of a case file."""

    file: str
    name: str
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.file}::{self.name}"


def load_cases() -> list[Case]:
    """Every case of every `*.json` file in the cases directory, in file and case order."""
    cases: list[Case] = []
    for path in sorted(CASES_DIR.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("cases"), list):
            raise CaseError(f"{path.name}: expected an object with a 'cases' list")
        for item in document["cases"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise CaseError(f"{path.name}: every case needs a 'name'")
            cases.append(Case(path.name, item["name"], item))
    return cases


# -- clock ----------------------------------------------------------------------------------------


class FakeClock:
    """The case's clock: time.time(), time.monotonic() and datetime.now() of the state modules."""

    def __init__(self, now: float) -> None:
        self.value = now

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake_time = SimpleNamespace(time=lambda: self.value, monotonic=lambda: self.value)
        for module in (state_core, state_reducer, state_optimistic):
            monkeypatch.setattr(module, "time", fake_time)

        def now(tz: tzinfo | None = None) -> datetime:
            return datetime.fromtimestamp(self.value, tz or UTC)

        monkeypatch.setattr(state_optimistic, "datetime", SimpleNamespace(now=now))


# -- parsing --------------------------------------------------------------------------------------


def _parse_snapshot(value: Mapping[str, Any]) -> Snapshot:
    unknown = set(value) - {"summaries", "messages", "me"}
    if unknown:
        raise CaseError(f"unknown snapshot keys {sorted(unknown)}")
    summaries = [
        json_format.ParseDict(s, thread_pb2.ThreadSummary()) for s in value.get("summaries", [])
    ]
    messages = {
        tid: [json_format.ParseDict(m, message_pb2.Message()) for m in items]
        for tid, items in value.get("messages", {}).items()
    }
    me = value.get("me")
    profile = json_format.ParseDict(me, user_service_pb2.GetMeResponse()) if me else None
    return Snapshot(summaries, messages, profile)


def _parse_messages(items: list[Any]) -> list[message_pb2.Message]:
    return [json_format.ParseDict(m, message_pb2.Message()) for m in items]


def _op_error(value: dict[str, Any]) -> OpError:
    return OpError.from_status(json_format.ParseDict(value, status_pb2.Status()))


# -- the driver -----------------------------------------------------------------------------------


class Driver:
    """Runs one case's steps against a store, as the session would drive it."""

    def __init__(self, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
        data = case.data
        unknown = set(data) - CASE_KEYS
        if unknown:
            raise CaseError(f"unknown case keys {sorted(unknown)}")
        self.clock = FakeClock(float(data.get("clock", 1000.0)))
        self.clock.install(monkeypatch)
        user_id = str(data.get("user_id", ""))
        initial = data.get("from_snapshot")
        if initial is not None:
            self.store = ClientStore.from_snapshot(
                _parse_snapshot(initial["snapshot"]),
                epoch=str(initial.get("epoch", "")),
                change_seq=int(initial.get("change_seq", 0)),
                user_id=user_id,
            )
        else:
            self.store = ClientStore(user_id)
        self.changes: list[Change] = []
        self.store.subscribe(self.changes.append)
        self.returned: Any = None

    def run(self, steps: list[Any]) -> None:
        for index, step in enumerate(steps):
            try:
                self.step(step)
            except CaseError as exc:
                raise CaseError(f"step {index}: {exc}") from None
            except AssertionError as exc:
                raise AssertionError(f"step {index}: {exc}") from None

    def step(self, step: Any) -> None:
        if not isinstance(step, dict):
            raise CaseError("a step must be an object")
        kinds = [k for k in step if k in STEP_KINDS]
        if len(kinds) != 1:
            raise CaseError(f"a step needs exactly one of {sorted(STEP_KINDS)}, got {sorted(step)}")
        kind = kinds[0]
        extra = set(step) - {kind} - STEP_EXTRAS.get(kind, frozenset())
        if extra:
            raise CaseError(f"unknown keys {sorted(extra)} in a {kind} step")
        value = step[kind]
        if kind == "server":
            self.server(value)
        elif kind == "snapshot":
            self.store.apply_snapshot(
                _parse_snapshot(value),
                epoch=str(step.get("epoch", "")),
                change_seq=int(step.get("change_seq", 0)),
            )
        elif kind == "history":
            self.store.apply_history(value["thread_id"], _parse_messages(value["messages"]))
        elif kind == "joined":
            summary = json_format.ParseDict(value["summary"], thread_pb2.ThreadSummary())
            self.store.apply_joined(summary, _parse_messages(value.get("messages", [])))
        elif kind == "local":
            self.local(value, step.get("raises"))
        elif kind == "clock":
            self.clock.value = float(value)
        else:
            self.expect(value)

    def server(self, value: Any) -> None:
        frame = json_format.ParseDict(value, realtime_pb2.ServerFrame())
        kind = frame.WhichOneof("kind")
        store = self.store
        if kind == "welcome":
            store.apply_welcome(frame.welcome)
        elif kind == "events":
            store.apply_events(list(frame.events.events), replay=frame.events.replay)
        elif kind == "operation_result":
            store.apply_result(frame.operation_result)
        elif kind == "sync_complete":
            store.apply_sync_complete(frame.sync_complete)
        elif kind == "resync_required":
            # As the session: a slow consumer resumes from its cursor; the others must reload.
            if frame.resync_required.reason != realtime_pb2.RESYNC_REASON_SLOW_CONSUMER:
                store.note_resync(frame.resync_required)
        else:
            raise CaseError(f"server frame kind {kind!r} does not reach the store")

    def local(self, value: Any, raises: Any) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("action"), str):
            raise CaseError("a local step needs an 'action'")
        action = value["action"]
        if action not in LOCAL_ACTIONS:
            raise CaseError(f"unknown local action {action!r}")
        required, optional = LOCAL_ACTIONS[action]
        args = {k: v for k, v in value.items() if k != "action"}
        missing = required - set(args)
        unknown = set(args) - required - optional
        if missing or unknown:
            raise CaseError(f"{action}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if raises is not None:
            if raises not in RAISES:
                raise CaseError(f"unknown 'raises' {raises!r}")
            with pytest.raises(RAISES[raises]):
                self.act(action, args)
            self.returned = None
            return
        self.returned = self.act(action, args)

    def act(self, action: str, a: dict[str, Any]) -> Any:
        store = self.store
        op_id: str | None = a.get("op_id")
        base: int | None = a.get("base_version")
        handlers: dict[str, Callable[[], Any]] = {
            "send": lambda: (
                store.queue_send(
                    a["thread_id"],
                    a["text"],
                    op_id=op_id,
                    attachment_ids=a.get("attachment_ids", ()),
                ).local_id
            ),
            "edit": lambda: (
                store.queue_edit(a["message"], a["text"], base_version=base, op_id=op_id).op_id
            ),
            "delete": lambda: (
                store.queue_delete(a["message"], base_version=base, op_id=op_id).op_id
            ),
            "update_thread": lambda: (
                store.queue_thread_update(
                    a["thread_id"], a["fields"], base_version=base, op_id=op_id
                ).op_id
            ),
            "mark_read": lambda: _op_id(
                store.queue_mark_read(a["thread_id"], a["read_seq"], op_id=op_id)
            ),
            "create_thread": lambda: (
                store.queue_create_thread(
                    a["title"],
                    a.get("participant_ids", ()),
                    description=a.get("description", ""),
                    tags=a.get("tags", ()),
                    op_id=op_id,
                ).op_id
            ),
            "mark_sent": lambda: store.mark_sent(a["op_id"]),
            "defer": lambda: store.defer(a["op_id"], float(a["delay"]), _op_error(a["error"])),
            "fail": lambda: store.fail(a["op_id"], _op_error(a["error"])),
            "retry": lambda: store.retry(a["local_id"]).op_id,
            "dismiss_failed": lambda: store.dismiss_failed(a["local_id"]),
            "set_connection": lambda: store.set_connection(ConnectionState(a["connection"])),
            "set_active_thread": lambda: store.set_active_thread(a["thread_id"]),
            "set_loading": lambda: store.set_loading(a["key"], bool(a["loading"])),
            "add_error": lambda: store.add_error(a["source"], _op_error(a["error"])),
            "invalidate_sync": store.invalidate_sync,
        }
        return handlers[action]()

    def expect(self, expected: Any) -> None:
        if not isinstance(expected, dict):
            raise CaseError("'expect' must be an object")
        actual = project(self.store)
        actual["changes"] = [project_change(c) for c in self.changes]
        actual["change"] = project_change(self.changes[-1]) if self.changes else None
        actual["returned"] = self.returned
        self.changes.clear()
        problems = list(mismatches(expected, actual, "expect"))
        if problems:
            raise AssertionError("\n".join(problems))


def _op_id(op: PendingOp | None) -> str | None:
    return op.op_id if op is not None else None


def run_case(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs a case; raises AssertionError (or CaseError) on the first failing step."""
    steps = case.data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CaseError("a case needs a non-empty 'steps' list")
    Driver(case, monkeypatch).run(steps)


# -- projection -----------------------------------------------------------------------------------


def _time(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def project_error(error: OpError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {
        "code": error.code,
        "reason": error.reason,
        "message": error.message,
        "retry_after": error.retry_after,
        "field_violations": [[f, d] for f, d in error.field_violations],
    }


def project_message(m: LocalMessage) -> dict[str, Any]:
    return {
        "local_id": m.local_id,
        "id": m.id,
        "thread_id": m.thread_id,
        "author_id": m.author_id,
        "seq": m.seq,
        "version": m.version,
        "text": m.text,
        "deleted": m.deleted,
        "edited": m.edited,
        "status": m.status.value,
        "op": m.op.value if m.op is not None else None,
        "client_op_id": m.client_op_id,
        "error": project_error(m.error),
        "create_time": _time(m.create_time),
        "update_time": _time(m.update_time),
        "confirmed": m.server is not None,
    }


def project_thread(v: ThreadView) -> dict[str, Any]:
    last = v.last_message
    return {
        "title": v.title,
        "description": v.description,
        "tags": list(v.tags),
        "participant_ids": list(v.participant_ids),
        "archived": v.archived,
        "creator_id": v.creator_id,
        "last_seq": v.last_seq,
        "version": v.version,
        "read_seq": v.read_seq,
        "unread_count": v.unread_count,
        "pending": v.pending,
        "create_time": _time(v.create_time),
        "update_time": _time(v.update_time),
        "last_message": (
            None
            if last is None
            else {
                "id": last.id,
                "seq": last.seq,
                "version": last.version,
                "text": last.text,
                "deleted": last.deleted,
            }
        ),
    }


def project_op(op: PendingOp) -> dict[str, Any]:
    return {
        "op_id": op.op_id,
        "kind": op.kind.value,
        "thread_id": op.thread_id,
        "target_id": op.target_id,
        "local_id": op.local_id,
        "text": op.text,
        "attachment_ids": list(op.attachment_ids),
        "fields": {k: (list(v) if k == "tags" else v) for k, v in op.fields.items()},
        "participant_ids": list(op.participant_ids),
        "read_seq": op.read_seq,
        "base_version": op.base_version,
        "sent": op.sent,
        "attempts": op.attempts,
        "not_before": op.not_before,
        "error": project_error(op.error),
    }


def project(store: ClientStore) -> dict[str, Any]:
    """The state as plain JSON with snake_case keys (identical to the TypeScript projection)."""
    s = store.state
    sync = s.sync
    state = store.sync_state()
    next_op = store.next_op()
    return {
        "user": {
            "id": s.user.id,
            "online": s.user.online,
            "display_name": s.user.current.display_name if s.user.current is not None else None,
        },
        "connection": s.connection.value,
        "threads": {
            "active": [v.id for v in s.threads.active],
            "archived": [v.id for v in s.threads.archived],
            "unread": s.threads.unread,
            "by_id": {tid: project_thread(v) for tid, v in s.threads.by_id.items()},
        },
        "messages": {
            tid: [project_message(m) for m in items] for tid, items in s.messages.by_thread.items()
        },
        "pending_messages": [m.local_id for m in s.messages.pending],
        "failed": [project_message(m) for m in s.messages.failed],
        "ops": {
            "pending": [project_op(op) for op in s.ops.pending],
            "failed": [project_op(op) for op in s.ops.failed.values()],
            "next": next_op.op_id if next_op is not None else None,
        },
        "ui": {
            "active_thread": s.ui.active_thread,
            "loading": sorted(k for k, v in s.ui.loading_states.items() if v),
            "errors": [
                {"source": e.source, "at": e.at, "error": project_error(e.error)}
                for e in s.ui.errors
            ],
            "typing": {tid: sorted(users) for tid, users in s.ui.typing.items()},
            "online": sorted(s.ui.online),
        },
        "sync": {
            "epoch": sync.epoch,
            "change_seq": sync.change_seq,
            "synced": sync.synced,
            "recovered": sync.recovered,
            "resyncs": sync.resyncs,
            "session_id": sync.session_id,
            "last_synced_at": sync.last_synced_at,
            "limits": json_format.MessageToDict(sync.limits) if sync.limits is not None else None,
        },
        "sync_state": {
            "epoch": state.epoch,
            "change_seq": state.change_seq,
            "thread_seqs": dict(state.thread_seqs),
            "pending_op_ids": list(state.pending_op_ids),
            "last_synced_at": (
                state.last_synced_at.seconds + state.last_synced_at.nanos / 1e9
                if state.HasField("last_synced_at")
                else None
            ),
        },
        "resume": store.resume_state() is not None,
    }


def project_outcome(outcome: OpOutcome) -> dict[str, Any]:
    conflict = outcome.conflict
    return {
        "op_id": outcome.op.op_id,
        "kind": outcome.op.kind.value,
        "status": outcome.status.value,
        "resource": outcome.resource.WhichOneof("resource") if outcome.resource else None,
        "error": project_error(outcome.error),
        "conflict": (
            None
            if conflict is None
            else {
                "resource": conflict.resource,
                "fields": list(conflict.fields),
                "server_version": conflict.server_version,
            }
        ),
    }


def project_change(change: Change) -> dict[str, Any]:
    return {
        "kind": change.kind.value,
        "thread_ids": sorted(change.thread_ids),
        "messages": [m.local_id for m in change.messages],
        "removed": [m.local_id for m in change.removed],
        "events": [e.change_seq for e in change.events],
        "outcomes": [project_outcome(o) for o in change.outcomes],
        "connection": change.connection.value if change.connection is not None else None,
    }


# -- matching -------------------------------------------------------------------------------------


def _same_scalar(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return float(expected) == float(actual)
    return type(expected) is type(actual) and bool(expected == actual)


def mismatches(expected: Any, actual: Any, path: str, *, exact: bool = False) -> Iterator[str]:
    """Where `actual` differs from `expected`: objects by the keys given (all keys for the
    id-keyed maps in EXACT_MAPS), lists element by element, scalars by value and JSON type."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            yield f"{path}: expected an object, got {json.dumps(actual)}"
            return
        for key, value in expected.items():
            if key not in actual:
                yield f"{path}.{key}: missing (have {sorted(actual)})"
                continue
            yield from mismatches(value, actual[key], f"{path}.{key}", exact=key in EXACT_MAPS)
        if exact and set(actual) != set(expected):
            yield f"{path}: keys {sorted(actual)}, expected {sorted(expected)}"
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            yield f"{path}: expected {json.dumps(expected)}, got {json.dumps(actual)}"
            return
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            yield from mismatches(e, a, f"{path}[{i}]")
    elif not _same_scalar(expected, actual):
        yield f"{path}: expected {json.dumps(expected)}, got {json.dumps(actual)}"


# -- static checks --------------------------------------------------------------------------------

PROJECTION_KEYS = frozenset(
    {
        "user",
        "connection",
        "threads",
        "messages",
        "pending_messages",
        "failed",
        "ops",
        "ui",
        "sync",
        "sync_state",
        "resume",
    }
)


@dataclass(slots=True)
class Survey:
    """What a case uses: step kinds, local actions and server frame kinds."""

    steps: set[str]
    actions: set[str]
    frames: set[str]


def survey(case: Case) -> Survey:
    """Checks a case's structure without running it; raises CaseError on anything unknown."""
    data = case.data
    unknown = set(data) - CASE_KEYS
    if unknown:
        raise CaseError(f"{case.id}: unknown case keys {sorted(unknown)}")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CaseError(f"{case.id}: a case needs a non-empty 'steps' list")
    if data.get("from_snapshot") is not None:
        _parse_snapshot(data["from_snapshot"]["snapshot"])
    out = Survey(set(), set(), set())
    for index, step in enumerate(steps):
        where = f"{case.id} step {index}"
        if not isinstance(step, dict):
            raise CaseError(f"{where}: a step must be an object")
        kinds = [k for k in step if k in STEP_KINDS]
        if len(kinds) != 1:
            raise CaseError(f"{where}: needs exactly one of {sorted(STEP_KINDS)}")
        kind = kinds[0]
        extra = set(step) - {kind} - STEP_EXTRAS.get(kind, frozenset())
        if extra:
            raise CaseError(f"{where}: unknown keys {sorted(extra)}")
        out.steps.add(kind)
        value = step[kind]
        if kind == "server":
            frame = json_format.ParseDict(value, realtime_pb2.ServerFrame())
            frame_kind = frame.WhichOneof("kind")
            if frame_kind not in SERVER_KINDS:
                raise CaseError(f"{where}: server frame kind {frame_kind!r} is not handled")
            out.frames.add(frame_kind)
        elif kind == "local":
            action = value.get("action") if isinstance(value, dict) else None
            if not isinstance(action, str) or action not in LOCAL_ACTIONS:
                raise CaseError(f"{where}: unknown local action {action!r}")
            out.actions.add(action)
            if step.get("raises") is not None and step["raises"] not in RAISES:
                raise CaseError(f"{where}: unknown 'raises' {step['raises']!r}")
        elif kind == "snapshot":
            _parse_snapshot(value)
        elif kind == "expect":
            if not isinstance(value, dict) or not value:
                raise CaseError(f"{where}: 'expect' must be a non-empty object")
            keys = set(value) - PROJECTION_KEYS - RUNNER_KEYS
            if keys:
                raise CaseError(f"{where}: unknown projection keys {sorted(keys)}")
    return out
