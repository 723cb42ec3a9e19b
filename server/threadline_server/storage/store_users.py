"""Users and their preferences in the SQL store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline_server.domain.models import Preferences, User, UserClaims
from threadline_server.errors import NotFound, VersionMismatch
from threadline_server.storage.rows import aware
from threadline_server.storage.store_base import StoreBase, _now, runs_to_completion
from threadline_server.storage.tables import users


class UserStore(StoreBase):
    """Users and preferences."""

    # ---- users ----------------------------------------------------------------------------

    async def upsert_users(self, profiles: Sequence[UserClaims]) -> None:
        """Stores the users' profiles from their verified claims. A read finds who is missing or
        changed, and only those are written, in one transaction: a storm of returning users
        whose claims did not change writes nothing. Of two profiles of one user, the later wins."""
        latest = {p.user_id: p for p in profiles}
        async with self._db.read() as conn:
            stored = await _profiles(conn, list(latest))
        stale = [p for p in latest.values() if stored.get(p.user_id) != (p, True)]
        if stale:
            await self._write_profiles(stale)

    @runs_to_completion
    async def _write_profiles(self, profiles: Sequence[UserClaims]) -> None:
        async with self._db.write() as tx:
            stored = await _profiles(tx.conn, [p.user_id for p in profiles])
            for p in profiles:
                values = {
                    "display_name": p.display_name,
                    "email": p.email,
                    "image_url": p.image_url,
                    "seen": True,
                }
                if p.user_id not in stored:
                    await tx.conn.execute(
                        insert(users).values(id=p.user_id, created_at=_now(), **values)
                    )
                elif stored[p.user_id] != (p, True):
                    await tx.conn.execute(
                        update(users).where(users.c.id == p.user_id).values(**values)
                    )

    async def get_user(self, user_id: str) -> tuple[User, Preferences]:
        async with self._db.read() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        if row is None:
            raise NotFound("user", user_id)
        return _user(row), _prefs(row)

    @runs_to_completion
    async def update_preferences(
        self, user_id: str, values: dict[str, Any], expected_version: int
    ) -> Preferences:
        columns = {
            f"pref_{k}" if k != "notifications_enabled" else "pref_notifications": v
            for k, v in values.items()
        }
        async with self._db.write() as tx:
            row = (await tx.conn.execute(select(users).where(users.c.id == user_id))).first()
            if row is None:
                raise NotFound("user", user_id)
            if expected_version and row.pref_version != expected_version:
                raise VersionMismatch("preferences", f"users/{user_id}", row.pref_version)
            await tx.conn.execute(
                update(users)
                .where(users.c.id == user_id)
                .values(pref_version=users.c.pref_version + 1, **columns)
            )
            row = (await tx.conn.execute(select(users).where(users.c.id == user_id))).one()
        return _prefs(row)


_IN_CHUNK = 500  # ids per IN list


async def _profiles(
    conn: AsyncConnection, user_ids: Sequence[str]
) -> dict[str, tuple[UserClaims, bool]]:
    """The stored profile of each user that has a row, and whether they have been seen with a
    token (a row may exist before: a participant added to a thread before signing in)."""
    out: dict[str, tuple[UserClaims, bool]] = {}
    columns = (users.c.id, users.c.display_name, users.c.email, users.c.image_url, users.c.seen)
    for start in range(0, len(user_ids), _IN_CHUNK):
        chunk = user_ids[start : start + _IN_CHUNK]
        for r in await conn.execute(select(*columns).where(users.c.id.in_(chunk))):
            out[r.id] = (UserClaims(r.id, r.display_name, r.email, r.image_url), bool(r.seen))
    return out


def _user(row: Row[Any]) -> User:
    created = aware(row.created_at)
    assert created is not None
    return User(row.id, row.display_name, row.email, row.image_url, created)


def _prefs(row: Row[Any]) -> Preferences:
    return Preferences(
        theme=row.pref_theme,
        locale=row.pref_locale,
        time_zone=row.pref_time_zone,
        notifications_enabled=bool(row.pref_notifications),
        version=row.pref_version,
    )
