"""gen/ (Python, TypeScript and the built web app) must be exactly what .ci/gen produces from
protos/ and clients/web (stale generated code fails here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path):
    out = tmp_path / "gen"
    # The interpreter running the tests (and the protoc plugins beside it) generate the code,
    # whether or not its venv is activated: `.venv/bin/pytest` from a bare shell must work.
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }
    gen = subprocess.run(
        [str(ROOT / ".ci" / "gen"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert gen.returncode == 0, (
        f".ci/gen exited {gen.returncode}\nstdout:\n{gen.stdout}\nstderr:\n{gen.stderr}"
    )
    for language in ("python", "ts", "web"):
        committed, fresh = _tree(ROOT / "gen" / language), _tree(out / language)
        assert fresh, f".ci/gen wrote no {language} code"
        assert sorted(committed) == sorted(fresh), (
            f"gen/{language} has missing or extra files: run .ci/gen"
        )
        stale = [name for name in fresh if committed[name] != fresh[name]]
        assert not stale, f"stale generated files in gen/{language} (run .ci/gen): {stale}"
