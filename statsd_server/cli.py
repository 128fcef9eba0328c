"""The `statsd-server` command: builds Settings and calls the same functions a Python user would."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from statsd_server import __version__
from statsd_server.config import SETTING_HELP, Settings, env_name
from statsd_server.errors import ConfigError, StatsServerError
from statsd_server.loader import default_connections, load_files

F = Callable[..., Any]


def _setting_options(names: tuple[str, ...]) -> Callable[[F], F]:
    """One --flag per setting, named after it, documented with its env var and default."""

    def decorate(f: F) -> F:
        defaults = Settings()
        for name in reversed(names):
            flag = "--" + name.replace("_", "-")
            default = getattr(defaults, name)
            f = click.option(
                flag,
                name,
                type=str,
                default=None,
                metavar=type(default).__name__.upper().replace("POSIXPATH", "PATH"),
                help=f"{SETTING_HELP[name]} [env {env_name(name)}; default {default}]",
            )(f)
        return f

    return decorate


def _settings(flags: dict[str, str | None]) -> Settings:
    try:
        return Settings.load({env_name(k): v for k, v in flags.items()})
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="statsd-server")
def main() -> None:
    """A sharded, in-memory stats server for API request logs."""


@main.command()
@_setting_options(tuple(SETTING_HELP))
@click.option(
    "--load",
    "load",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Load this log file once the server is up (repeatable).",
)
def serve(load: tuple[Path, ...], **flags: str | None) -> None:
    """Start the supervisor, the shard processes and the HTTP front."""
    from statsd_server.logs import configure
    from statsd_server.supervisor import Supervisor

    settings = _settings(flags)
    configure(settings.log_level, "supervisor")
    try:
        code = Supervisor(settings, load).run()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 2
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    sys.exit(code)


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_setting_options(("host", "tcp_port"))
@click.option(
    "--connections",
    type=click.IntRange(1, 256),
    default=None,
    help=f"Parallel TCP connections [default: {default_connections()}].",
)
def load(files: tuple[Path, ...], connections: int | None, **flags: str | None) -> None:
    """Send log files to a running server; print its summary as one JSON line."""
    settings = _settings(flags)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        summary = load_files(host, settings.tcp_port, files, connections)
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(msgspec.json.encode(summary).decode())
