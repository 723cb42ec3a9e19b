"""The SDK imports without server dependencies (import-linter cannot see `google.cloud`)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN_PREFIXES = ("threadline_server", "sqlalchemy", "asyncpg", "aiosqlite", "google.cloud")

_PROBE = """
import json, sys
import threadline_client
import threadline_client.auth, threadline_client.backoff, threadline_client.channel
import threadline_client.client, threadline_client.ids
import threadline_client.errors, threadline_client.stream
print(json.dumps(sorted(sys.modules)))
"""


def _is_forbidden(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in FORBIDDEN_PREFIXES)


def test_sdk_import_pulls_no_server_dependencies() -> None:
    # A fresh interpreter: this test process may already have imported the server.
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    modules = json.loads(done.stdout)
    assert "threadline_client.stream" in modules  # the probe really imported the SDK
    assert [m for m in modules if _is_forbidden(m)] == []


def test_forbidden_prefix_check_catches_submodules() -> None:
    assert _is_forbidden("google.cloud.storage")
    assert _is_forbidden("sqlalchemy")
    assert not _is_forbidden("google.protobuf")
    assert not _is_forbidden("sqlalchemyx")
