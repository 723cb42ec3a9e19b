"""The TypeScript SDK's npm package is usable on its own: `npm pack` builds it, the tarball holds
the compiled SDK with the generated code it imports (and no sources or tests), and Node imports
it from outside the repository with only its declared dependencies beside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NPM = shutil.which("npm")

pytestmark = pytest.mark.timeout(300)


@pytest.mark.skipif(NPM is None, reason="npm is not installed")
def test_the_sdk_package_installs_and_imports_outside_the_repo(tmp_path: Path) -> None:
    assert NPM is not None
    packed = subprocess.run(
        [NPM, "pack", "--json", "--pack-destination", str(tmp_path), "-w", "@threadline/client"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert packed.returncode == 0, packed.stderr
    [info] = json.loads(packed.stdout)
    names = {f["path"] for f in info["files"]}
    assert "dist/clients/web/src/index.js" in names
    assert "dist/clients/web/src/index.d.ts" in names
    assert "dist/gen/ts/threadline/v1/realtime_pb.js" in names
    assert "dist/gen/ts/google/rpc/error_details_pb.js" in names
    assert not [n for n in names if n.endswith(".ts") and not n.endswith(".d.ts")], names
    assert not [n for n in names if "/test/" in n or "/app/" in n], names

    app = tmp_path / "consumer"
    target = app / "node_modules" / "@threadline" / "client"
    target.mkdir(parents=True)
    with tarfile.open(tmp_path / info["filename"]) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None
            dest = target / Path(member.name).relative_to("package")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(source.read())
    manifest = json.loads((target / "package.json").read_text())
    for dependency in manifest["dependencies"]:
        link = app / "node_modules" / dependency
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / "node_modules" / dependency, target_is_directory=True)
    script = (
        'import { ThreadlineClient, ClientStore, ThreadlineError } from "@threadline/client";'
        'const c = new ThreadlineClient({ baseUrl: "http://127.0.0.1:1", token: "t" });'
        'const s = new ClientStore({ userId: "alice" });'
        's.queueSend("t1", "hi", { opId: "o1" });'
        "console.log(typeof c.threads.listThreads, s.state.messages.pending.length,"
        ' new ThreadlineError("NOT_FOUND", "x").code);'
    )
    run = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["function", "1", "NOT_FOUND"]
