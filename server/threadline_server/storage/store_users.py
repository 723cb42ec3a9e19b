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

    async def stale_profiles(self, profiles: Sequence[UserClaims]) -> set[UserClaims]:
        """Those of `profiles` the users table does not hold as they are: new users, changed
        claims, users added to a thread before they ever signed in. One read, no lock."""
        async with self._db.read() as conn:
            stored = await _profiles(conn, list({p.user_id for p in profiles}))
        return {p for p in profiles if stored.get(p.user_id) != (_fitted(p), True)}

    async def upsert_users(self, profiles: Sequence[UserClaims]) -> dict[UserClaims, Exception]:
        """Stores the profiles in one transaction (of two for one user, the later wins). If the
        database refuses it, they are written one by one, so that a profile it cannot take
        fails alone rather than every sign-in of the batch. Returns the failures."""
        latest = {p.user_id: p for p in profiles}
        try:
            await self._write_profiles(list(latest.values()))
            return {}
        except Exception as exc:
            if len(latest) == 1:
                return dict.fromkeys(profiles, exc)
        failed: dict[str, Exception] = {}
        for profile in latest.values():
            try:
                await self._write_profiles([profile])
            except Exception as exc:
                failed[profile.user_id] = exc
        return {p: failed[p.user_id] for p in profiles if p.user_id in failed}

    @runs_to_completion
    async def _write_profiles(self, profiles: Sequence[UserClaims]) -> None:
        async with self._db.write() as tx:
            stored = await _profiles(tx.conn, [p.user_id for p in profiles])
            for p in map(_fitted, profiles):
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


def _fitted(p: UserClaims) -> UserClaims:
    """The profile as the columns can hold it: an identity provider's 300-character name or a
    NUL in a claim is its data, not the caller's mistake, and must not fail the sign-in."""

    def fit(value: str, column: str) -> str:
        length = users.c[column].type.length  # type: ignore[attr-defined]
        return value.replace("\x00", "")[:length]

    return UserClaims(
        p.user_id,
        fit(p.display_name, "display_name"),
        fit(p.email, "email"),
        fit(p.image_url, "image_url"),
    )


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
