"""Settings: built once at the entry point from env vars, `.env` and CLI flags.

This is the only module that reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from statsd_server.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# Connections the kernel queues before a process accepts them. The supervisor binds the
# sockets; the shards' and the front's servers listen() on them again with the same value
# (their libraries' defaults, 100 and 128, would shrink the queue).
LISTEN_BACKLOG = 1024


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _kll_k(raw: str) -> int:
    value = int(raw)
    if not 8 <= value <= 65535:
        raise ValueError("must be an integer 8-65535 (DataSketches' KLL range)")
    return value


def _req_k(raw: str) -> int:
    value = int(raw)
    if not (4 <= value <= 1024 and value % 2 == 0):
        raise ValueError("must be an even integer 4-1024 (DataSketches' REQ range)")
    return value


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _host(raw: str) -> str:
    if raw != "localhost":
        try:
            ipaddress.ip_address(raw)
        except ValueError:
            raise ValueError("must be an IP address or 'localhost'") from None
    return raw


def _log_level(raw: str) -> str:
    value = raw.lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return value


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("must not be empty")
    return Path(raw)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a server; field docs double as the README's settings table."""

    host: str = "127.0.0.1"
    http_port: int = 8080
    tcp_port: int = 9000
    shards: int = os.cpu_count() or 1
    fronts: int = os.cpu_count() or 1
    data_dir: Path = Path("./data")
    snapshot_interval: float = 5.0
    wal: bool = True
    retention_days: int = 30
    kll_k: int = 200
    req_k: int = 48
    max_customers: int = 1_000_000
    answer_cache_mb: int = 512
    idle_timeout: float = 300.0
    log_level: str = "info"
    log_format: str = "text"

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
        env_file: Path | None = Path(".env"),
    ) -> Settings:
        """Settings from CLI overrides, then the environment, then `.env`, then defaults.

        `overrides` maps env var names (`STATS_SHARDS`) to flag values; None means unset.
        """
        sources: dict[str, str] = {}
        if env_file is not None and env_file.is_file():
            sources.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        sources.update(os.environ if environ is None else environ)
        sources.update({k: v for k, v in (overrides or {}).items() if v is not None})

        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            if name not in sources:
                continue
            raw = sources[name].strip()
            try:
                values[f.name] = _PARSERS[f.name](raw)
            except ValueError as exc:
                reason = str(exc) if "must" in str(exc) else _EXPECTED[f.name]
                raise ConfigError(f"{name}={raw!r} is invalid: {reason}") from None
        return cls(**values)


def env_name(field_name: str) -> str:
    return "STATS_" + field_name.upper()


_PARSERS: dict[str, Callable[[str], Any]] = {
    "host": _host,
    "http_port": _port,
    "tcp_port": _port,
    "shards": _positive_int,
    "fronts": _positive_int,
    "data_dir": _path,
    "snapshot_interval": _positive_float,
    "wal": _bool,
    "retention_days": _non_negative_int,
    "kll_k": _kll_k,
    "req_k": _req_k,
    "max_customers": _non_negative_int,
    "answer_cache_mb": _non_negative_int,
    "idle_timeout": _positive_float,
    "log_level": _log_level,
    "log_format": _log_format,
}

_EXPECTED = {
    "http_port": "must be a port number 0-65535",
    "tcp_port": "must be a port number 0-65535",
    "shards": "must be a positive integer",
    "fronts": "must be a positive integer",
    "snapshot_interval": "must be a positive number of seconds",
    "retention_days": "must be a non-negative integer",
    "kll_k": "must be an integer 8-65535 (DataSketches' KLL range)",
    "req_k": "must be an even integer 4-1024 (DataSketches' REQ range)",
    "max_customers": "must be a non-negative integer",
    "answer_cache_mb": "must be a non-negative integer",
    "idle_timeout": "must be a positive number of seconds",
}

SETTING_HELP = {
    "host": "Address to listen on (HTTP and TCP).",
    "http_port": "HTTP port (stats queries, POST /ingest).",
    "tcp_port": "TCP port for newline-delimited log lines.",
    "shards": "Shard processes (default: CPU count).",
    "fronts": "HTTP front processes, sharing the HTTP port (default: CPU count).",
    "data_dir": "Directory of the SQLite snapshot file.",
    "snapshot_interval": "Seconds between snapshots of changed aggregates.",
    "wal": "Write-ahead log: accepted batches are fsynced before they are acknowledged.",
    "retention_days": "Days kept behind the newest day seen.",
    "kll_k": "Days with up to this many requests are kept exactly; KLL sketch size k beyond.",
    "req_k": "REQ sketch size k: accuracy of the median and tail of busy days.",
    "max_customers": "Customers held at most (0: no limit); lines of new ones beyond it are"
    " rejected as customer_limit.",
    "answer_cache_mb": "MiB of stats answers the fronts keep to answer again (split between"
    " them; 0: off).",
    "idle_timeout": "Seconds an ingest connection or POST body may send nothing before it is"
    " closed.",
    "log_level": "debug, info, warning or error.",
    "log_format": "text, or json for one JSON object per line.",
}
