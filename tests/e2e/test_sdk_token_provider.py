"""A token provider that raises: a typed error on calls, and a session that gives up cleanly.

The session's contract: repeated non-transient failures ("a token the provider cannot renew")
take it offline, rather than retrying for ever with a traceback per attempt.
"""

from __future__ import annotations

import logging

import pytest

from threadline_client import Backoff, ConnectionState, ThreadlineClient, ThreadlineSession
from threadline_client.errors import Unauthenticated


class BrokenProvider:
    """Raises like a provider whose identity service is gone; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        raise RuntimeError("identity service unreachable")


async def test_unary_call_raises_a_typed_error(target):
    provider = BrokenProvider()
    async with ThreadlineClient(target, provider) as client:
        with pytest.raises(Unauthenticated) as err:
            await client.get_me()
    assert "token provider failed" in err.value.message
    assert "identity service unreachable" in err.value.message
    assert isinstance(err.value.__cause__, RuntimeError)


async def test_session_goes_offline_without_tracebacks(target, caplog):
    caplog.set_level(logging.DEBUG, logger="threadline_client")
    provider = BrokenProvider()
    session = await ThreadlineSession.connect(
        target, provider, backoff=Backoff(initial=0.01, maximum=0.05), max_final_failures=3
    )
    try:
        await session.wait_until(
            lambda s: s.connection is ConnectionState.OFFLINE and session.last_error is not None,
            timeout=30,
        )
    finally:
        await session.close()
    assert isinstance(session.last_error, Unauthenticated)
    assert "identity service unreachable" in str(session.last_error)
    assert provider.calls >= 3
    sdk_records = [r for r in caplog.records if r.name.startswith("threadline_client")]
    assert [r for r in sdk_records if r.exc_info] == []
    assert any("going offline" in r.getMessage() for r in sdk_records)
