"""Token bucket arithmetic with an injected clock: one budget, named budgets, the ping cap."""

from __future__ import annotations

import pytest

from threadline_server.domain.limits import Budget, Rate, RateLimiter, RateLimits
from threadline_server.domain.models import Principal
from threadline_server.errors import RateLimited
from threadline_server.realtime.session import StreamSession


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


def test_burst_caps_what_accumulates_and_the_rate_sets_the_wait():
    now = [0.0]
    limiter = RateLimiter(30, clock=lambda: now[0], burst=2)  # one token every 2 s, 2 at most
    limiter.check("alice")
    limiter.check("alice")
    with pytest.raises(RateLimited) as err:
        limiter.check("alice")
    assert err.value.retry_after == pytest.approx(2.0)
    now[0] = 3600.0  # an hour idle still holds only the burst
    limiter.check("alice")
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")


def test_a_clock_stepping_back_mints_no_tokens():
    now = [100.0]
    limiter = RateLimiter(60, clock=lambda: now[0], burst=1)
    limiter.check("alice")
    now[0] = 50.0
    with pytest.raises(RateLimited) as err:
        limiter.check("alice")
    assert err.value.retry_after == pytest.approx(1.0)
    now[0] = 101.0
    limiter.check("alice")


def test_named_budgets_are_independent_and_name_themselves():
    refusals: list[str] = []
    limits = RateLimits(
        {Budget.THREAD_WRITES: Rate(3, 3), Budget.TYPING: Rate(60, 1), Budget.UPLOADS: Rate(0, 1)},
        clock=lambda: 0.0,
        on_refused=refusals.append,
    )
    for _ in range(3):
        limits.check(Budget.THREAD_WRITES, "alice")
    with pytest.raises(RateLimited) as err:
        limits.check(Budget.THREAD_WRITES, "alice")
    assert err.value.retry_after == pytest.approx(20.0)
    assert err.value.metadata == {"budget": "thread_writes"}
    assert "thread_writes" in err.value.message
    limits.check(Budget.TYPING, "alice")  # another budget: untouched by thread writes
    limits.check(Budget.THREAD_WRITES, "bob")  # another user: untouched by alice
    for _ in range(100):
        limits.check(Budget.UPLOADS, "alice")  # 0 a minute lifts a budget
        limits.check(Budget.PREFERENCES, "alice")  # no rate given: unlimited
    with pytest.raises(RateLimited):
        limits.check(Budget.TYPING, "alice")
    assert refusals == ["thread_writes", "typing"]


def test_the_clock_seam_can_be_set_after_construction():
    limits = RateLimits({Budget.MESSAGES: Rate(60, 1)})
    now = [5.0]
    limits.clock = lambda: now[0]
    limits.check(Budget.MESSAGES, "alice")
    with pytest.raises(RateLimited) as err:
        limits.check(Budget.MESSAGES, "alice")
    assert err.value.retry_after == pytest.approx(1.0)  # exact: the fake clock stood still
    now[0] = 6.0
    limits.check(Budget.MESSAGES, "alice")


def test_a_stream_answers_pings_at_its_own_rate():
    alice = Principal("alice", "iss", "sid", 0.0)
    phone = StreamSession(alice, max_frames=10)
    laptop = StreamSession(alice, max_frames=10)
    assert [phone.ping_allowed(0.0, 2.0) for _ in range(4)] == [True, True, False, False]
    assert laptop.ping_allowed(0.0, 2.0)  # per stream, not per user
    assert phone.ping_allowed(0.5, 2.0)
    assert not phone.ping_allowed(0.5, 2.0)
    assert [phone.ping_allowed(10.0, 2.0) for _ in range(3)] == [True, True, False]
    assert all(phone.ping_allowed(10.0, 0.0) for _ in range(10))  # 0 lifts the cap
    slow = StreamSession(alice, max_frames=10)
    assert [slow.ping_allowed(0.0, 0.5) for _ in range(2)] == [True, False]  # a burst of one
    assert slow.ping_allowed(2.0, 0.5)
