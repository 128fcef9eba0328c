"""The `statsd-server` command: builds Settings and calls the same functions a Python user would."""

from __future__ import annotations

import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import msgspec

from statsd_server import __version__
from statsd_server.config import SETTING_HELP, Settings, env_name
from statsd_server.errors import ConfigError, StatsServerError
from statsd_server.loader import default_connections, load_files

F = Callable[..., Any]

# Help for the client commands (`load`, `stats`), which talk to a server instead of being one.
CLIENT_HELP = {
    "host": "Address of the server (0.0.0.0 and :: mean this machine).",
    "http_port": "The server's HTTP port.",
    "tcp_port": "The server's TCP port for log lines.",
}
QUERY_TIMEOUT = 30.0  # seconds; the front answers 503 itself well before that


class QueryError(StatsServerError):
    """A stats query the server refused, or a server that could not be reached."""


def _setting_options(
    names: tuple[str, ...], help_for: Mapping[str, str] = SETTING_HELP
) -> Callable[[F], F]:
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
                help=f"{help_for[name]} [env {env_name(name)}; default {default}]",
            )(f)
        return f

    return decorate


def _settings(flags: dict[str, str | None]) -> Settings:
    try:
        return Settings.load({env_name(k): v for k, v in flags.items()})
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _client_host(settings: Settings) -> str:
    """Where a client on this machine reaches a server listening on settings.host."""
    return "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Run 'statsd-server COMMAND --help' for a command's options, env vars and defaults.",
)
@click.version_option(__version__, prog_name="statsd-server")
def main() -> None:
    """A sharded, in-memory stats server for API request logs."""


@main.command(short_help="Run the server: shard processes, HTTP front, TCP ingest.")
@_setting_options(tuple(SETTING_HELP))
@click.option(
    "--load",
    "load",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Load this log file once the server is up (repeatable).  [default: none]",
)
def serve(load: tuple[Path, ...], **flags: str | None) -> None:
    """Start the supervisor, the shard processes and the HTTP front."""
    from statsd_server.logs import configure
    from statsd_server.supervisor import Supervisor

    settings = _settings(flags)
    configure(settings.log_level, "supervisor", settings.log_format)
    try:
        code = Supervisor(settings, load).run()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 2
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    sys.exit(code)


@main.command(short_help="Send log files to a running server over TCP.")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_setting_options(("host", "tcp_port"), CLIENT_HELP)
@click.option(
    "--connections",
    type=click.IntRange(1, 256),
    metavar="INT",
    default=default_connections(),
    show_default=True,
    help="Parallel TCP connections (8 per CPU).",
)
def load(files: tuple[Path, ...], connections: int, **flags: str | None) -> None:
    """Send log files to a running server; print its summary as one JSON line.

    On a terminal, a progress bar on stderr shows the bytes and lines sent, their rates and
    the time left.
    """
    settings = _settings(flags)
    try:
        summary = load_files(_client_host(settings), settings.tcp_port, files, connections)
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(msgspec.json.encode(summary).decode())


class DayStats(msgspec.Struct):
    """One day of a stats answer, or its summary (no date); the fields the table shows."""

    total_requests: int
    successful_requests: int
    failed_requests: int
    uptime_pct: float | None
    avg_latency_ms: float | None
    median_latency_ms: float | None
    p99_latency_ms: float | None
    quantile_error: dict[str, float | None] = {}
    date: str | None = None


class StatsAnswer(msgspec.Struct):
    """GET /customers/{id}/stats, as the server sends it."""

    customer_id: str
    first: str = msgspec.field(name="from")
    last: str | None = msgspec.field(name="to")
    days: list[DayStats]
    summary: DayStats


def fetch_stats(
    host: str, port: int, customer_id: str, first: str, last: str | None = None
) -> StatsAnswer:
    """Ask a running server for a customer's stats; QueryError with its message on any error."""
    query = {"from": first} if last is None else {"from": first, "to": last}
    url_host = f"[{host}]" if ":" in host else host
    url = (
        f"http://{url_host}:{port}/customers/{urllib.parse.quote(customer_id, safe='')}/stats?"
        + urllib.parse.urlencode(query)
    )
    try:
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        try:
            message = str(msgspec.json.decode(exc.read())["error"])
        except (msgspec.DecodeError, KeyError, TypeError, OSError):
            message = exc.reason
        raise QueryError(f"{message} (HTTP {exc.code})") from None
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        raise QueryError(f"cannot connect to {host}:{port}: {reason}") from None
    except OSError as exc:  # a timeout or reset while reading the answer
        raise QueryError(f"no answer from {host}:{port}: {exc}") from None
    try:
        return msgspec.json.decode(body, type=StatsAnswer)
    except msgspec.DecodeError as exc:
        raise QueryError(f"unexpected answer from {host}:{port}: {exc}") from None


COLUMNS = ("date", "requests", "successful", "failed", "uptime %", "avg ms", "p50 ms", "p99 ms")


def _latency(value: float | None, error: float | None) -> str:
    if value is None:
        return "-"
    return ("~" if error else "") + f"{value:,.1f}"


def _row(label: str, s: DayStats) -> list[str]:
    return [
        label,
        f"{s.total_requests:,}",
        f"{s.successful_requests:,}",
        f"{s.failed_requests:,}",
        "-" if s.uptime_pct is None else f"{s.uptime_pct:.2f}",
        _latency(s.avg_latency_ms, None),
        _latency(s.median_latency_ms, s.quantile_error.get("p50")),
        _latency(s.p99_latency_ms, s.quantile_error.get("p99")),
    ]


def render_stats(answer: StatsAnswer) -> str:
    """A plain-text table: one row per day, a rule, then the total over the range."""
    last = answer.last or "the newest day"
    lines = [f"customer {answer.customer_id}, {answer.first} to {last} (UTC days)", ""]
    rows = [list(COLUMNS), *(_row(d.date or "?", d) for d in answer.days)]
    total = _row("total", answer.summary)
    widths = [max(len(r[i]) for r in [*rows, total]) for i in range(len(COLUMNS))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines += [fmt(r) for r in rows]
    if not answer.days:
        lines.append("(no requests in this range)")
    lines += [fmt(["-" * w for w in widths]), fmt(total)]
    errors: dict[str, float] = {}
    for s in [*answer.days, answer.summary]:
        for q, e in s.quantile_error.items():
            if e and q in ("p50", "p99"):
                errors[q] = max(errors.get(q, 0.0), e)
    if errors:
        bounds = ", ".join(f"{q} ±{100 * e:.2f}%" for q, e in sorted(errors.items()))
        lines += ["", f"~ estimated from sketches; the server's stated error bound: {bounds}"]
    return "\n".join(lines)


@main.command(short_help="Print a customer's daily stats from a running server as a table.")
@click.argument("customer_id", metavar="CUSTOMER")
@click.option("--from", "first", required=True, metavar="YYYY-MM-DD", help="First day (UTC).")
@click.option(
    "--to",
    "last",
    metavar="YYYY-MM-DD",
    default=None,
    help="Last day (UTC), inclusive.  [default: the newest day]",
)
@_setting_options(("host", "http_port"), CLIENT_HELP)
def stats(customer_id: str, first: str, last: str | None, **flags: str | None) -> None:
    """Print a customer's requests, uptime and latency per day, and the total, as a table.

    The server checks the dates; its error (bad date, unknown customer, shard unavailable) or
    a failed connection is printed on one line, with exit status 1.
    """
    settings = _settings(flags)
    try:
        answer = fetch_stats(_client_host(settings), settings.http_port, customer_id, first, last)
    except StatsServerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(render_stats(answer))
