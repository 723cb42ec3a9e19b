"""Two users chat in real Chromium through the web app, the grpc-web edge and the real server
(tests/browser/chat.ts drives the browser; this test owns the server and restarts the edge and
the server when the script asks). Needs Debian's chromium and `npm ci` (playwright-core, tsx).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
TSX = ROOT / "node_modules" / ".bin" / "tsx"

pytestmark = pytest.mark.timeout(600)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The fields after the command name (which may hold spaces) start at the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _envoy_pid(server: ServerProcess) -> int:
    assert server.proc is not None
    for pid in _children(server.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # a short-lived child gone between the listing and this read
            continue
        if "envoy" in cmdline:
            return pid
    raise AssertionError("no envoy child of the server")


def _wait_for_new_envoy(server: ServerProcess, old: int) -> None:
    for _ in range(600):  # bounded by the test's timeout, not a speed assumption
        try:
            if _envoy_pid(server) != old:
                return
        except AssertionError:
            pass
        time.sleep(0.1)
    raise AssertionError("the supervisor did not restart envoy")


# Skipped on a machine without Debian's chromium; CI installs it and sets REQUIRE_CHROMIUM=1,
# so there a missing browser fails instead of passing silently.
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("REQUIRE_CHROMIUM"),
    reason="Debian chromium is not installed (apt-get install chromium)",
)
def test_two_users_chat_in_chromium(tmp_path: Path, db_url: str) -> None:
    assert (ROOT / "gen" / "web" / "index.html").exists(), "gen/web missing: run .ci/gen"
    assert TSX.exists(), "node_modules missing: run npm ci"
    web_port = free_port()
    server = ServerProcess(
        tmp_path / "data",
        db_url,
        THREADLINE_WEB__MODE="on",
        THREADLINE_WEB__PORT=str(web_port),
        THREADLINE_WEB__RESTART_MAX_BACKOFF_S="0.5",
    )
    server.start()
    script = subprocess.Popen(
        [str(TSX), str(ROOT / "tests" / "browser" / "chat.ts")],
        cwd=ROOT,
        env={
            **os.environ,
            "APP_URL": f"http://127.0.0.1:{server.http_port}/",
            "SCREENSHOT_DIR": str(tmp_path / "screenshots"),
            "WORK_DIR": str(tmp_path),
        },
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    (tmp_path / "screenshots").mkdir()
    assert script.stdin is not None and script.stdout is not None
    passed = False
    try:
        for line in script.stdout:
            line = line.strip()
            if line == "PASS":
                passed = True
            if not line.startswith("CONTROL "):
                continue
            action = line.removeprefix("CONTROL ")
            if action == "restart-edge":
                old = _envoy_pid(server)
                os.kill(old, signal.SIGKILL)
                _wait_for_new_envoy(server, old)
            elif action == "stop-server":
                server.terminate()
            elif action == "start-server":
                server.start()
            else:
                raise AssertionError(f"unknown control {action}")
            script.stdin.write("OK\n")
            script.stdin.flush()
        code = script.wait(60)
        errors = script.stderr.read() if script.stderr else ""
        assert code == 0 and passed, f"browser run failed ({code}):\n{errors}\n" + "".join(
            server.output[-40:]
        )
        # BROWSER_SCREENSHOTS=docs/screenshots refreshes the README's pictures.
        keep = os.environ.get("BROWSER_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for shot in sorted((tmp_path / "screenshots").glob("*.png")):
                (Path(keep) / shot.name).write_bytes(shot.read_bytes())
    finally:
        if script.poll() is None:
            script.kill()
            script.wait(10)
        for pipe in (script.stdin, script.stdout, script.stderr):
            if pipe is not None:
                pipe.close()
        server.stop()
