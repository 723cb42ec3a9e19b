"""The SDK builds as its own sdist and wheel, with the generated code and without the server,
and both install into a clean venv (no system site-packages, no index) and import."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
# What a clean venv needs from outside: the SDK's dependencies, and the build backend pip
# installs to turn the sdist into a wheel. The versions this venv runs, so the check is offline
# from pip's cache after the first download.
OUTSIDE = ("grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "hatchling")


def _run(*args: str, cwd: Path | None = None) -> None:
    # PYTHONPATH would let a "clean" venv import the work tree instead of what it installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _wheel(source: Path, out: Path) -> Path:
    _run(
        *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
        *("-w", str(out), str(source)),
    )
    [wheel] = out.glob("threadline_client-*.whl")
    return wheel


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, built as `python -m build --sdist` does: the backend's build_sdist hook."""
    out = tmp_path_factory.mktemp("sdist")
    hook = "import sys, hatchling.build as backend; backend.build_sdist(sys.argv[1])"
    _run(sys.executable, "-c", hook, str(out), cwd=CLIENT)
    [path] = out.glob("threadline_client-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel_from_sdist(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build` makes: built inside the unpacked sdist, far from gen/."""
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as archive:
        # The "data" filter (no links out, no absolute paths) exists from Python 3.11.4 on
        # (Debian 12 ships 3.11.2); there, our own freshly built sdist is extracted as it is.
        if hasattr(tarfile, "data_filter"):
            archive.extractall(unpacked, filter="data")
        else:
            archive.extractall(unpacked)  # noqa: S202
    [source] = unpacked.iterdir()
    return _wheel(source, tmp_path_factory.mktemp("wheel_from_sdist"))


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    pins = [f"{name}=={version(name)}" for name in OUTSIDE]
    _run(
        sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(out), *pins
    )
    return out


def _wheel_names(wheel: Path) -> list[str]:
    return sorted(zipfile.ZipFile(wheel).namelist())


def test_client_wheel_contents(tmp_path):
    wheel = _wheel(CLIENT, tmp_path)
    names = _wheel_names(wheel)
    assert "threadline_client/client.py" in names
    assert "threadline/v1/realtime_service_pb2_grpc.py" in names
    assert not any(n.startswith("threadline_server") for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist")]
    assert not any(
        dep in " ".join(requires).lower() for dep in ("sqlalchemy", "asyncpg", "google-cloud")
    )
    assert "# Threadline Python SDK" in text  # clients/python/README.md is the long description


def test_sdist_carries_the_generated_code(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    generated = {p.relative_to(ROOT / "gen" / "python").as_posix() for p in _generated()}
    assert generated <= names
    assert {"pyproject.toml", "hatch_build.py", "README.md", "threadline_client/client.py"} <= names
    assert not any(n.startswith("threadline_server") for n in names)


def test_wheel_from_the_sdist_equals_the_wheel_from_the_tree(
    wheel_from_sdist: Path, tmp_path: Path
) -> None:
    assert _wheel_names(wheel_from_sdist) == _wheel_names(_wheel(CLIENT, tmp_path))


@pytest.mark.parametrize("artifact", ["sdist", "wheel_from_sdist"])
def test_installs_into_a_clean_venv_and_imports(
    artifact: str, request: pytest.FixtureRequest, wheelhouse: Path, tmp_path: Path
) -> None:
    package: Path = request.getfixturevalue(artifact)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    _run(
        *(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index"),
        *("--find-links", str(wheelhouse), str(package)),
    )
    check = (
        "import sys, threadline_client, threadline.v1.realtime_pb2 as rt\n"
        "from threadline_client import ThreadlineClient\n"
        "from threadline.v1 import realtime_pb2\n"
        f"assert threadline_client.__file__.startswith({str(env_dir)!r}), threadline_client\n"
        f"assert rt.__file__.startswith({str(env_dir)!r}), rt.__file__\n"
        "assert not [m for m in sys.modules if m.startswith(('threadline_server', 'sqlalchemy'))]\n"
        "realtime_pb2.ClientFrame(ping=realtime_pb2.Ping())\n"
    )
    _run(str(python), "-c", check, cwd=tmp_path)


def _generated() -> list[Path]:
    return [
        p
        for p in (ROOT / "gen" / "python" / "threadline").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
