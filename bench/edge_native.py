"""Edge bench native paths: Python grpc.aio clients driven through the bench's phases."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from bench._common import OWN_CONNECTION, pace
from bench.edge_measure import (
    HEADER,
    PHASE_TIMEOUT_S,
    SEQ_DIGITS,
    TIME_DIGITS,
    CaseContext,
    Clock,
    Phase,
    Result,
    Tracker,
    now_us,
)
from bench.fanout_bench import filler
from tests.support.raw_stream import RawStream
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import realtime_service_pb2_grpc as rsg

STREAMS_PER_CHANNEL = 20  # as fanout_bench: the server allows 100 concurrent streams per connection


def message_text(seq: int, body: str) -> str:
    return f"{seq:0{SEQ_DIGITS}d} {now_us():0{TIME_DIGITS}d} {body}"


def send_frame(seq: int, thread: str, body: str, op_prefix: str) -> rt.ClientFrame:
    return rt.ClientFrame(
        send_message=rt.SendMessage(
            client_op_id=f"{op_prefix}-{seq}", thread_id=thread, text=message_text(seq, body)
        )
    )


# Starts one send at once and returns what waits for its result.
Send = Callable[[int], Awaitable[rt.OperationResult]]
# One ping round trip; True when answered with a Pong.
Ping = Callable[[int], Awaitable[bool]]


class SubscribeStream:
    """One `Subscribe` call (the browser's stream) read into a Tracker."""

    def __init__(self, channel: grpc.aio.Channel, token: str, tracker: Tracker) -> None:
        self.call = rsg.RealtimeServiceStub(channel).Subscribe(
            rs.SubscribeRequest(hello=rt.Hello(client_name="edge-bench")),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        self.session: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read(tracker))

    async def _read(self, tracker: Tracker) -> None:
        session = ""
        try:
            async for response in self.call:
                now = time.perf_counter()
                frame = response.frame
                kind = frame.WhichOneof("kind")
                if kind == "welcome":
                    session = frame.welcome.session_id
                elif kind == "sync_complete" and not self.session.done():
                    self.session.set_result(session)
                elif self.session.done():
                    tracker.frame(frame, now)
            tracker.fail("a subscriber stream ended")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                tracker.fail(f"a subscriber stream failed: {exc.code()} {exc.details()}")
        finally:
            if not self.session.done():
                self.session.set_exception(EOFError("Subscribe ended before SyncComplete"))

    def cancel(self) -> None:
        self.call.cancel()
        self._task.cancel()


async def consume_connect(stream: RawStream, tracker: Tracker) -> None:
    while True:
        frame = await stream.pushes.get()
        now = time.perf_counter()
        if frame is None:
            tracker.fail("a subscriber stream ended")
            return
        tracker.frame(frame, now)


async def native_phase(ph: Phase, send: Send, tracker: Tracker, r: Result) -> None:
    """The scheme of edge_clients.ts's runPhase, for the Python clients."""
    tracker.reset()
    last_ack = 0.0

    async def ack(seq: int, waiting: Awaitable[rt.OperationResult], sent: float) -> None:
        nonlocal last_ack
        try:
            result = await waiting
        except (grpc.aio.AioRpcError, EOFError, TimeoutError) as exc:
            tracker.fail(f"send {seq} failed: {exc!r}")
            return
        now = time.perf_counter()
        if result.WhichOneof("outcome") != "confirmed":
            tracker.fail(f"send {seq} failed: {result}")
            return
        r.ack.append(now - sent)
        last_ack = max(last_ack, now)

    def one(seq: int) -> asyncio.Task[None]:
        tracker.counts[seq] = 0
        sent = time.perf_counter()
        return asyncio.create_task(ack(seq, send(seq), sent))

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    if ph.rate == 0 and ph.window > 0:
        stop_at = start + ph.seconds
        seq = ph.first_seq
        while time.perf_counter() < stop_at and not tracker.failed:
            if len(tracker.counts) >= ph.window:
                tracker.progress.clear()
                try:
                    await asyncio.wait_for(tracker.progress.wait(), PHASE_TIMEOUT_S)
                except TimeoutError:
                    tracker.fail(f"closed loop stalled with {len(tracker.counts)} undelivered")
                continue
            tasks.append(one(seq))
            seq += 1
    else:
        async for i in pace(ph.rate, ph.count):
            if tracker.failed:
                break
            tasks.append(one(ph.first_seq + i))
    r.offered_s = time.perf_counter() - start
    r.messages = len(tasks)
    tracker.expect = len(tasks) * tracker.n
    if tracker.deliveries >= tracker.expect:
        tracker.done.set()
    await asyncio.gather(*tasks)
    try:
        await asyncio.wait_for(tracker.done.wait(), PHASE_TIMEOUT_S)
    except TimeoutError:
        tracker.fail(f"timed out with {tracker.deliveries} of {tracker.expect} deliveries")
    r.acked_s = last_ack - start if last_ack else 0.0
    r.delivered_s = tracker.last - start if tracker.last else 0.0
    r.deliveries, r.frames, r.deliver = tracker.deliveries, tracker.frames, tracker.latencies
    r.error = r.error or tracker.failed


async def native_pings(ph: Phase, ping: Ping, r: Result) -> None:
    """The bare hop: `count` pings one at a time (as edge_clients.ts's runPings)."""
    start = time.perf_counter()
    for i in range(ph.count):
        sent = time.perf_counter()
        try:
            ok = await asyncio.wait_for(ping(i), PHASE_TIMEOUT_S)
        except (grpc.aio.AioRpcError, EOFError, TimeoutError) as exc:
            r.error = f"ping {i} failed: {exc!r}"
            break
        if not ok:
            r.error = f"ping {i} was not answered with a Pong"
            break
        r.ack.append(time.perf_counter() - sent)
    r.messages = len(r.ack)
    r.offered_s = r.acked_s = time.perf_counter() - start


async def drive_native(ctx: CaseContext, phases: list[Phase]) -> list[Result]:
    n = len(ctx.users)
    channels = [
        grpc.aio.insecure_channel(ctx.proc.target, options=OWN_CONNECTION)
        for _ in range(math.ceil(n / STREAMS_PER_CHANNEL))
    ]
    tracker = Tracker(n)
    streams: list[RawStream] = []
    subs: list[SubscribeStream] = []
    consumers: list[asyncio.Task[None]] = []
    body = filler(ctx.size - HEADER)
    op_prefix = uuid.uuid4().hex
    send: Send
    ping: Ping
    try:
        if ctx.path == "native":
            streams = [
                RawStream(channels[i // STREAMS_PER_CHANNEL], ctx.tokens[u])
                for i, u in enumerate(ctx.users)
            ]
            await asyncio.gather(*(s.hello() for s in streams))
            consumers = [asyncio.create_task(consume_connect(s, tracker)) for s in streams]
            sender = streams[0]

            def send(seq: int) -> Awaitable[rt.OperationResult]:
                rid = sender.send(send_frame(seq, ctx.thread, body, op_prefix))

                async def result() -> rt.OperationResult:
                    reply = await sender.reply_to(rid, timeout=PHASE_TIMEOUT_S)
                    return reply.operation_result

                return result()

            async def ping(i: int) -> bool:
                rid = sender.send(rt.ClientFrame(ping=rt.Ping()))
                reply = await sender.reply_to(rid, timeout=PHASE_TIMEOUT_S)
                return reply.WhichOneof("kind") == "pong"
        else:
            subs = [
                SubscribeStream(channels[i // STREAMS_PER_CHANNEL], ctx.tokens[u], tracker)
                for i, u in enumerate(ctx.users)
            ]
            sessions = await asyncio.gather(*(s.session for s in subs))
            # the sends on a connection of their own, as a browser's (HTTP/1.1: one per call)
            channels.append(grpc.aio.insecure_channel(ctx.proc.target, options=OWN_CONNECTION))
            submit = rsg.RealtimeServiceStub(channels[-1]).Submit
            auth = (("authorization", f"Bearer {ctx.tokens[ctx.users[0]]}"),)

            def send(seq: int) -> Awaitable[rt.OperationResult]:
                call = submit(
                    rs.SubmitRequest(
                        frame=send_frame(seq, ctx.thread, body, op_prefix), session_id=sessions[0]
                    ),
                    metadata=auth,
                    timeout=PHASE_TIMEOUT_S,
                )

                async def result() -> rt.OperationResult:
                    response = await call
                    return response.frame.operation_result

                return result()

            async def ping(i: int) -> bool:
                # no session: Submit{ping} is then not capped (as edge_clients.ts)
                response = await submit(
                    rs.SubmitRequest(frame=rt.ClientFrame(request_id=f"ping-{i}", ping=rt.Ping())),
                    metadata=auth,
                    timeout=PHASE_TIMEOUT_S,
                )
                return response.frame.WhichOneof("kind") == "pong"

        out: list[Result] = []
        for ph in phases:
            r = Result(path=ctx.path, subscribers=n, phase=ph.name)
            clock = Clock.start(ctx.server_pid, ctx.envoy_pid)
            if ph.name == "idle":
                await asyncio.sleep(ph.seconds)
            elif ph.name == "ping":
                await native_pings(ph, ping, r)
            else:
                await native_phase(ph, send, tracker, r)
            clock.stop(r)
            if r.error:
                raise RuntimeError(f"{ctx.path} {n} subs, {ph.name}: {r.error}")
            out.append(r)
        return out
    finally:
        for task in consumers:
            task.cancel()
        for s in streams:
            s.cancel()
        for sub in subs:
            sub.cancel()
        for channel in channels:
            await channel.close()
