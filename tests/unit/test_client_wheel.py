"""The SDK builds as its own wheel with the generated code and without the server."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_client_wheel_contents(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT / "clients" / "python"),
        ],
        check=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("threadline_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "threadline_client/client.py" in names
    assert "threadline/v1/realtime_service_pb2_grpc.py" in names
    assert not any(n.startswith("threadline_server") for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist")
    ]
    assert not any(
        dep in " ".join(requires).lower() for dep in ("sqlalchemy", "asyncpg", "google-cloud")
    )
