"""The TypeScript SDK end to end in Node, over real grpc-web through the Envoy edge to the real
server (tests/web_sdk/sdk_flow.ts): optimistic sends confirmed in place, typed errors from
rich status, offline queueing and resume by replay, and a stream outliving its token through
RefreshAuth. Needs `npm ci` (tsx, Connect-ES) and Envoy (in the `dev` and `web` extras)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
TSX = ROOT / "node_modules" / ".bin" / "tsx"
TOKEN_TTL_S = 15  # short, so the stream must refresh its token during the run

pytestmark = pytest.mark.timeout(300)


def test_typescript_sdk_against_the_real_server(tmp_path: Path, db_url: str) -> None:
    assert TSX.exists(), "node_modules missing: run npm ci"
    web_port = free_port()
    server = ServerProcess(
        tmp_path / "data",
        db_url,
        THREADLINE_WEB__MODE="on",
        THREADLINE_WEB__PORT=str(web_port),
        THREADLINE_AUTH__EMBEDDED_TOKEN_TTL_S=str(TOKEN_TTL_S),
    )
    server.start()
    try:
        run = subprocess.run(
            [str(TSX), str(ROOT / "tests" / "web_sdk" / "sdk_flow.ts")],
            cwd=ROOT,
            env={
                **os.environ,
                "HTTP_URL": f"http://127.0.0.1:{server.http_port}",
                "EDGE_URL": f"http://127.0.0.1:{web_port}",
                "TOKEN_TTL_S": str(TOKEN_TTL_S),
            },
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        server.stop()
    assert run.returncode == 0 and "PASS" in run.stdout, f"{run.stdout}\n{run.stderr}\n" + "".join(
        server.output[-30:]
    )
