"""Edge bench report: Markdown table rows and edge ÷ native ratios from the results."""

from __future__ import annotations

import math

from bench._common import pct
from bench.edge_measure import Result


def quietest(runs: list[Result]) -> Result:
    """Of repeated runs, the one the rest of the machine disturbed least."""
    return min(runs, key=lambda r: r.other_cpu_s / (r.wall_s or 1.0))


def ms2(values: list[float]) -> str:
    return f"{pct(values, 0.5):.1f} / {pct(values, 0.99):.1f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def shares(r: Result) -> str:
    """The phase's CPU as shares of one core: server / Envoy / clients / the rest."""
    w = r.wall_s or 1.0
    return " / ".join(
        f"{v / w:.0%}" for v in (r.server_cpu_s, r.envoy_cpu_s, r.client_cpu_s, r.other_cpu_s)
    )


def row(label: str, r: Result) -> str:
    server, envoy = r.per_delivery_us(r.server_cpu_s), r.per_delivery_us(r.envoy_cpu_s)
    return (
        f"| {label} | {r.deliveries_per_s:,.0f} | {r.msgs_per_s:,.0f} | {r.events_per_frame:.1f} "
        f"| {ms2(r.ack)} | {ms2(r.deliver)} | {server:.1f} | {envoy:.1f} | {server + envoy:.1f} "
        f"| {r.per_delivery_us(r.client_cpu_s):.1f} | {shares(r)} |"
    )


def ratios(edge: Result, native: Result) -> dict[str, float]:
    """edge ÷ native; every figure is a cost (above 1: the edge is worse), so throughput is
    inverted: native deliveries/s ÷ edge deliveries/s."""
    e_cpu = edge.per_delivery_us(edge.server_cpu_s + edge.envoy_cpu_s)
    n_cpu = native.per_delivery_us(native.server_cpu_s + native.envoy_cpu_s)
    return {
        "throughput_cost": ratio(native.deliveries_per_s, edge.deliveries_per_s),
        "p50": ratio(pct(edge.deliver, 0.5), pct(native.deliver, 0.5)),
        "p99": ratio(pct(edge.deliver, 0.99), pct(native.deliver, 0.99)),
        "server_cpu_per_delivery": ratio(
            edge.per_delivery_us(edge.server_cpu_s), native.per_delivery_us(native.server_cpu_s)
        ),
        "server_plus_envoy_cpu_per_delivery": ratio(e_cpu, n_cpu),
    }


PING_LABELS = {
    "native": "native Connect stream Ping (grpc.aio)",
    "native-sub": "native unary Submit{ping} (grpc.aio)",
    "edge": "edge grpc-web Submit{ping} (Connect-ES, Node)",
}


def ping_row(label: str, r: Result) -> str:
    rate = r.messages / r.acked_s if r.acked_s else 0.0
    return (
        f"| {label} | {rate:,.0f} | {ms2(r.ack)} | {r.per_message_us(r.server_cpu_s):.0f} "
        f"| {r.per_message_us(r.envoy_cpu_s):.0f} | {r.per_message_us(r.client_cpu_s):.0f} "
        f"| {shares(r)} |"
    )


def ping_ratios(edge: Result, native: Result) -> dict[str, float]:
    return {
        "p50": ratio(pct(edge.ack, 0.5), pct(native.ack, 0.5)),
        "p99": ratio(pct(edge.ack, 0.99), pct(native.ack, 0.99)),
        "server_cpu_per_ping": ratio(
            edge.per_message_us(edge.server_cpu_s), native.per_message_us(native.server_cpu_s)
        ),
        "server_plus_envoy_cpu_per_ping": ratio(
            edge.per_message_us(edge.server_cpu_s + edge.envoy_cpu_s),
            native.per_message_us(native.server_cpu_s + native.envoy_cpu_s),
        ),
    }


def ratio_row(label: str, rs_: dict[str, float]) -> str:
    cells = " | ".join(f"{v:.2f}" for v in rs_.values())
    verdict = "yes" if max(rs_.values()) <= 1.5 else "no"
    return f"| {label} | {cells} | {verdict} |"
