"""Prometheus metrics (one registry per server) and logging set-up (text or JSON lines)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The server's metrics. One instance per ThreadlineServer (its own registry), so two servers
    in one process (tests, multi-node trials) never mix figures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams = Gauge("threadline_streams", "Live realtime streams.", registry=r)
        self.users_online = Gauge(
            "threadline_users_online", "Users with at least one live stream.", registry=r
        )
        self.messages_in = Counter(
            "threadline_messages_submitted", "Sends handed to the group committer.", registry=r
        )
        self.deliveries = Counter(
            "threadline_event_deliveries", "Events queued to live streams.", registry=r
        )
        self.frames_out = Counter(
            "threadline_frames_sent", "Frames written to streams.", ["kind"], registry=r
        )
        self.commit_batch = Histogram(
            "threadline_commit_batch_size",
            "Messages per group-commit transaction.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 256),
            registry=r,
        )
        self.fanout_seconds = Histogram(
            "threadline_fanout_seconds",
            "Commit to queued-for-every-stream latency.",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1),
            registry=r,
        )
        self.rate_limited = Counter(
            "threadline_rate_limited",
            "Calls, operations and frames refused by a per-user rate budget, by budget.",
            ["budget"],
            registry=r,
        )
        self.cluster_fallbacks = Counter(
            "threadline_cluster_fallbacks",
            "Checks of shared cluster state (Redis) answered by this node alone because Redis "
            "was unreachable or slow, by what was checked.",
            ["what"],
            registry=r,
        )
        self.cluster_remote_events = Counter(
            "threadline_cluster_remote_events",
            "Events other nodes committed and published that this node delivered to its streams.",
            registry=r,
        )
        self.cluster_repaired = Counter(
            "threadline_cluster_repaired_events",
            "Events this node read from the changes table because they did not arrive through "
            "Redis in time (lost, late, or Redis down), then delivered.",
            registry=r,
        )
        self.redis_up = Gauge(
            "threadline_redis_up",
            "1 while this node reaches the cluster's Redis (cluster.redis_url set), by what uses "
            "it (rate_limit, delivery); 0 while that part decides alone.",
            ["what"],
            registry=r,
        )
        self.edge_up = Gauge(
            "threadline_edge_up", "1 while the grpc-web edge (Envoy) is listening.", registry=r
        )
        self.edge_restarts = Counter(
            "threadline_edge_restarts",
            "Times the grpc-web edge was restarted after dying.",
            registry=r,
        )
        self.pings_dropped = Counter(
            "threadline_pings_dropped",
            "Ping frames over a stream's realtime.max_pings_per_second, ignored (no Pong).",
            registry=r,
        )
        self.slow_consumers = Counter(
            "threadline_slow_consumers", "Streams closed for falling behind.", registry=r
        )
        self.errors = Counter(
            "threadline_errors", "Error statuses returned, by code.", ["code"], registry=r
        )
        self.slow_queries = Counter(
            "threadline_slow_queries",
            "Statements slower than the slow-query threshold.",
            registry=r,
        )

        self.index_scans = Gauge(
            "threadline_index_scans",
            "Scans per index since statistics were reset (PostgreSQL pg_stat_user_indexes).",
            ["table", "index"],
            registry=r,
        )
        self.pool_in_use = Gauge(
            "threadline_db_pool_in_use", "Database connections checked out now.", registry=r
        )
        self.cache_lookups = Counter(
            "threadline_cache_lookups",
            "Cache lookups by cache and result (hit, miss).",
            ["cache", "result"],
            registry=r,
        )
        self.cache_hit_ratio = Gauge(
            "threadline_cache_hit_ratio", "Hits over lookups since start.", ["cache"], registry=r
        )

    def cache_lookup(self, cache: str, hit: bool) -> None:
        self.cache_lookups.labels(cache, "hit" if hit else "miss").inc()

    def render(self) -> bytes:
        # The hit ratio is derived from the lookup counters at scrape time, not per lookup.
        counts: dict[str, dict[str, float]] = {}
        for metric in self.cache_lookups.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    by_result = counts.setdefault(sample.labels["cache"], {})
                    by_result[sample.labels["result"]] = sample.value
        for cache, by_result in counts.items():
            total = sum(by_result.values())
            self.cache_hit_ratio.labels(cache).set(by_result.get("hit", 0.0) / total)
        return generate_latest(self.registry)


# Immutable by convention: bind_log_context replaces the mapping, never changes it in place.
_log_context: ContextVar[Mapping[str, str]] = ContextVar(
    "threadline_log_context", default=MappingProxyType({})
)


def bind_log_context(**fields: str) -> None:
    """Adds fields (request id, rpc, user, session) to every log record of the current task and
    of the tasks it starts from now on (asyncio copies the context into new tasks)."""
    _log_context.set({**_log_context.get(), **fields})


def log_context() -> Mapping[str, str]:
    return _log_context.get()


class ContextFilter(logging.Filter):
    """Copies the bound request fields onto each record (JSON logs show them as fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _log_context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra` fields (request ids, users) carried along."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
