"""This node's part in a cluster (cluster.redis_url set), wired to its store and broker: the
delivery of every node's commits (cluster.delivery), the connection cap across nodes
(cluster.connections) and typing from other nodes. Composition, like app.py, which builds it
only for a cluster: one node without Redis has none of this."""

from __future__ import annotations

from collections.abc import Callable

from threadline_server.cluster import setup as cluster_setup
from threadline_server.cluster.connections import ConnectionRegistry
from threadline_server.cluster.delivery import ClusterDelivery
from threadline_server.cluster.envelope import RemoteEvent
from threadline_server.config import Settings
from threadline_server.domain.models import Event, EventKind, TypingState
from threadline_server.observability import Metrics
from threadline_server.realtime.broker import LocalBroker
from threadline_server.realtime.typing import typing_event
from threadline_server.storage.store import SqlStore
from threadline_server.transport import codec


class ClusterNode:
    def __init__(
        self,
        delivery: ClusterDelivery,
        connections: ConnectionRegistry,
        store: SqlStore,
        broker: LocalBroker,
        publish_committed: Callable[[list[Event]], None],
    ) -> None:
        self.delivery = delivery
        self.connections = connections
        self._store = store
        self._broker = broker
        self._publish_committed = publish_committed
        broker.on_subscribed = lambda s: connections.connected(s.user_id, s.session_id)
        broker.on_unsubscribed = lambda s: connections.disconnected(s.user_id, s.session_id)

    @classmethod
    def build(
        cls,
        settings: Settings,
        metrics: Metrics,
        store: SqlStore,
        broker: LocalBroker,
        publish_committed: Callable[[list[Event]], None],
    ) -> ClusterNode | None:
        cluster = settings.cluster
        if not cluster.redis_url:
            return None
        node = cluster_setup.node_id(cluster)
        connections = cluster_setup.connections(
            cluster,
            metrics,
            node=node,
            cap=settings.realtime.max_connections_per_user,
            replace_local=broker.replace,
        )
        holder: list[ClusterNode] = []  # the delivery's handlers are this object's methods
        delivery = cluster_setup.delivery(
            cluster,
            metrics,
            node=node,
            encode=codec.event_raw,
            read_after=store.committed_after,
            latest=lambda: holder[0].latest_change(),
            deliver_local=publish_committed,
            deliver_remote=lambda event: holder[0].event_elsewhere(event),
            deliver_repaired=lambda events: holder[0].committed_elsewhere(events),
            on_typing=lambda state: holder[0].typing_elsewhere(state),
        )
        assert delivery is not None and connections is not None  # both exist with redis_url
        holder.append(cls(delivery, connections, store, broker, publish_committed))
        return holder[0]

    async def start(self) -> None:
        await self.delivery.start()
        await self.connections.start()

    async def close(self) -> None:
        await self.delivery.close()
        await self.connections.close()

    def committed_elsewhere(self, events: list[Event]) -> None:
        """Another node's commits, read from the changes table (they did not come through
        Redis in time): this node's caches learn of them first, as they learn of its own."""
        self._store.caches.apply(events)
        self._publish_committed(events)

    async def event_elsewhere(self, event: RemoteEvent) -> None:
        """Another node's event, as it published it, to those it was addressed to whom this node
        finds among the thread's members itself (its caches forget what the change made stale
        first): the same streams as on the committing node, and never a non-member."""
        self._store.caches.forget(EventKind(event.kind), event.thread_id)
        if event.user_id:
            recipients = frozenset([event.user_id])
        else:
            members = await self._store.thread_members(event.thread_id)
            recipients = members.intersection(event.recipients)
        pair = codec.event_pair_from_raw(event.raw, event.change_seq, event.client_op_id)
        self._broker.deliver_encoded(recipients, event.actor_id, pair)

    async def typing_elsewhere(self, state: TypingState) -> None:
        """Someone typing on another node: shown to the thread's members as this node knows
        them, and only while the typist is one of them."""
        members = await self._store.thread_members(state.thread_id)
        if state.user_id in members:
            self._broker.publish([typing_event(state, members)])

    async def latest_change(self) -> int:
        return (await self._store.current_change_seq())[1]
