"""Settings from env vars, .env and flags; invalid values name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from statsd_server.config import Settings
from statsd_server.errors import ConfigError


def test_defaults() -> None:
    """With nothing set, the documented defaults apply."""
    s = Settings.load(environ={}, env_file=None)
    assert (s.host, s.http_port, s.tcp_port) == ("127.0.0.1", 8080, 9000)
    assert (s.data_dir, s.snapshot_interval, s.retention_days, s.kll_k, s.log_level) == (
        Path("data"),
        5.0,
        30,
        200,
        "info",
    )
    assert s.shards >= 1


def test_flags_beat_env_beat_dotenv(tmp_path: Path) -> None:
    """A flag overrides the environment, which overrides .env."""
    env_file = tmp_path / ".env"
    env_file.write_text("STATS_SHARDS=5\nSTATS_KLL_K=100\nSTATS_RETENTION_DAYS=7\n")
    s = Settings.load(
        {"STATS_SHARDS": "3"},
        environ={"STATS_KLL_K": "300", "STATS_SHARDS": "4"},
        env_file=env_file,
    )
    assert (s.shards, s.kll_k, s.retention_days) == (3, 300, 7)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STATS_SHARDS", "0"),
        ("STATS_SHARDS", "two"),
        ("STATS_HTTP_PORT", "99999"),
        ("STATS_TCP_PORT", "-1"),
        ("STATS_SNAPSHOT_INTERVAL", "0"),
        ("STATS_SNAPSHOT_INTERVAL", "nan"),
        ("STATS_RETENTION_DAYS", "-3"),
        ("STATS_KLL_K", "7"),
        ("STATS_KLL_K", "1.5"),
        ("STATS_LOG_LEVEL", "verbose"),
        ("STATS_HOST", "not a host"),
        ("STATS_DATA_DIR", ""),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    """Each invalid value raises one line naming the variable and the value."""
    with pytest.raises(ConfigError) as exc:
        Settings.load(environ={name: value}, env_file=None)
    message = str(exc.value)
    assert message.startswith(f"{name}=") and "\n" not in message
