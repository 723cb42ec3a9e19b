"""In-process broker: fans committed events out to the live streams of their recipients."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

from threadline_server.domain.models import Event
from threadline_server.errors import Unavailable
from threadline_server.observability import Metrics
from threadline_server.realtime.session import EventBytes, StreamSession

logger = logging.getLogger(__name__)

# event -> (its bytes for everyone, its bytes for its author's streams); from the transport.
Encoder = Callable[[Event], tuple[EventBytes, EventBytes]]


class LocalBroker:
    """Delivers to sessions on this node. Each event is encoded once, when some session here
    receives it (its author's copy, which carries the client_op_id, comes from the same bytes),
    never per stream."""

    def __init__(
        self, encode: Encoder, max_connections_per_user: int, metrics: Metrics | None = None
    ) -> None:
        self._encode = encode
        self._max_per_user = max_connections_per_user
        self._metrics = metrics
        self._by_user: dict[str, list[StreamSession]] = defaultdict(list)
        self._by_id: dict[str, StreamSession] = {}
        self._replaced_frame: Callable[[], bytes] = lambda: b""
        # A cluster's connection registry (cluster.connections) hears of every stream here.
        self.on_subscribed: Callable[[StreamSession], None] = lambda _s: None
        self.on_unsubscribed: Callable[[StreamSession], None] = lambda _s: None

    def subscribe(self, session: StreamSession, replaced_frame: Callable[[], bytes]) -> None:
        """Registers a session; beyond the per-user cap the oldest is closed (REPLACED), since
        refusing the new one would lock a user out behind dead connections after a network blip."""
        self._replaced_frame = replaced_frame
        sessions = self._by_user[session.user_id]
        sessions.append(session)
        self._by_id[session.session_id] = session
        self._count()
        while len(sessions) > self._max_per_user:
            oldest = sessions.pop(0)
            self._by_id.pop(oldest.session_id, None)
            self._close_replaced(oldest)
        self.on_subscribed(session)

    def replace(self, session_id: str) -> None:
        """Closes this node's session `session_id`, replaced by a newer connection of its user
        on another node of the cluster; nothing if it has gone already."""
        oldest = self._by_id.pop(session_id, None)
        if oldest is None:
            return
        sessions = self._by_user.get(oldest.user_id)
        if sessions and oldest in sessions:
            sessions.remove(oldest)
        self._close_replaced(oldest)

    def _close_replaced(self, session: StreamSession) -> None:
        error = Unavailable("REPLACED", "replaced by a newer connection", retry_after=0)
        session.close(error, self._replaced_frame())

    def unsubscribe(self, session: StreamSession) -> None:
        sessions = self._by_user.get(session.user_id)
        if sessions and session in sessions:
            sessions.remove(session)
        if not sessions:
            self._by_user.pop(session.user_id, None)
        self._by_id.pop(session.session_id, None)
        self._count()
        self.on_unsubscribed(session)

    def _count(self) -> None:
        if self._metrics is not None:
            self._metrics.streams.set(len(self._by_id))
            self._metrics.users_online.set(len(self._by_user))

    def session(self, session_id: str) -> StreamSession | None:
        return self._by_id.get(session_id)

    def online(self, user_id: str) -> bool:
        return bool(self._by_user.get(user_id))

    def publish(self, events: list[Event]) -> None:
        started = time.perf_counter()
        delivered = 0
        by_user = self._by_user
        for event in events:
            encoded: tuple[EventBytes, EventBytes] | None = None
            for user_id in event.recipients:
                sessions = by_user.get(user_id)
                if not sessions:
                    continue
                if encoded is None:
                    encoded = self._encode(event)
                frame = encoded[1] if user_id == event.actor_id else encoded[0]
                for session in sessions:
                    session.deliver(frame)
                delivered += len(sessions)
        if self._metrics is not None:
            self._metrics.deliveries.inc(delivered)
            self._metrics.fanout_seconds.observe(time.perf_counter() - started)

    def deliver_encoded(
        self, recipients: frozenset[str], actor_id: str, pair: tuple[EventBytes, EventBytes]
    ) -> None:
        """An event already encoded (another node's, cluster.delivery) to these users' streams
        here: the author's streams get the copy with its client_op_id."""
        delivered = 0
        for user_id in recipients:
            sessions = self._by_user.get(user_id)
            if not sessions:
                continue
            frame = pair[1] if user_id == actor_id else pair[0]
            for session in sessions:
                session.deliver(frame)
            delivered += len(sessions)
        if self._metrics is not None:
            self._metrics.deliveries.inc(delivered)

    def all_sessions(self) -> list[StreamSession]:
        return list(self._by_id.values())
