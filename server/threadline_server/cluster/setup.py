"""Builds a node's cluster parts from its settings: nothing (one node, all in process) without
`cluster.redis_url`, else the Redis-backed rate budgets and the delivery of other nodes'
commits. Kept apart from app.py, which only hands over the store's functions."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping

from threadline_server.cluster.connections import ConnectionRegistry
from threadline_server.cluster.delivery import (
    ClusterDelivery,
    Deliver,
    DeliverRemote,
    Encode,
    OnTyping,
)
from threadline_server.cluster.envelope import RemoteEvent
from threadline_server.cluster.limits import ClusterRateLimits
from threadline_server.config import ClusterSettings
from threadline_server.domain.limits import Budget, Rate, RateLimits
from threadline_server.domain.models import Event
from threadline_server.observability import Metrics

# Changes that did not arrive through Redis are read from the changes table a page at a time.
FEED_PAGE = 200
FEED_PAGE_BYTES = 4 * 1024 * 1024

ReadAfter = Callable[[int, int, int, int], Awaitable[tuple[list[Event], int | None]]]


def node_id(cluster: ClusterSettings) -> str:
    return cluster.node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def rate_limits(
    rates: Mapping[Budget, Rate], cluster: ClusterSettings, metrics: Metrics
) -> RateLimits:
    """The per-user budgets: in this process, or shared by the cluster through Redis."""

    def refused(budget: str) -> None:
        metrics.rate_limited.labels(budget).inc()

    if not cluster.redis_url:
        return RateLimits(rates, on_refused=refused)
    return ClusterRateLimits(
        rates,
        redis_url=cluster.redis_url,
        key_prefix=cluster.key_prefix,
        timeout_s=cluster.redis_timeout_s,
        retry_s=cluster.redis_retry_s,
        on_refused=refused,
        on_fallback=metrics.cluster_fallbacks.labels("rate_limit").inc,
        on_redis_up=lambda up: metrics.redis_up.labels("rate_limit").set(1 if up else 0),
    )


def delivery(
    cluster: ClusterSettings,
    metrics: Metrics,
    *,
    node: str,
    encode: Encode,
    read_after: ReadAfter,
    latest: Callable[[], Awaitable[int]],
    deliver_local: Deliver,
    deliver_remote: DeliverRemote,
    deliver_repaired: Deliver,
    on_typing: OnTyping,
) -> ClusterDelivery | None:
    """Delivery of every node's commits to this node's streams; None for a single node."""
    if not cluster.redis_url:
        return None

    async def page_after(after: int, upto: int) -> tuple[list[Event], int | None]:
        return await read_after(after, upto, FEED_PAGE, FEED_PAGE_BYTES)

    async def remote(event: RemoteEvent) -> None:
        await deliver_remote(event)
        metrics.cluster_remote_events.inc()

    return ClusterDelivery(
        redis_url=cluster.redis_url,
        key_prefix=cluster.key_prefix,
        node_id=node,
        timeout_s=cluster.redis_timeout_s,
        retry_s=cluster.redis_retry_s,
        gap_wait_s=cluster.gap_wait_s,
        tail_interval_s=cluster.tail_interval_s,
        safety_poll_s=cluster.safety_poll_s,
        encode=encode,
        read_after=page_after,
        latest=latest,
        deliver_local=deliver_local,
        deliver_remote=remote,
        deliver_repaired=deliver_repaired,
        on_typing=on_typing,
        on_redis_up=lambda up: metrics.redis_up.labels("delivery").set(1 if up else 0),
        on_repaired=metrics.cluster_repaired.inc,
    )


def connections(
    cluster: ClusterSettings,
    metrics: Metrics,
    *,
    node: str,
    cap: int,
    replace_local: Callable[[str], None],
) -> ConnectionRegistry | None:
    """The per-user connection cap across the cluster; None for a single node."""
    if not cluster.redis_url:
        return None
    return ConnectionRegistry(
        redis_url=cluster.redis_url,
        key_prefix=cluster.key_prefix,
        node_id=node,
        cap=cap,
        timeout_s=cluster.redis_timeout_s,
        retry_s=cluster.redis_retry_s,
        replace_local=replace_local,
        on_fallback=metrics.cluster_fallbacks.labels("connection_cap").inc,
    )
