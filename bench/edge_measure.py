"""Edge bench measurement: clocks, CPU accounting, phase/result types and the delivery tracker."""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench._common import pct, process_cpu_seconds
from tests.support.process import ServerProcess
from threadline.v1 import realtime_pb2 as rt

SEQ_DIGITS = 8
TIME_DIGITS = 13
HEADER = SEQ_DIGITS + 1 + TIME_DIGITS + 1  # "<seq> <µs> "
PHASE_TIMEOUT_S = 120.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_EPOCH = time.perf_counter()


def now_us() -> int:
    """µs on this process's monotonic clock (13 digits last 115 days)."""
    return round((time.perf_counter() - _EPOCH) * 1e6)


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy so far (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def envoy_pid_of(server_pid: int) -> int | None:
    """The server's Envoy child (setpriv execs it, so the child itself is `envoy`)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.find("(") + 1 :].rsplit(")", 1)
        if comm.startswith("envoy") and int(rest.split()[1]) == server_pid:
            return int(stat.parent.name)
    return None


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


@dataclass(frozen=True)
class Phase:
    name: str  # warmup, ping, steady, max
    rate: float  # messages/s on a fixed schedule (0: closed loop)
    count: int  # messages of a fixed-rate phase
    seconds: float  # sending time of a closed-loop phase
    window: int  # closed loop: messages not yet delivered to everyone, at most
    first_seq: int

    def command(self) -> dict[str, object]:
        if self.name == "idle":
            return {"cmd": "idle", "name": "idle", "seconds": self.seconds}
        if self.name == "ping":
            return {"cmd": "ping", "name": "ping", "count": self.count, "timeoutS": PHASE_TIMEOUT_S}
        return {
            "cmd": "phase",
            "name": self.name,
            "rate": self.rate,
            "count": self.count,
            "seconds": self.seconds,
            "window": self.window,
            "firstSeq": self.first_seq,
            "timeoutS": PHASE_TIMEOUT_S,
        }


@dataclass
class Result:
    """One measured phase of one case (times in seconds from the phase's start)."""

    path: str = ""
    subscribers: int = 0
    phase: str = ""
    messages: int = 0
    deliveries: int = 0
    frames: int = 0  # frames carrying message events, all subscribers
    offered_s: float = 0.0
    acked_s: float = 0.0
    delivered_s: float = 0.0
    wall_s: float = 0.0  # the CPU window
    ack: list[float] = field(default_factory=list)
    deliver: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    envoy_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    error: str = ""

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.delivered_s if self.delivered_s else 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.acked_s if self.acked_s else 0.0

    @property
    def events_per_frame(self) -> float:
        return self.deliveries / self.frames if self.frames else 0.0

    def per_delivery_us(self, cpu_s: float) -> float:
        return cpu_s / self.deliveries * 1e6 if self.deliveries else 0.0

    def per_message_us(self, cpu_s: float) -> float:
        return cpu_s / self.messages * 1e6 if self.messages else 0.0

    def summary(self) -> dict[str, object]:
        """What the JSON keeps (percentiles, not every latency)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("ack", "deliver")}
        out.update(
            deliveries_per_s=self.deliveries_per_s,
            msgs_per_s_acked=self.msgs_per_s,
            events_per_frame=self.events_per_frame,
            ack_ms={q: pct(self.ack, v) for q, v in QUANTILES.items()},
            deliver_ms={q: pct(self.deliver, v) for q, v in QUANTILES.items()},
            server_cpu_us_per_delivery=self.per_delivery_us(self.server_cpu_s),
            envoy_cpu_us_per_delivery=self.per_delivery_us(self.envoy_cpu_s),
            client_cpu_us_per_delivery=self.per_delivery_us(self.client_cpu_s),
        )
        return out


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}


@dataclass(frozen=True)
class Clock:
    """CPU of the server, its Envoy, this process and the whole machine from one point on."""

    server_pid: int
    envoy_pid: int | None
    wall: float
    machine: float
    server: float
    envoy: float
    me: float

    @classmethod
    def start(cls, server_pid: int, envoy_pid: int | None) -> Clock:
        return cls(
            server_pid,
            envoy_pid,
            time.perf_counter(),
            machine_busy_seconds(),
            process_cpu_seconds(server_pid),
            process_cpu_seconds(envoy_pid) if envoy_pid else 0.0,
            time.process_time(),
        )

    def stop(self, r: Result, other_client_cpu_s: float = 0.0) -> None:
        """Fills `r`'s CPU fields; `other_client_cpu_s`: a client process's own figure."""
        r.wall_s = time.perf_counter() - self.wall
        r.server_cpu_s = process_cpu_seconds(self.server_pid) - self.server
        if self.envoy_pid:
            try:
                r.envoy_cpu_s = process_cpu_seconds(self.envoy_pid) - self.envoy
            except OSError:
                r.error = r.error or "Envoy exited during the phase"
        r.client_cpu_s = time.process_time() - self.me + other_client_cpu_s
        busy = machine_busy_seconds() - self.machine
        r.other_cpu_s = max(0.0, busy - r.server_cpu_s - r.envoy_cpu_s - r.client_cpu_s)


class Tracker:
    """Deliveries as the subscribers see them, for the current phase (as edge_clients.ts)."""

    def __init__(self, subscribers: int) -> None:
        self.n = subscribers
        self.counts: dict[int, int] = {}
        self.deliveries = 0
        self.frames = 0
        self.latencies: list[float] = []
        self.last = 0.0
        self.failed = ""
        self.expect = math.inf
        self.done = asyncio.Event()
        self.progress = asyncio.Event()  # a message reached every subscriber

    def reset(self) -> None:
        self.counts.clear()
        self.deliveries, self.frames, self.latencies, self.last = 0, 0, [], 0.0
        self.expect = math.inf
        self.done.clear()

    def fail(self, why: str) -> None:
        self.failed = self.failed or why
        self.done.set()
        self.progress.set()

    def frame(self, frame: rt.ServerFrame, now: float) -> None:
        kind = frame.WhichOneof("kind")
        if kind in ("error", "resync_required"):
            self.fail(f"a subscriber got {frame}")
            return
        if kind != "events":
            return
        counted = False
        for event in frame.events.events:
            if event.kind != rt.EVENT_KIND_MESSAGE_CREATED:
                continue
            if not counted:
                self.frames += 1
                counted = True
            text = event.message.text
            seq = int(text[:SEQ_DIGITS])
            sent = int(text[SEQ_DIGITS + 1 : SEQ_DIGITS + 1 + TIME_DIGITS]) / 1e6 + _EPOCH
            self.latencies.append(now - sent)
            self.deliveries += 1
            self.last = now
            got = self.counts.get(seq, 0) + 1
            if got >= self.n:
                self.counts.pop(seq, None)
                self.progress.set()
            else:
                self.counts[seq] = got
        if self.deliveries >= self.expect:
            self.done.set()


@dataclass
class CaseContext:
    path: str
    proc: ServerProcess
    server_pid: int
    envoy_pid: int | None
    web_port: int
    users: list[str]
    tokens: dict[str, str]
    thread: str
    size: int
