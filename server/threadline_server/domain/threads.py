"""Thread use cases: create, read, list, change fields, archive, membership, read markers.

Membership is checked by the store inside each transaction, so a non-participant gets NOT_FOUND
exactly as for a missing thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from threadline_server.config import LimitsSettings
from threadline_server.domain import paging
from threadline_server.domain.models import Message, ReadMarker, Thread, ThreadSummary
from threadline_server.domain.ports import OpKey, PageSizes, Store, ThreadChange, ThreadCursor
from threadline_server.domain.validation import (
    Violations,
    check_description,
    check_id,
    check_op_id,
    check_tags,
    check_title,
    check_user_ids,
    page_size,
    payload_hash,
)

UPDATABLE_FIELDS = ("title", "description", "tags")


def op_key(user_id: str, client_op_id: str, kind: str, **fields: Any) -> OpKey | None:
    if not client_op_id:
        return None
    return OpKey(user_id, client_op_id, payload_hash(kind, **fields))


class Threads:
    """Thread use cases for one caller at a time.

    Pages are bounded by count (page_size) and by bytes (`page_bytes` of encoded items, measured
    by `sizes`): 200 messages of 100 KB would not fit in any gRPC response.
    """

    def __init__(
        self, store: Store, limits: LimitsSettings, *, sizes: PageSizes, page_bytes: int
    ) -> None:
        self._store = store
        self._limits = limits
        self._sizes = sizes
        self._page_bytes = page_bytes

    async def create(
        self,
        actor: str,
        *,
        title: str,
        description: str,
        tags: Sequence[str],
        participant_ids: Sequence[str],
        client_op_id: str,
    ) -> Thread:
        """Creates a thread with the actor as a participant."""
        v = Violations()
        check_title(v, "thread.title", title, self._limits.max_title_chars)
        check_description(v, "thread.description", description)
        check_tags(v, "thread.tags", tags)
        check_user_ids(v, "thread.participant_ids", participant_ids, self._limits.max_participants)
        check_op_id(v, "client_op_id", client_op_id, required=False)
        v.raise_if_any()
        key = op_key(
            actor,
            client_op_id,
            "create_thread",
            title=title,
            description=description,
            tags=list(tags),
            participants=sorted(set(participant_ids)),
        )
        thread, _ = await self._store.create_thread(
            actor, title, description, tags, participant_ids, key
        )
        return thread

    async def get(self, actor: str, thread_id: str) -> ThreadSummary:
        v = Violations()
        check_id(v, "thread_id", thread_id, "thread_id")
        v.raise_if_any()
        return await self._store.get_thread(actor, thread_id)

    async def list_threads(
        self, actor: str, *, archived: bool | None, size: int, token: str
    ) -> tuple[list[ThreadSummary], str]:
        v = Violations()
        limit = page_size(v, "page_size", size)
        v.raise_if_any()
        params = {"archived": archived}
        after = None
        if token:
            pos = paging.decode(token, params)
            try:
                after = ThreadCursor(datetime.fromisoformat(pos["a"]), str(pos["i"]))
            except (KeyError, TypeError, ValueError):
                v.add("page_token", "page_token is malformed")
                v.raise_if_any()
        rows, more = await self._store.list_threads(actor, archived, limit, after)
        page = paging.fit(rows, lambda row: self._sizes.summary(row[0]), self._page_bytes)
        next_token = ""
        if page and (more or len(page) < len(rows)):
            cursor = page[-1][1]
            next_token = paging.encode(
                {"a": cursor.last_activity_at.isoformat(), "i": cursor.thread_id}, params
            )
        return [summary for summary, _ in page], next_token

    async def update(
        self,
        actor: str,
        thread_id: str,
        values: dict[str, Any],
        *,
        expected_version: int,
        client_op_id: str,
    ) -> Thread:
        """Changes title/description/tags; a stale `expected_version` is ABORTED."""
        self._check_update(
            thread_id,
            values,
            client_op_id,
            ("expected_version", expected_version),
            allowed=UPDATABLE_FIELDS,
            prefix="",
            op_id_required=False,
        )
        key = op_key(
            actor,
            client_op_id,
            "update_thread",
            thread_id=thread_id,
            values=values,
            expected_version=expected_version,
        )
        change = ThreadChange(fields=dict(values), expected_version=expected_version)
        return await self._changed(actor, thread_id, change, key)

    async def merge_update(
        self,
        actor: str,
        thread_id: str,
        values: dict[str, Any],
        *,
        base_version: int,
        client_op_id: str,
    ) -> Thread:
        """A stream UPDATE made from `base_version`: fields changed on one side merge; overlaps
        raise MergeConflict (a conflict result, not an error, on the stream)."""
        self._check_update(
            thread_id,
            values,
            client_op_id,
            ("base_version", base_version),
            allowed=(*UPDATABLE_FIELDS, "archived"),
            prefix="operation.",
            op_id_required=True,
        )
        key = op_key(
            actor,
            client_op_id,
            "merge_thread",
            thread_id=thread_id,
            values=values,
            base_version=base_version,
        )
        change = ThreadChange(fields=dict(values), base_version=base_version)
        return await self._changed(actor, thread_id, change, key)

    def _check_update(
        self,
        thread_id: str,
        values: dict[str, Any],
        client_op_id: str,
        version: tuple[str, int],
        *,
        allowed: Sequence[str],
        prefix: str,
        op_id_required: bool,
    ) -> None:
        """One set of field rules for unary updates and stream operations (field paths differ
        only by the `operation.` prefix)."""
        v = Violations()
        check_id(v, f"{prefix}thread.id", thread_id, "thread id")
        check_op_id(v, f"{prefix}client_op_id", client_op_id, required=op_id_required)
        if not values:
            v.add(f"{prefix}update_mask", "update_mask must name at least one field")
        for path in values:
            if path not in allowed:
                v.add(f"{prefix}update_mask", f"unknown or read-only field {path!r}")
        if "title" in values:
            check_title(v, f"{prefix}thread.title", values["title"], self._limits.max_title_chars)
        if "description" in values:
            check_description(v, f"{prefix}thread.description", values["description"])
        if "tags" in values:
            check_tags(v, f"{prefix}thread.tags", values["tags"])
        name, number = version
        if number < 0:
            v.add(f"{prefix}{name}", f"{name} must not be negative")
        v.raise_if_any()

    async def set_archived(
        self, actor: str, thread_id: str, archived: bool, client_op_id: str
    ) -> Thread:
        """Last write wins: no version check."""
        self._check_target(thread_id, client_op_id)
        key = op_key(actor, client_op_id, "archive", thread_id=thread_id, archived=archived)
        return await self._changed(
            actor, thread_id, ThreadChange(fields={"archived": archived}), key
        )

    async def add_participants(
        self, actor: str, thread_id: str, user_ids: Sequence[str], client_op_id: str
    ) -> Thread:
        self._check_members(thread_id, user_ids, client_op_id)
        key = op_key(actor, client_op_id, "add", thread_id=thread_id, users=sorted(set(user_ids)))
        change = ThreadChange(add_participants=tuple(user_ids))
        return await self._changed(actor, thread_id, change, key)

    async def remove_participants(
        self, actor: str, thread_id: str, user_ids: Sequence[str], client_op_id: str
    ) -> Thread | None:
        self._check_members(thread_id, user_ids, client_op_id)
        key = op_key(
            actor, client_op_id, "remove", thread_id=thread_id, users=sorted(set(user_ids))
        )
        change = ThreadChange(remove_participants=tuple(user_ids))
        thread, _ = await self._store.change_thread(actor, thread_id, change, key)
        return thread

    async def delete(self, actor: str, thread_id: str, client_op_id: str) -> None:
        self._check_target(thread_id, client_op_id)
        key = op_key(actor, client_op_id, "delete_thread", thread_id=thread_id)
        await self._store.change_thread(actor, thread_id, ThreadChange(delete=True), key)

    async def list_messages(
        self, actor: str, thread_id: str, *, forward: bool, start_seq: int, size: int, token: str
    ) -> tuple[list[Message], str]:
        v = Violations()
        check_id(v, "thread_id", thread_id, "thread_id")
        limit = page_size(v, "page_size", size)
        if start_seq < 0:
            v.add("start_seq", "start_seq must not be negative")
        v.raise_if_any()
        params = {"thread": thread_id, "forward": forward}
        if token:
            pos = paging.decode(token, params)
            seq = pos.get("s")
            if not isinstance(seq, int) or seq < 0:
                v.add("page_token", "page_token is malformed")
                v.raise_if_any()
            start_seq = int(seq)  # type: ignore[arg-type]  # checked just above
        rows, more = await self._store.list_messages(
            actor, thread_id, forward=forward, start_seq=start_seq, limit=limit
        )
        items = paging.fit(rows, self._sizes.message, self._page_bytes)
        more = more or len(items) < len(rows)
        next_token = paging.encode({"s": items[-1].seq}, params) if more and items else ""
        return items, next_token

    async def mark_read(self, actor: str, thread_id: str, read_seq: int) -> ReadMarker:
        v = Violations()
        check_id(v, "thread_id", thread_id, "thread_id")
        if read_seq < 0:
            v.add("read_seq", "read_seq must not be negative")
        v.raise_if_any()
        return await self._store.mark_read(actor, thread_id, read_seq)

    async def _changed(
        self, actor: str, thread_id: str, change: ThreadChange, key: OpKey | None
    ) -> Thread:
        thread, _ = await self._store.change_thread(actor, thread_id, change, key)
        assert thread is not None  # only deletion or self-removal yields None
        return thread

    def _check_target(self, thread_id: str, client_op_id: str) -> None:
        v = Violations()
        check_id(v, "thread_id", thread_id, "thread_id")
        check_op_id(v, "client_op_id", client_op_id, required=False)
        v.raise_if_any()

    def _check_members(self, thread_id: str, user_ids: Sequence[str], client_op_id: str) -> None:
        v = Violations()
        check_id(v, "thread_id", thread_id, "thread_id")
        check_op_id(v, "client_op_id", client_op_id, required=False)
        if not user_ids:
            v.add("user_ids", "at least one user id")
        check_user_ids(v, "user_ids", user_ids, self._limits.max_participants)
        v.raise_if_any()
