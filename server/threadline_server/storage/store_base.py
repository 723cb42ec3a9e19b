"""Shared state and write helpers of the SQL store (change log, op records, events)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.models import Event, EventKind, Message, Thread
from threadline_server.domain.ports import OpKey, StoredOp
from threadline_server.errors import IdempotencyKeyReused, NotFound
from threadline_server.storage.cache import ReadCaches
from threadline_server.storage.db import Database, WriteTx
from threadline_server.storage.tables import (
    changes,
    operations,
    server_state,
    thread_members,
    threads,
    users,
)

Publish = Callable[[list[Event]], None]
P = ParamSpec("P")
R = TypeVar("R")


def new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


class StoreBase:
    """State, the drain and the write helpers every aggregate of SqlStore builds on."""

    def __init__(self, db: Database, publish: Publish, caches: ReadCaches | None = None) -> None:
        self._db = db
        self._publish = publish
        self.caches = caches if caches is not None else ReadCaches.disabled()
        db.on_unknown_outcome(self.caches.memberships.clear)
        self._inflight: set[asyncio.Future[Any]] = set()

    async def drain(self) -> None:
        """Waits for writes whose callers went away (see runs_to_completion)."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    # ---- shared write helpers -------------------------------------------------------------

    async def _next_change_seqs(self, conn: AsyncConnection, count: int) -> int:
        """Reserves `count` change cursors; returns the first. Taken last in every transaction
        so that its row lock orders commits (and thus cursors) without gaps."""
        result = await conn.execute(
            update(server_state)
            .where(server_state.c.id == 1)
            .values(change_seq=server_state.c.change_seq + count)
            .returning(server_state.c.change_seq)
        )
        return int(result.scalar_one()) - count + 1

    async def _check_op(self, conn: AsyncConnection, key: OpKey | None) -> StoredOp | None:
        if key is None:
            return None
        row = (
            await conn.execute(
                select(operations).where(
                    operations.c.user_id == key.user_id,
                    operations.c.client_op_id == key.client_op_id,
                )
            )
        ).first()
        if row is None:
            return None
        if bytes(row.payload_hash) != key.payload_hash:
            raise IdempotencyKeyReused(key.client_op_id)
        return StoredOp(row.resource_kind, row.resource_id, row.change_seq, row.result_version)

    async def _record_op(
        self,
        conn: AsyncConnection,
        key: OpKey | None,
        kind: str,
        resource_id: str,
        seq: int,
        version: int = 0,
    ) -> None:
        if key is None:
            return
        await conn.execute(
            insert(operations).values(
                user_id=key.user_id,
                client_op_id=key.client_op_id,
                payload_hash=key.payload_hash,
                resource_kind=kind,
                resource_id=resource_id,
                change_seq=seq,
                result_version=version,
                created_at=_now(),
            )
        )

    async def _insert_changes(self, conn: AsyncConnection, events: Sequence[Event]) -> None:
        rows = [
            {
                "change_seq": e.change_seq,
                "thread_id": e.thread_id,
                "user_id": next(iter(e.recipients)) if e.personal else None,
                "kind": e.kind.value,
                "thread_seq": e.thread_seq,
                "version": e.version,
                "actor_id": e.actor_id,
                "resource_id": _resource_id(e),
                "client_op_id": e.client_op_id,
                "created_at": e.created_at,
            }
            for e in events
        ]
        if rows:
            await conn.execute(insert(changes), rows)

    def _publish_after(self, tx: WriteTx, events: list[Event]) -> None:
        if events:
            tx.after_commit(lambda: self._committed(events))

    def _committed(self, events: list[Event]) -> None:
        # Caches first: a stream told of the change may read right away.
        self.caches.apply(events)
        self._publish(events)

    async def _require_member(self, conn: AsyncConnection, user_id: str, thread_id: str) -> None:
        """NotFound unless `user_id` participates (threads without members do not exist)."""
        if user_id not in await self._cached_members(thread_id, conn):
            raise NotFound("thread", thread_id)

    async def _cached_members(
        self, thread_id: str, conn: AsyncConnection | None = None
    ) -> frozenset[str]:
        """A thread's members from the cache, or read (in `conn`, else a new read) and cached."""
        cache = self.caches.memberships
        members = cache.get(thread_id)
        if members is None:
            generation = cache.generation  # before the read: see MembershipCache.fill
            if conn is None:
                async with self._db.read() as own:
                    found = await self._members(own, [thread_id])
            else:
                found = await self._members(conn, [thread_id])
            members = frozenset(found[thread_id])
            cache.fill(thread_id, members, generation)
        return members

    async def _members(
        self, conn: AsyncConnection, thread_ids: Iterable[str]
    ) -> dict[str, set[str]]:
        ids = list(set(thread_ids))
        out: dict[str, set[str]] = {tid: set() for tid in ids}
        if not ids:
            return out
        rows = await conn.execute(
            select(thread_members.c.thread_id, thread_members.c.user_id).where(
                thread_members.c.thread_id.in_(ids)
            )
        )
        for thread_id, user_id in rows:
            out[thread_id].add(user_id)
        return out

    async def _thread_for_member(
        self, conn: AsyncConnection, user_id: str, thread_id: str, *, lock: bool = False
    ) -> tuple[Row[Any], set[str]]:
        """The thread row and its members; NotFound unless `user_id` participates."""
        stmt = select(threads).where(threads.c.id == thread_id)
        if lock and not self._db.is_sqlite:
            stmt = stmt.with_for_update()
        row = (await conn.execute(stmt)).first()
        members = (await self._members(conn, [thread_id]))[thread_id] if row else set()
        if row is None or user_id not in members:
            raise NotFound("thread", thread_id)
        return row, members

    async def _ensure_users(self, conn: AsyncConnection, user_ids: Iterable[str]) -> None:
        """Placeholder rows for users named before they ever signed in."""
        ids = list(set(user_ids))
        if not ids:
            return
        known = set((await conn.execute(select(users.c.id).where(users.c.id.in_(ids)))).scalars())
        missing = [
            {"id": uid, "created_at": _now(), "seen": False} for uid in ids if uid not in known
        ]
        if missing:
            await conn.execute(insert(users), missing)

    # ---- event builders -------------------------------------------------------------------

    def _thread_event(
        self,
        seq: int,
        kind: EventKind,
        thread: Thread,
        actor: str,
        now: datetime,
        recipients: frozenset[str],
        op_id: str,
    ) -> Event:
        return Event(
            seq,
            kind,
            thread.id,
            thread.last_seq,
            thread.version,
            actor,
            now,
            thread,
            recipients,
            op_id,
        )

    def _removed_event(
        self,
        seq: int,
        thread_id: str,
        last_seq: int,
        version: int,
        actor: str,
        now: datetime,
        user: str,
        op_id: str,
    ) -> Event:
        return Event(
            seq,
            EventKind.THREAD_REMOVED,
            thread_id,
            last_seq,
            version,
            actor,
            now,
            None,
            frozenset([user]),
            op_id,
            personal=True,
        )

    async def _removal_events(
        self,
        conn: AsyncConnection,
        thread_id: str,
        last_seq: int,
        version: int,
        actor: str,
        members: list[str],
        now: datetime,
        op_id: str,
    ) -> list[Event]:
        first = await self._next_change_seqs(conn, len(members))
        events = [
            self._removed_event(first + i, thread_id, last_seq, version, actor, now, user, op_id)
            for i, user in enumerate(members)
        ]
        await self._insert_changes(conn, events)
        return events


S = TypeVar("S", bound=StoreBase)


def runs_to_completion(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """A write that has started finishes, even if its caller is cancelled (a client hanging up,
    a server stopping): a transaction cut off between BEGIN IMMEDIATE and COMMIT can leave its
    connection holding the database's write lock. The caller's outcome is then "unknown", which
    the protocol already covers: retry with the same client_op_id. `SqlStore.drain` waits for
    these before the engine is disposed."""

    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        task = asyncio.ensure_future(fn(self, *args, **kwargs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    # Not functools.wraps: mypy loses the Concatenate[S, P] signature through it.
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _resource_id(event: Event) -> str:
    payload = event.payload
    if isinstance(payload, Message):
        return payload.id
    return event.thread_id
