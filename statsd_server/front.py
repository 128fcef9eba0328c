"""The HTTP front: routes stats queries to the owning shard and POSTed lines to the owners."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import uvloop
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from statsd_server import logs, metrics
from statsd_server.answer_cache import AnswerCache, AnswerSharing
from statsd_server.changes import ChangeCounters
from statsd_server.config import LISTEN_BACKLOG, Settings
from statsd_server.errors import ShardUnavailable
from statsd_server.idempotency import HEADER as IDEMPOTENCY_HEADER
from statsd_server.idempotency import IdempotencyKeys, key_problem
from statsd_server.ingest import Dispatcher, IngestSession
from statsd_server.line_rules import customer_id_problem
from statsd_server.memory import freeze_startup_objects
from statsd_server.messages import Codec, Ping, StatsQuery, StatsReply
from statsd_server.newest_day import NewestDay
from statsd_server.responses import answer_response, error_body, not_found
from statsd_server.responses import error_response as _error
from statsd_server.responses import json_response as _json
from statsd_server.routing import Router
from statsd_server.rpc import ShardClient, socket_path
from statsd_server.store import date_to_day
from statsd_server.summary import IngestSummary

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 10.0
PING_TIMEOUT = 2.0
# How long POSTs in flight may take to finish when the server stops.
DRAIN_GRACE = 10.0
# Then how long the other requests in flight may take (a query waits on a shard that is
# still up; an answer waits for a client to read it). aiohttp waits this up to twice per
# connection (for the handler, then for its task after cancelling the request), and its
# default, 60 s, is past the grace a container gets (docker-compose.yml) before all its
# processes are killed, unsnapshotted.
CLOSE_GRACE = 2.0
INGEST_CONTENT_TYPES = ("text/plain", "application/x-ndjson", "application/octet-stream")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

SETTINGS = web.AppKey("settings", Settings)
CLIENTS = web.AppKey("clients", list[ShardClient])
ROUTER = web.AppKey("router", Router)
NEWEST_DAY = web.AppKey("newest_day", NewestDay)
INGESTS = web.AppKey("ingests", set[asyncio.Task[object]])
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyKeys)
QUERY_LATENCY = web.AppKey("query_latency", metrics.QueryLatency)
ANSWER_CACHE = web.AppKey("answer_cache", AnswerCache)
ANSWER_SHARING = web.AppKey("answer_sharing", AnswerSharing)


class BadRequest(Exception):
    pass


def _parse_date(params: Mapping[str, str], name: str, required: bool) -> dt.date | None:
    raw = params.get(name)
    if raw is None and not required:
        return None
    if not raw and required:
        raise BadRequest(f"missing required query parameter '{name}' (YYYY-MM-DD)")
    assert raw is not None
    if not _DATE.fullmatch(raw):
        raise BadRequest(f"invalid '{name}': expected a date as YYYY-MM-DD, got {raw[:64]!r}")
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"invalid '{name}': {raw!r} is not a calendar date") from None


MAX_EXTRA_QUANTILES = 10
_QUANTILE = re.compile(r"0?\.[0-9]+")


def _parse_quantiles(raw: str | None) -> list[float]:
    """`?quantiles=0.9,0.999`: each in (0, 1), at most 10, duplicates dropped."""
    if raw is None:
        return []
    parts = raw.split(",")
    if len(parts) > MAX_EXTRA_QUANTILES:
        raise BadRequest(f"at most {MAX_EXTRA_QUANTILES} quantiles, got {len(parts)}")
    quantiles: list[float] = []
    for part in parts:
        text = part.strip()
        if not _QUANTILE.fullmatch(text) or not 0 < float(text) < 1:
            raise BadRequest(
                f"invalid quantile {text[:32]!r}: expected a number between 0 and 1 (exclusive)"
            )
        if float(text) not in quantiles:
            quantiles.append(float(text))
    return quantiles


async def stats(request: web.Request) -> web.StreamResponse:
    """GET /customers/{customer_id}/stats?from=YYYY-MM-DD[&to=YYYY-MM-DD]

    Reached only when the front's cache has no current answer (see _hits_before_routing).
    """
    started = time.perf_counter()
    app = request.app
    response = await _ask_shard(request, app[ANSWER_CACHE], request.raw_path)
    app[QUERY_LATENCY].observe(response.status, time.perf_counter() - started)
    return response


_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
_CACHED_METHODS = frozenset({"GET", "HEAD"})


def _hits_before_routing(app: web.Application, route: _Handler) -> _Handler:
    """The front's request handler: a GET or HEAD whose target is a current cached answer is
    answered at once; anything else goes to `route`, the application's own handler.

    Routing, match info and the application's handler chain cost a cache hit about as much
    again as the lookup itself. Only the stats handler puts answers in the cache, so a target
    found there routes to it, and its answer is written as the stats handler writes it
    (answer_response). What routing would add is skipped: aiohttp's handling of an `Expect`
    header (a hit sends no `100 Continue` and answers an unknown expectation instead of 417).
    """
    cache = app[ANSWER_CACHE]
    latency = app[QUERY_LATENCY]

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method in _CACHED_METHODS:
            started = time.perf_counter()
            cached = cache.get(request.raw_path)
            if cached is not None:
                status, body = cached
                latency.observe(status, time.perf_counter() - started, hit=True)
                return answer_response(request, status, body)
        return await route(request)

    return handle


async def _ask_shard(request: web.Request, cache: AnswerCache, target: str) -> web.StreamResponse:
    """The answer of a query the cache did not have (stored in it if it is 200 or 404)."""
    customer_id = request.match_info["customer_id"]
    problem = customer_id_problem(customer_id)
    if problem is not None:
        return _error(400, f"invalid customer id: {problem}")
    try:
        first = _parse_date(request.query, "from", required=True)
        last = _parse_date(request.query, "to", required=False)
        extra = _parse_quantiles(request.query.get("quantiles"))
    except BadRequest as exc:
        return _error(400, str(exc))
    assert first is not None
    if last is not None and last < first:
        return _error(400, f"'to' ({last}) is before 'from' ({first})")

    app = request.app
    router = app[ROUTER]
    place = router.place(customer_id)
    query = StatsQuery(
        customer_id, date_to_day(first), None if last is None else date_to_day(last), extra
    )
    stamp = cache.stamp(place)  # before asking: a change from here on shows in it
    try:
        reply = await app[CLIENTS][place % router.shards].request(query, QUERY_TIMEOUT)
    except ShardUnavailable as exc:
        return _error(503, str(exc))
    assert isinstance(reply, StatsReply), reply
    if reply.known:
        status, body = 200, reply.body
    else:
        status = 404
        body = error_body(f"unknown customer {customer_id!r} (never seen, or its data expired)")
    cache.put(target, stamp, status, body)
    sharing = app.get(ANSWER_SHARING)
    if sharing is not None:
        sharing.offer(target, stamp, status, body)
    return answer_response(request, status, body)


async def ingest(request: web.Request) -> web.Response:
    """POST /ingest: a body of text or JSON lines; answers with the ingest summary.

    With an Idempotency-Key header, a retry of the same body is answered with the first
    summary instead of being counted again.
    """
    if request.content_type not in INGEST_CONTENT_TYPES:
        return _error(
            415,
            f"unsupported Content-Type {request.content_type!r}; send lines as "
            + " or ".join(INGEST_CONTENT_TYPES),
        )
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return await _ingest(request, None)
    problem = key_problem(key)
    if problem is not None:
        return _error(400, problem)
    keys = request.app[IDEMPOTENCY]
    async with keys.claimed(key):
        stored = await keys.get(key)
        if stored is None:
            return await _ingest(request, key)
        digest = hashlib.sha256()
        idle = request.app[SETTINGS].idle_timeout
        try:
            while data := await asyncio.wait_for(request.content.read(1024 * 1024), idle):
                digest.update(data)
        except TimeoutError:
            return _error(408, f"idle timeout: no body data for {idle:g}s")
        if digest.hexdigest() != stored[0]:
            return _error(422, f"{IDEMPOTENCY_HEADER} {key[:64]!r} was used for another body")
        response = web.Response(body=stored[1], content_type="application/json")
        response.headers["Idempotent-Replayed"] = "true"
        return response


async def _ingest(request: web.Request, key: str | None) -> web.Response:
    app = request.app
    task = asyncio.current_task()
    assert task is not None
    app[INGESTS].add(task)
    session = IngestSession(
        app[ROUTER], Dispatcher(app[CLIENTS]), app[NEWEST_DAY], app[SETTINGS].retention_days
    )
    idle = app[SETTINGS].idle_timeout
    digest = hashlib.sha256()
    try:
        while True:
            try:
                data = await asyncio.wait_for(request.content.read(1024 * 1024), idle)
            except TimeoutError:
                # What arrived is applied, as for a client that disconnects mid-body.
                await session.abort()
                return _error(408, f"idle timeout: no body data for {idle:g}s")
            if not data:
                break
            digest.update(data)
            await session.feed(data)
        summary: IngestSummary = await session.finish()
        body = msgspec.json.encode(summary)
        if key is not None:
            await app[IDEMPOTENCY].put(key, digest.hexdigest(), body)
    except ShardUnavailable as exc:
        await session.abort()
        return _error(503, str(exc))
    finally:
        app[INGESTS].discard(task)
    return web.Response(body=body, content_type="application/json")


async def metrics_page(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format, every process's samples merged."""
    body, content_type = await asyncio.get_running_loop().run_in_executor(
        None, metrics.exposition, request.app[QUERY_LATENCY]
    )
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """200 when every shard answers a ping, else 503 naming the missing shards."""
    clients = request.app[CLIENTS]
    results = await asyncio.gather(
        *(c.request(Ping(), PING_TIMEOUT) for c in clients), return_exceptions=True
    )
    missing = [
        c.shard for c, r in zip(clients, results, strict=True) if isinstance(r, BaseException)
    ]
    if missing:
        names = ", ".join(str(s) for s in missing)
        return _error(503, f"shards not answering: {names}", missing_shards=missing)
    return _json({"status": "ready", "shards": len(clients)})


def _json_fallbacks(app: web.Application) -> None:
    """Answer 404 and 405 (with its Allow header) as JSON, like every other error.

    Routes, not a middleware: one costs every request (measured: 19.5k requests/s with one,
    16.0k without, on the development VM).
    """
    for resource in list(app.router.resources()):
        assert isinstance(resource, web.Resource)
        allow = ",".join(sorted({route.method for route in resource}))

        async def method_not_allowed(request: web.Request, allow: str = allow) -> web.Response:
            response = _error(405, "method not allowed", path=request.path[:256])
            response.headers["Allow"] = allow
            return response

        resource.add_route("*", method_not_allowed)

    async def no_route(request: web.Request) -> web.Response:
        return not_found(request)

    app.router.add_route("*", "/{path:.*}", no_route)


def create_app(settings: Settings, runtime_dir: Path, index: int = 0) -> web.Application:
    """The application of front number `index`; shard connections open and close with it."""
    app = web.Application()
    app[SETTINGS] = settings
    app[ROUTER] = Router(settings.shards)
    app[INGESTS] = set()
    app[QUERY_LATENCY] = metrics.QueryLatency(index)
    # Slots 0..shards-1 are the shards'; the fronts' follow.
    app[NEWEST_DAY] = NewestDay(runtime_dir / "newest_day", settings.shards + index)
    app[ANSWER_CACHE] = AnswerCache(
        ChangeCounters(runtime_dir / "changes", settings.shards),
        app[NEWEST_DAY],
        settings.answer_cache_mb * 2**20 // settings.fronts,
    )

    async def shard_clients(app: web.Application) -> AsyncIterator[None]:
        codec = Codec()
        app[CLIENTS] = [
            ShardClient(i, socket_path(runtime_dir, i), codec) for i in range(settings.shards)
        ]
        yield
        for client in app[CLIENTS]:
            await client.close()

    async def idempotency_keys(app: web.Application) -> AsyncIterator[None]:
        app[IDEMPOTENCY] = IdempotencyKeys(settings.data_dir, runtime_dir)
        await app[IDEMPOTENCY].open()
        yield
        await app[IDEMPOTENCY].close()

    async def answer_sharing(app: web.Application) -> AsyncIterator[None]:
        if settings.fronts < 2 or not app[ANSWER_CACHE].budget:
            yield
            return
        sharing = AnswerSharing(runtime_dir, index, settings.fronts, app[ANSWER_CACHE])
        sharing.start()
        app[ANSWER_SHARING] = sharing
        yield
        sharing.close()

    app.cleanup_ctx.append(shard_clients)
    app.cleanup_ctx.append(idempotency_keys)
    app.cleanup_ctx.append(answer_sharing)
    app.router.add_get("/customers/{customer_id:.+}/stats", stats)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_post("/ingest", ingest)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    # Imported here: the web package reads this module's limits for its OpenAPI spec.
    from statsd_server.web import add_routes as add_web_routes

    add_web_routes(app)
    _json_fallbacks(app)
    return app


def _quiet_client_protocol_errors(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed request (huge headers, bad request lines) at ERROR with a
    traceback, so one hostile client could flood the log. They are the client's errors, and
    it gets its 4xx: logged at debug only."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
    return True


def run(
    settings: Settings,
    http_sock: socket.socket,
    runtime_dir: Path,
    index: int,
    parent: Connection,
    restarted: bool = False,
) -> None:
    """Process entry point (spawned by the supervisor); stops on a message or EOF on `parent`."""
    if restarted:
        metrics.RESTARTS.labels(f"front-{index}").inc()
    # Only the supervisor acts on signals sent to the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(settings.log_level, f"front-{index}", settings.log_format)
    logging.getLogger("aiohttp.server").addFilter(_quiet_client_protocol_errors)
    uvloop.run(_serve(settings, http_sock, runtime_dir, index, parent))


async def _serve(
    settings: Settings, http_sock: socket.socket, runtime_dir: Path, index: int, parent: Connection
) -> None:
    app = create_app(settings, runtime_dir, index)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=CLOSE_GRACE)
    await runner.setup()
    assert runner.server is not None
    runner.server.request_handler = _hits_before_routing(app, runner.server.request_handler)
    site = web.SockSite(runner, http_sock, backlog=LISTEN_BACKLOG)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def parent_message() -> None:
        # "stop" from the supervisor, or EOF if it is gone: either way, stop.
        with contextlib.suppress(EOFError, OSError):
            parent.recv()
        loop.remove_reader(parent.fileno())
        stop.set()

    loop.add_reader(parent.fileno(), parent_message)
    log.info("pid %d: serving HTTP", os.getpid())
    freeze_startup_objects()
    parent.send(("ready", None))
    await stop.wait()
    # Stop listening, let POSTs in flight finish (their shards are still up), then close.
    # Open keep-alive connections may still start POSTs meanwhile: those are waited for too.
    await site.stop()
    ingests = app[INGESTS]
    deadline = loop.time() + DRAIN_GRACE
    while ingests and loop.time() < deadline:
        await asyncio.wait(set(ingests), timeout=deadline - loop.time())
    if ingests:
        log.warning("%d POST /ingest still open after %ss; closing", len(ingests), DRAIN_GRACE)
    await runner.cleanup()
