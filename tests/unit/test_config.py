"""Settings precedence: defaults < TOML file < THREADLINE_* environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from threadline_server.config import Settings, load_settings


def test_defaults_then_file_then_environment(tmp_path, monkeypatch):
    assert Settings().realtime.heartbeat_interval_s == 30.0
    config = tmp_path / "threadline.toml"
    config.write_text(
        "[realtime]\nheartbeat_interval_s = 15\nidle_timeout_s = 60\n"
        '[database]\nurl = "sqlite+aiosqlite:///from-file.db"\n'
    )
    monkeypatch.setenv("THREADLINE_CONFIG", str(config))
    from_file = Settings()
    assert from_file.realtime.heartbeat_interval_s == 15
    assert from_file.database_url == "sqlite+aiosqlite:///from-file.db"
    monkeypatch.setenv("THREADLINE_REALTIME__HEARTBEAT_INTERVAL_S", "5")
    both = load_settings(str(config))
    assert both.realtime.heartbeat_interval_s == 5  # environment wins
    assert both.realtime.idle_timeout_s == 60  # the file still applies where env is silent


def test_embedded_database_lives_in_the_data_dir(tmp_path):
    s = Settings(server={"data_dir": tmp_path})  # type: ignore[arg-type]
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / 'threadline.db'}"


def test_rate_budgets_ping_cap_and_metadata_limit_defaults_and_overrides(monkeypatch):
    s = Settings()
    budgets = {
        name: (getattr(s.limits, f"{name}_per_minute"), getattr(s.limits, f"{name}_burst"))
        for name in (
            "thread_writes",
            "participant_changes",
            "uploads",
            "read_markers",
            "typing",
            "refresh_auth",
            "preferences",
        )
    }
    assert budgets == {
        "thread_writes": (30, 10),
        "participant_changes": (60, 20),
        "uploads": (60, 20),
        "read_markers": (120, 60),
        "typing": (60, 10),
        "refresh_auth": (10, 5),
        "preferences": (30, 10),
    }
    assert s.limits.operations_per_minute == 60  # message sends keep their own budget
    assert s.realtime.max_pings_per_second == 2.0
    # 16 KiB of authorization plus the call's other headers always reach the application.
    assert s.server.max_metadata_bytes >= 16 * 1024 + 4096
    monkeypatch.setenv("THREADLINE_LIMITS__THREAD_WRITES_PER_MINUTE", "0")
    monkeypatch.setenv("THREADLINE_LIMITS__TYPING_BURST", "3")
    monkeypatch.setenv("THREADLINE_REALTIME__MAX_PINGS_PER_SECOND", "0.5")
    monkeypatch.setenv("THREADLINE_SERVER__MAX_METADATA_BYTES", "65536")
    env = Settings()
    assert env.limits.thread_writes_per_minute == 0 and env.limits.thread_writes_burst == 10
    assert env.limits.typing_burst == 3 and env.realtime.max_pings_per_second == 0.5
    assert env.server.max_metadata_bytes == 65536


@pytest.mark.parametrize(
    "sections",
    [
        {"limits": {"uploads_burst": 0}},  # a burst of none would refuse every call
        {"limits": {"typing_per_minute": -1}},
        {"realtime": {"max_pings_per_second": -2}},
        {"server": {"max_metadata_bytes": 100}},  # not even the call's own headers fit
    ],
)
def test_nonsensical_limits_are_refused_at_start(sections):
    with pytest.raises(ValidationError):
        Settings(**sections)
