"""A write that fails at COMMIT runs the unknown-outcome hooks (caches forget); a write whose
body fails (rolled back, nothing written) does not."""

from __future__ import annotations

import pytest
from sqlalchemy import event, text

from threadline_server.errors import NotFound
from threadline_server.storage.db import Database


async def test_unknown_outcome_hooks_run_only_for_failures_at_commit(tmp_path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    forgotten: list[str] = []
    db.on_unknown_outcome(lambda: forgotten.append("caches"))

    async def write(fail_in_body: bool) -> None:
        async with db.write() as tx:
            await tx.conn.execute(text("SELECT 1"))
            if fail_in_body:
                raise NotFound("thread", "t1")

    try:
        with pytest.raises(NotFound):
            await write(fail_in_body=True)
        assert forgotten == []

        def fail_commit(_conn: object) -> None:
            raise RuntimeError("connection lost during COMMIT")

        event.listen(db.engine.sync_engine, "commit", fail_commit)
        with pytest.raises(RuntimeError):
            await write(fail_in_body=False)
        assert forgotten == ["caches"]
    finally:
        await db.dispose()
