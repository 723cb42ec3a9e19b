"""One live stream's state: its bounded outbound queue, activity, token expiry and closing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from threadline_server.domain.limits import TokenBucket
from threadline_server.domain.models import Principal
from threadline_server.errors import DomainError


class EventBytes(bytes):
    """One encoded `Event` (not yet a frame): consecutive ones are batched into one frame.
    The transport may cache the event's framing on it (empty when it did not): `item`, the
    event as one element of a batch, and `alone`, the whole frame of a batch of only it."""

    change_seq: int = 0
    item: bytes = b""
    alone: bytes = b""


@dataclass(frozen=True, slots=True)
class Close:
    """Ends the stream after the frames before it: an optional last frame, then the status."""

    error: DomainError | None  # None: a clean end (the client half-closed)
    final_frame: bytes | None = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What operators see of a stream besides its user."""

    kind: str = "connect"  # or "subscribe"
    peer: str = ""
    client_name: str = ""
    client_version: str = ""


class StreamSession:
    """A subscriber of the broker. Frames are bytes already encoded by the transport, so an
    event is serialized once for all of its recipients.

    Overflow policy: when the queue is full the session drops everything queued, queues the
    `overflow_frame` (ResyncRequired: slow consumer) and closes with RESOURCE_EXHAUSTED. The
    client resumes from its cursor; nothing is lost silently.
    """

    # A node holds one per open stream: slots keep each a few hundred bytes smaller.
    __slots__ = (
        "_clock",
        "_max_frames",
        "_pings",
        "_queue",
        "_submits",
        "_waiter",
        "closing",
        "info",
        "last_activity",
        "min_change_seq",
        "opened_at",
        "opened_at_wall",
        "overflow",
        "principal",
        "session_id",
        "user_id",
        "watched",
    )

    def __init__(
        self,
        principal: Principal,
        *,
        max_frames: int,
        min_change_seq: int = 0,
        info: SessionInfo | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_id = uuid.uuid4().hex
        self.principal = principal
        self.user_id = principal.user_id
        self.info = info or SessionInfo()
        # Monotonic seconds for the idle timeout; the transport passes its own (a test's fake).
        self._clock = clock
        self.opened_at = clock()
        self.opened_at_wall = time.time()
        self.last_activity = self.opened_at
        self.min_change_seq = min_change_seq
        # One consumer (the stream's writer) and no bound of its own (deliver enforces
        # max_frames): a deque and one wake-up future do what asyncio.Queue did, for a
        # fraction of its per-item cost, which every delivery pays. Made at the first frame
        # and dropped once drained: an empty deque holds a 64-slot block (about 0.7 KiB), and
        # most of a node's streams are idle most of the time.
        self._queue: deque[bytes | Close] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._max_frames = max_frames
        self.closing: Close | None = None
        # Makes the error and last frame of an overflow (set by the transport before subscribing).
        self.overflow: Callable[[], tuple[DomainError, bytes]] | None = None
        # Set once catch-up is done and live writing starts: only then do the idle and token
        # checks apply (a long replay reads nothing from the client).
        self.watched = False
        self._pings: TokenBucket | None = None  # made by the first Ping (see ping_allowed)
        self._submits: ArrivalOrder | None = None  # made by the first Submit (see submits)

    @property
    def submits(self) -> ArrivalOrder:
        """Frames of this session arriving by Submit (most streams never see one)."""
        if self._submits is None:
            self._submits = ArrivalOrder()
        return self._submits

    def deliver(self, frame: EventBytes) -> None:
        """Called by the broker; never blocks the publisher."""
        if self.closing is not None:
            return
        if self._queue is not None and len(self._queue) >= self._max_frames:
            assert self.overflow is not None, "overflow frame must be set before subscribing"
            error, final = self.overflow()
            self._queue = None
            self.close(error, final)
            return
        self._put(frame)

    def send(self, frame: bytes) -> None:
        """A direct reply (Welcome, Pong, results): queued like events, in order."""
        if self.closing is None:
            self._put(frame)

    def close(self, error: DomainError | None, final_frame: bytes | None = None) -> None:
        if self.closing is None:
            self.closing = Close(error, final_frame)
            self._put(self.closing)

    def touch(self) -> None:
        self.last_activity = self._clock()

    def idle_for(self) -> float:
        """Seconds since the last frame from the client."""
        return self._clock() - self.last_activity

    def last_activity_wall(self) -> float:
        """`last_activity` as epoch seconds (monotonic time is for timeouts, this for people)."""
        return max(self.opened_at_wall, time.time() - self.idle_for())

    def queued(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def refresh(self, principal: Principal) -> None:
        self.principal = principal

    def ping_allowed(self, now: float, per_second: float) -> bool:
        """Whether this stream's Ping at `now` may be answered: `per_second` a second, in bursts
        of one second's worth (at least one). Per stream, not per user: a heartbeat is a
        stream's own business, and one chatty tab must not silence another's. The rate comes
        from the caller so that the transport, which owns the settings and the clock, decides.
        """
        if per_second <= 0:
            return True
        if self._pings is None:
            self._pings = TokenBucket.full(max(1.0, per_second), per_second, now)
        return self._pings.take(now) == 0.0

    def _put(self, item: bytes | Close) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> bytes | Close:
        """The next frame, waiting for one (only the stream's writer calls this)."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take(self._queue)

    def stale(self, frame: bytes) -> bool:
        """An event already covered by the snapshot or replay this stream started from."""
        return isinstance(frame, EventBytes) and 0 < frame.change_seq <= self.min_change_seq

    def next_nowait(self) -> bytes | Close | None:
        return self._take(self._queue) if self._queue else None

    def _take(self, queue: deque[bytes | Close]) -> bytes | Close:
        item = queue.popleft()
        if not queue:
            self._queue = None
        return item


class ArrivalOrder:
    """Starts the frames of one session that arrive by separate Submit calls in the order they
    arrived, as Connect reads its frames in order: a call whose authentication waits (a users
    cache miss writes the user) is not overtaken by one that arrived after it.

    `arrive` is called as a call comes in, before anything awaits; the call then `wait`s for its
    turn and calls `done` once its frame has been started (or once it gave up).
    """

    def __init__(self) -> None:
        self._tail: asyncio.Future[None] | None = None
        self.arrived = 0  # how many calls have arrived so far (for operators and tests)

    def arrive(self) -> Turn:
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turn = Turn(self._tail, mine)
        self._tail = mine
        self.arrived += 1
        return turn


class Turn:
    """One call's place in an `ArrivalOrder`."""

    __slots__ = ("_before", "_mine")

    def __init__(self, before: asyncio.Future[None] | None, mine: asyncio.Future[None]) -> None:
        self._before = before
        self._mine = mine

    async def wait(self) -> None:
        """Until every call that arrived earlier has started its frame or given up. (asyncio.wait
        never cancels what it waits for: a caller that hangs up here leaves the chain intact.)"""
        if self._before is not None and not self._before.done():
            await asyncio.wait((self._before,))

    def done(self) -> None:
        """This call's frame has started (or it gave up): the next call may go, but never
        before every earlier one has."""
        if self._mine.done():
            return
        if self._before is None or self._before.done():
            self._mine.set_result(None)
        else:
            self._before.add_done_callback(lambda _f: self._release())

    def _release(self) -> None:
        if not self._mine.done():
            self._mine.set_result(None)
