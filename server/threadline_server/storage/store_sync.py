"""Sync in the SQL store: resume points, change-log replay, stored op results, pruning."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, text

from threadline_server.domain.models import Event, Message, Thread
from threadline_server.domain.ports import IndexStat, ReplayPage, StoredOp
from threadline_server.storage.history import events_of, prune, replay, stored_ops
from threadline_server.storage.store_base import _now, runs_to_completion
from threadline_server.storage.store_messages import MessageStore
from threadline_server.storage.tables import changes, server_state, thread_members
from threadline_server.storage.versions import messages_at, threads_at

_IN_CHUNK = 500  # ids per IN list: well under every driver's parameter limit


def _chunked(values: list[str]) -> list[list[str]]:
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)]


def _message_key(op: StoredOp) -> tuple[str, int]:
    return op.resource_id, op.result_version or 1  # 0, the column default, means the first


class SyncStore(MessageStore):
    """Resuming and replaying the change log."""

    # ---- sync -----------------------------------------------------------------------------

    async def resume_point(self) -> tuple[str, int, int]:
        """(epoch, current change cursor, highest pruned cursor)."""
        async with self._db.read() as conn:
            row = (await conn.execute(select(server_state).where(server_state.c.id == 1))).one()
        return str(row.epoch), int(row.change_seq), int(row.pruned_through)

    async def replay(
        self, user_id: str, after: int, upto: int, limit: int, max_bytes: int
    ) -> tuple[list[Event], int | None]:
        page = ReplayPage(user_id, after, upto, limit, max_bytes)
        return (await self.replay_many([page]))[page]

    async def replay_many(
        self, pages: Sequence[ReplayPage]
    ) -> dict[ReplayPage, tuple[list[Event], int | None]]:
        """Several users' next pages in one read transaction: resuming streams arriving
        together share its connection and its BEGIN, rather than one each."""
        out: dict[ReplayPage, tuple[list[Event], int | None]] = {}
        async with self._db.read() as conn:
            for page in pages:
                out[page] = await replay(
                    conn,
                    page.user_id,
                    page.after,
                    page.upto,
                    page.limit,
                    self.caches.messages,
                    max_bytes=page.max_bytes,
                )
        return out

    async def stored_results(
        self, user_id: str, op_ids: Sequence[str]
    ) -> list[tuple[str, StoredOp, Message | Thread | None]]:
        """Original outcomes of operations the client is unsure about (SyncState.pending)."""
        if not op_ids:
            return []  # the usual resume: no transaction to open
        async with self._db.read() as conn:
            rows = await stored_ops(conn, user_id, op_ids)
            ops = [
                (
                    r.client_op_id,
                    StoredOp(r.resource_kind, r.resource_id, r.change_seq, r.result_version),
                )
                for r in rows
            ]
            found_messages = await messages_at(
                conn, [_message_key(op) for _, op in ops if op.resource_kind == "message"]
            )
            found_threads = await threads_at(
                conn,
                [
                    (op.resource_id, op.result_version)
                    for _, op in ops
                    if op.resource_kind != "message"
                ],
            )
        out: list[tuple[str, StoredOp, Message | Thread | None]] = []
        for op_id, op in ops:
            resource: Message | Thread | None
            if op.resource_kind == "message":
                resource = found_messages.get(_message_key(op))
            else:
                resource = found_threads.get((op.resource_id, op.result_version))
            out.append((op_id, op, resource))
        return out

    @runs_to_completion
    async def prune(self, retention_s: int, idempotency_window_s: int) -> tuple[int, int]:
        async with self._db.write() as tx:
            return await prune(tx.conn, _now(), retention_s, idempotency_window_s)

    async def committed_after(
        self, after: int, upto: int, limit: int, max_bytes: int
    ) -> tuple[list[Event], int | None]:
        """Every committed change in (after, upto], oldest first, as events addressed as they
        would be live: a user's own change (a read marker, being added or removed) to that
        user, the others to the thread's members now. The cluster's nodes read what other nodes
        committed this way (cluster.delivery). Also returns the last cursor scanned."""
        async with self._db.read() as conn:
            rows = (
                await conn.execute(
                    select(changes)
                    .where(changes.c.change_seq > after, changes.c.change_seq <= upto)
                    .order_by(changes.c.change_seq)
                    .limit(limit)
                )
            ).all()
            if not rows:
                return [], None
            shared = sorted({r.thread_id for r in rows if r.user_id is None})
            members: dict[str, set[str]] = {tid: set() for tid in shared}
            for chunk in _chunked(shared):
                for tid, uid in await conn.execute(
                    select(thread_members.c.thread_id, thread_members.c.user_id).where(
                        thread_members.c.thread_id.in_(chunk)
                    )
                ):
                    members[tid].add(uid)
            frozen = {tid: frozenset(m) for tid, m in members.items()}
            return await events_of(
                conn,
                rows,
                recipients=lambda r: frozenset([r.user_id]) if r.user_id else frozen[r.thread_id],
                reader=lambda r: str(r.user_id),
                cache=self.caches.messages,
                max_bytes=max_bytes,
            )

    async def current_change_seq(self) -> tuple[str, int]:
        async with self._db.read() as conn:
            row = (await conn.execute(select(server_state).where(server_state.c.id == 1))).one()
        return str(row.epoch), int(row.change_seq)

    async def co_participants(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """For each user, everyone who shares at least one thread with them (for presence): two
        indexed steps for the whole batch, rather than a self-join, which PostgreSQL tends to
        plan as a hash join over all memberships once a user is in a few hundred threads."""
        threads_of: dict[str, list[str]] = {user: [] for user in user_ids}
        members_of: dict[str, set[str]] = {}
        async with self._db.read() as conn:
            for users in _chunked(list(threads_of)):
                rows = await conn.execute(
                    select(thread_members.c.user_id, thread_members.c.thread_id).where(
                        thread_members.c.user_id.in_(users)
                    )
                )
                for user, thread_id in rows:
                    threads_of[user].append(thread_id)
                    members_of[thread_id] = set()
            for thread_ids in _chunked(list(members_of)):
                rows = await conn.execute(
                    select(thread_members.c.thread_id, thread_members.c.user_id).where(
                        thread_members.c.thread_id.in_(thread_ids)
                    )
                )
                for thread_id, user in rows:
                    members_of[thread_id].add(user)
        out: dict[str, frozenset[str]] = {}
        for user, thread_ids in threads_of.items():
            peers = set().union(*(members_of[t] for t in thread_ids))
            peers.discard(user)
            out[user] = frozenset(peers)
        return out

    async def index_usage(self) -> tuple[str, list[IndexStat]]:
        """(backend, per-index use) from pg_stat_user_indexes; SQLite keeps no such figures."""
        if self._db.is_sqlite:
            return "sqlite", []
        stmt = text(
            "SELECT relname, indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes "
            "WHERE schemaname = current_schema() ORDER BY idx_scan DESC, relname, indexrelname"
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return "postgresql", [IndexStat(r[0], r[1], int(r[2] or 0), int(r[3] or 0)) for r in rows]

    async def thread_members(self, thread_id: str) -> frozenset[str]:
        return await self._cached_members(thread_id)
