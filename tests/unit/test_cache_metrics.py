"""The cache hit ratio on the metrics page is hits over lookups, per cache."""

from __future__ import annotations

from threadline_server.observability import Metrics


def test_hit_ratio_is_derived_from_the_lookup_counters():
    metrics = Metrics()
    for hit in (True, True, True, False):
        metrics.cache_lookup("threads", hit)
    metrics.cache_lookup("users", False)
    page = metrics.render().decode()
    assert 'threadline_cache_hit_ratio{cache="threads"} 0.75' in page
    assert 'threadline_cache_hit_ratio{cache="users"} 0.0' in page
    assert 'threadline_cache_lookups_total{cache="threads",result="miss"} 1.0' in page
