"""Token bucket arithmetic with an injected clock."""

from __future__ import annotations

import pytest

from threadline_server.domain.limits import RateLimiter
from threadline_server.errors import RateLimited


def test_bucket_refills_evenly_and_keys_are_independent():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    for _ in range(60):
        limiter.check("alice")
    with pytest.raises(RateLimited) as err:
        limiter.check("alice")
    assert err.value.retry_after == pytest.approx(1.0)
    limiter.check("bob")
    now[0] = 0.5
    with pytest.raises(RateLimited) as err:
        limiter.check("alice")
    assert err.value.retry_after == pytest.approx(0.5)
    now[0] = 1.0
    limiter.check("alice")


def test_zero_lifts_the_limit():
    limiter = RateLimiter(0)
    for _ in range(1000):
        limiter.check("alice")
