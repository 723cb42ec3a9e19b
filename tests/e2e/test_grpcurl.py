"""The real grpcurl binary against a real `threadline serve`: reflection, health, a thread."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import ServerProcess

# The wrapper installs the binary beside the interpreter: found with or without an activated venv.
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(*args: str) -> str:
    assert GRPCURL is not None
    out = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def proc(tmp_path, db_url):
    p = ServerProcess(tmp_path / "data", db_url, THREADLINE_AUTH__ADMIN_USERS='["ops"]')
    p.start()
    yield p
    p.stop()


def test_grpcurl_lists_checks_health_creates_and_lists(proc):
    services = grpcurl(proc.target, "list").split()
    assert {
        "threadline.v1.ThreadService",
        "threadline.v1.RealtimeService",
        "threadline.v1.UserService",
        "threadline.v1.UploadService",
        "threadline.v1.AdminService",
        "grpc.health.v1.Health",
    } <= set(services)
    health = json.loads(grpcurl(proc.target, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}

    tok = proc.cli("token", "alice")
    auth = ["-H", f"authorization: Bearer {tok}"]
    body = json.dumps({"thread": {"title": "from grpcurl", "participant_ids": ["bob"]}})
    created = json.loads(
        grpcurl(*auth, "-d", body, proc.target, "threadline.v1.ThreadService/CreateThread")
    )
    assert created["thread"]["participant_ids"] == ["alice", "bob"]
    listed = json.loads(grpcurl(*auth, proc.target, "threadline.v1.ThreadService/ListThreads"))
    assert [t["thread"]["id"] for t in listed["threads"]] == [created["thread"]["id"]]

    bad = subprocess.run(
        [GRPCURL, "-plaintext", proc.target, "threadline.v1.ThreadService/ListThreads"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0 and "Unauthenticated" in bad.stderr


def test_grpcurl_operator_views(proc):
    ops = ["-H", f"authorization: Bearer {proc.cli('token', 'ops')}"]
    listed = json.loads(grpcurl(*ops, proc.target, "threadline.v1.AdminService/ListConnections"))
    assert listed.get("connections", []) == []  # nobody streams yet
    usage = json.loads(grpcurl(*ops, proc.target, "threadline.v1.AdminService/GetIndexUsage"))
    assert usage["backend"] in ("sqlite", "postgresql")
    alice = ["-H", f"authorization: Bearer {proc.cli('token', 'alice')}"]
    refused = subprocess.run(
        [GRPCURL, "-plaintext", *alice, proc.target, "threadline.v1.AdminService/ListConnections"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0 and "PermissionDenied" in refused.stderr
