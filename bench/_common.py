"""Helpers shared by the benchmarks: the bare grpc.aio echo baseline, percentiles, CPU
accounting and token minting for a `threadline serve` started by ServerProcess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.process import ServerProcess, free_port  # noqa: E402
from threadline_server.auth import EmbeddedIssuer  # noqa: E402

_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Each channel gets its own TCP connection (grpc otherwise shares one subchannel per target, and
# the server allows 100 concurrent streams per connection).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` (seconds) in milliseconds; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _postgres_cpu_seconds() -> float:
    """CPU time of every live `postgres` process (the database's share, when it is local)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.find("(") + 1 :].rsplit(")", 1)
        if comm == "postgres":
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


def _machine_busy_seconds() -> float:
    """CPU time all cores spent busy so far (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


@dataclass(frozen=True)
class CpuClock:
    """CPU used by the server, this client, local PostgreSQL and everything else on the
    machine (other people's tests on a shared box), from one point on."""

    server_pid: int
    wall: float
    machine: float
    client: float
    server: float
    db: float

    @classmethod
    def start(cls, server_pid: int) -> CpuClock:
        return cls(
            server_pid,
            time.perf_counter(),
            _machine_busy_seconds(),
            time.process_time(),
            process_cpu_seconds(server_pid),
            _postgres_cpu_seconds(),
        )

    def stop(self, m: Measured) -> None:
        """Fills `m`'s CPU fields with what was used since `start`."""
        m.wall_s = time.perf_counter() - self.wall
        m.client_cpu_s = time.process_time() - self.client
        m.server_cpu_s = process_cpu_seconds(self.server_pid) - self.server
        m.db_cpu_s = _postgres_cpu_seconds() - self.db
        machine = _machine_busy_seconds() - self.machine
        m.other_cpu_s = max(0.0, machine - m.client_cpu_s - m.server_cpu_s - m.db_cpu_s)


def mint_tokens(proc: ServerProcess, users: list[str], ttl_s: int = 3600) -> dict[str, str]:
    """Tokens for many users without a `threadline token` subprocess each: signs with the data
    directory's embedded key for the issuer the server announces (http://127.0.0.1:<http_port>)."""
    data_dir = Path(proc.env["THREADLINE_SERVER__DATA_DIR"])
    issuer = EmbeddedIssuer.load_or_create(data_dir, f"http://127.0.0.1:{proc.http_port}")
    return {user: issuer.mint(user, ttl_s=ttl_s) for user in users}


@contextmanager
def bare_server(script: str = "echo_server.py") -> Iterator[tuple[int, int]]:
    """A bare grpc.aio baseline (bench/echo_server.py unless named) in its own process, once it
    says it is ready; yields (port, pid)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"bench/{script} did not start")
    try:
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait()
        proc.stdout.close()


echo_server = bare_server


class EchoStream:
    """One bidirectional call on raw bytes fed from a queue (like RawStream feeds Connect): the
    echo by default, or another bare server's method."""

    def __init__(self, channel: grpc.aio.Channel, path: str = "/bench.Echo/Echo") -> None:
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
        self.call = method(self._requests())

    async def _requests(self) -> AsyncIterator[bytes]:
        while (item := await self._out.get()) is not None:
            yield item

    def send(self, payload: bytes) -> None:
        self._out.put_nowait(payload)

    async def read(self) -> bytes:
        item = await self.call.read()
        if not isinstance(item, bytes):
            raise EOFError("echo stream ended")
        return item

    def close(self) -> None:
        self._out.put_nowait(None)


async def echo_baseline(senders: int, messages: int, size: int = 200) -> tuple[float, list[float]]:
    """Saturating echo: `senders` streams each pipelining `messages` payloads; returns
    (messages/s, round trips in seconds)."""
    payload = b"x" * size
    latencies: list[float] = []
    with echo_server() as (port, _pid):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def one() -> None:
                stream = EchoStream(channel)
                sent: list[float] = []
                for _ in range(messages):
                    sent.append(time.perf_counter())
                    stream.send(payload)
                for i in range(messages):
                    await stream.read()
                    latencies.append(time.perf_counter() - sent[i])
                stream.close()

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(senders)))
            elapsed = time.perf_counter() - start
    return senders * messages / elapsed, latencies


@dataclass
class Measured:
    """What one run measured (times in seconds from its start)."""

    messages: int = 0
    offered_s: float = 0.0  # when the last message was sent
    acked_s: float = 0.0  # when the last message was acknowledged (committed)
    delivered_s: float = 0.0  # when the last delivery arrived
    deliveries: int = 0
    frames: int = 0  # event frames received (all subscribers)
    ack: list[float] = field(default_factory=list)
    deliver: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    db_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.acked_s if self.acked_s else 0.0

    @property
    def offered_per_s(self) -> float:
        return self.messages / self.offered_s if self.offered_s else 0.0

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.delivered_s if self.delivered_s else 0.0

    @property
    def events_per_frame(self) -> float:
        return self.deliveries / self.frames if self.frames else 0.0


async def pace(rate: float, count: int) -> AsyncIterator[int]:
    """Yields 0..count-1 on a fixed schedule of `rate` per second (as fast as possible when the
    rate is 0); a late tick is not made up by bunching, the schedule stays absolute."""
    start = time.perf_counter()
    for i in range(count):
        if rate > 0:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield i


async def echo_run(rate: float, count: int, size: int) -> Measured:
    """One echo stream: `count` payloads at `rate`/s (0: all pipelined); round trip latency."""
    payload = b"x" * size
    m = Measured(messages=count)
    with echo_server() as (port, pid):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # warm the connection up
            warm = EchoStream(channel)
            for _ in range(20):
                warm.send(payload)
                await warm.read()
            warm.close()
            stream = EchoStream(channel)
            sent: list[float] = []
            clock = CpuClock.start(pid)
            start = time.perf_counter()

            async def reader() -> None:
                for i in range(count):
                    await stream.read()
                    m.ack.append(time.perf_counter() - sent[i])
                m.acked_s = m.delivered_s = time.perf_counter() - start

            task = asyncio.create_task(reader())
            async for _ in pace(rate, count):
                sent.append(time.perf_counter())
                stream.send(payload)
            m.offered_s = time.perf_counter() - start
            await task
            clock.stop(m)
            stream.close()
    m.deliver = m.ack
    m.deliveries = m.frames = count
    return m


def drain_output(proc: ServerProcess) -> None:
    """Reads a started server's output into `proc.output` on a daemon thread until it ends, so
    that a long run never fills the pipe (which would block the server at its next log line)."""
    assert proc.proc is not None and proc.proc.stdout is not None
    stdout = proc.proc.stdout

    def run() -> None:
        # kill()/stop() read the rest and close the pipe themselves, maybe while this reads.
        with contextlib.suppress(ValueError, OSError, RuntimeError):
            for line in stdout:
                proc.output.append(line)

    threading.Thread(target=run, daemon=True).start()
