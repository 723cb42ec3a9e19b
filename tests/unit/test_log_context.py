"""JSON log lines carry the request fields bound for the task that logged them, and only those."""

from __future__ import annotations

import asyncio
import json
import logging

from threadline_server.observability import ContextFilter, JsonFormatter, bind_log_context


def _line(record_logger: logging.Logger, message: str) -> dict[str, object]:
    record = record_logger.makeRecord("t", logging.INFO, __file__, 1, message, (), None)
    ContextFilter().filter(record)
    return json.loads(JsonFormatter().format(record))  # type: ignore[no-any-return]


async def test_each_task_logs_its_own_request_fields():
    log = logging.getLogger("threadline.test")

    async def call(request_id: str, user: str) -> dict[str, object]:
        bind_log_context(request_id=request_id, rpc="GetThread")
        await asyncio.sleep(0)  # interleave with the other call
        bind_log_context(user=user)
        await asyncio.sleep(0)
        return _line(log, f"hello from {user}")

    first, second = await asyncio.gather(call("r-1", "alice"), call("r-2", "bob"))
    assert (first["request_id"], first["user"], first["rpc"]) == ("r-1", "alice", "GetThread")
    assert (second["request_id"], second["user"]) == ("r-2", "bob")
    assert "request_id" not in _line(log, "outside any call")
