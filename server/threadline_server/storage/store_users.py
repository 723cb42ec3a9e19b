"""Users and their preferences in the SQL store."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row

from threadline_server.domain.models import Preferences, Principal, User
from threadline_server.errors import NotFound, VersionMismatch
from threadline_server.storage.rows import aware
from threadline_server.storage.store_base import StoreBase, _now, runs_to_completion
from threadline_server.storage.tables import users


class UserStore(StoreBase):
    """Users and preferences."""

    # ---- users ----------------------------------------------------------------------------

    @runs_to_completion
    async def upsert_user(self, principal: Principal) -> None:
        async with self._db.write() as tx:
            conn = tx.conn
            row = (await conn.execute(select(users).where(users.c.id == principal.user_id))).first()
            values = {
                "display_name": principal.display_name,
                "email": principal.email,
                "image_url": principal.image_url,
                "seen": True,
            }
            if row is None:
                await conn.execute(
                    insert(users).values(id=principal.user_id, created_at=_now(), **values)
                )
            elif any(getattr(row, k) != v for k, v in values.items()):
                await conn.execute(
                    update(users).where(users.c.id == principal.user_id).values(**values)
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
