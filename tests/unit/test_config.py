"""Settings precedence: defaults < TOML file < THREADLINE_* environment."""

from __future__ import annotations

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
