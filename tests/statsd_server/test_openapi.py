"""/openapi.json: a valid OpenAPI 3.1 document that the real server's answers conform to.

Every endpoint and every documented error is asked for on a real server and its body checked
against the spec's schemas with jsonschema; then schemathesis fuzzes the API from the spec.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec

from statsd_server import changes, newest_day
from statsd_server.config import Settings
from statsd_server.front import create_app
from statsd_server.routing import shard_for
from statsd_server.web.openapi import openapi_spec
from tests.conftest import ROOT, Server

SPEC = openapi_spec()
STATS = "/customers/{customer_id}/stats"


def example(name: str) -> str:
    """The spec's example for a stats parameter (schemathesis's examples phase sends them)."""
    for param in SPEC["paths"][STATS]["get"]["parameters"]:
        if param["name"] == name:
            return str(param["example"])
    raise KeyError(name)


CUSTOMER = example("customer_id")
FIRST = dt.date.fromisoformat(example("from"))
LAST = dt.date.fromisoformat(example("to"))
BUSY_DAY = FIRST - dt.timedelta(days=1)
ODD_CUSTOMER = "tenant:7/prod"  # percent-encoded in the path


def line(day: dt.date, second: int, customer: str, status: int, millis: int) -> str:
    when = dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(seconds=second)
    return f"{when:%Y-%m-%d %H:%M:%S} {customer} /api/v1/x {status} {millis / 1000:.3f}\n"


def known_lines() -> tuple[str, int]:
    """Lines for the spec's example customer and days, a busy (sketched) day, an odd id."""
    rng = random.Random(7)
    statuses = [200, 201, 301, 400, 404, 500, 503]
    lines = [
        line(day, rng.randrange(86400), CUSTOMER, rng.choice(statuses), rng.randint(1, 3000))
        for day in (FIRST, LAST)
        for _ in range(25)
    ]
    in_example_range = len(lines)
    lines += [
        line(BUSY_DAY, i % 86400, "busy_api", rng.choice(statuses), int(rng.lognormvariate(5, 1)))
        for i in range(5000)
    ]
    lines.append(line(LAST, 60, ODD_CUSTOMER, 200, 120))
    return "".join(lines), in_example_range


def fetch(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; the status, lower-cased headers and raw body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def validate_body(schema: dict[str, Any], instance: Any) -> None:
    """Validate against a schema of the spec; its `#/components/...` refs resolve in SPEC."""
    root = {**schema, "components": SPEC["components"]}
    validator = jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(instance)


def assert_conforms(
    template: str, method: str, status: int, headers: dict[str, str], body: bytes
) -> Any:
    """The status and media type are documented for the operation, and the body fits."""
    responses = SPEC["paths"][template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {template}: undocumented status {status}"
    media = headers["content-type"].split(";")[0].strip()
    content = responses[str(status)].get("content", {})
    assert media in content, f"{method} {template} {status}: undocumented {media}"
    if media != "application/json":
        return body
    data = json.loads(body)
    validate_body(content[media]["schema"], data)
    return data


def stats_path(customer: str, query: str) -> str:
    return f"/customers/{urllib.parse.quote(customer, safe='')}/stats?{query}"


def test_spec_is_valid_openapi() -> None:
    """openapi-spec-validator accepts the document, and every operation has an id."""
    validate_spec(SPEC)  # raises on any error
    assert SPEC["openapi"].startswith("3.1")
    ids = [op["operationId"] for item in SPEC["paths"].values() for op in item.values()]
    assert len(set(ids)) == len(ids)


def test_every_route_is_documented(tmp_path: Path) -> None:
    """The paths and methods the front routes are exactly the spec's operations."""
    settings = Settings(shards=1)
    newest_day.create(tmp_path / "newest_day", settings.shards + 1)
    changes.create(tmp_path / "changes", settings.shards)
    app = create_app(settings, tmp_path)
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        # "*": the fallbacks answering 404 and 405 as JSON
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    documented = {(path, method) for path, item in SPEC["paths"].items() for method in item}
    assert routed == documented


def test_schemas_reject_what_the_server_must_not_send() -> None:
    """The schemas are strict: extra fields, wrong types and unknown reasons fail."""
    stats = SPEC["paths"][STATS]["get"]["responses"]["200"]["content"]["application/json"]
    good = stats["examples"]["readme"]["value"]
    validate_body(stats["schema"], good)
    bad_bodies = [
        {**good, "extra": 1},
        {**good, "to": "tomorrow"},
        {**good, "days": [{**good["days"][0], "total_requests": "5"}]},
        {**good, "days": [{k: v for k, v in good["days"][0].items() if k != "date"}]},
        {**good, "days": [{**good["days"][0], "uptime_pct": None}]},
        {**good, "summary": {**good["summary"], "quantile_error": {"median": 0.1}}},
    ]
    for bad in bad_bodies:
        with pytest.raises(jsonschema.ValidationError):
            validate_body(stats["schema"], bad)
    ingest = SPEC["paths"]["/ingest"]["post"]["responses"]["200"]["content"]["application/json"]
    with pytest.raises(jsonschema.ValidationError):
        validate_body(
            ingest["schema"], {"accepted": 1, "rejected": 1, "rejected_by_reason": {"odd": 1}}
        )


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    """A real server with `known_lines()` loaded, shared by the module's read-only tests.

    server_factory's Server, started once; with the number of lines in the example range.
    """
    server = Server(data_dir=tmp_path_factory.mktemp("openapi") / "data", shards=2).start()
    try:
        lines, in_range = known_lines()
        assert server.send_tcp(lines.encode())["accepted"] == lines.count("\n")
        yield server, in_range
    finally:
        server.stop()


def test_every_answer_and_error_conforms(loaded: tuple[Server, int]) -> None:
    """Real answers of every endpoint, and each documented 4xx, match the spec's schemas."""
    server, in_range = loaded

    ok_range = f"from={FIRST}&to={LAST}"
    empty_range = "from=2001-01-01&to=2001-01-02"  # the customer is known, no requests
    ingest_line = line(LAST, 99, "posted", 200, 5).encode()
    cases: list[tuple[str, str, str, int, bytes | None, dict[str, str]]] = [
        ("GET", STATS, stats_path(CUSTOMER, ok_range), 200, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, f"from={FIRST}"), 200, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, f"{ok_range}&quantiles=0.9,.999"), 200, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, empty_range), 200, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, f"{empty_range}&quantiles=0.5"), 200, None, {}),
        ("GET", STATS, stats_path("busy_api", f"from={BUSY_DAY}&quantiles=0.9"), 200, None, {}),
        ("GET", STATS, stats_path(ODD_CUSTOMER, ok_range), 200, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, ""), 400, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, "from="), 400, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, "from=2026-1-1"), 400, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, "from=2026-02-30"), 400, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, f"from={FIRST}&to="), 400, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, f"from={LAST}&to={FIRST}"), 400, None, {}),
        ("GET", STATS, stats_path(CUSTOMER, f"from={FIRST}&quantiles=1"), 400, None, {}),
        ("GET", STATS, stats_path("a b", f"from={FIRST}"), 400, None, {}),
        ("GET", STATS, stats_path("ü" * 65, f"from={FIRST}"), 400, None, {}),
        ("GET", STATS, stats_path("nobody", f"from={FIRST}"), 404, None, {}),
        ("POST", "/ingest", "/ingest", 200, ingest_line, {"Content-Type": "text/plain"}),
        ("POST", "/ingest", "/ingest", 200, b"x\n", {"Content-Type": "application/x-ndjson"}),
        ("POST", "/ingest", "/ingest", 200, b"", {"Content-Type": "application/octet-stream"}),
        ("POST", "/ingest", "/ingest", 415, b"{}", {"Content-Type": "application/json"}),
        ("GET", "/health", "/health", 200, None, {}),
        ("GET", "/ready", "/ready", 200, None, {}),
        ("GET", "/", "/", 200, None, {}),
        ("GET", "/docs", "/docs", 200, None, {}),
        ("GET", "/openapi.json", "/openapi.json", 200, None, {}),
        ("GET", "/static/{file}", "/static/app.js", 200, None, {}),
        ("GET", "/static/{file}", "/static/vendor/uplot-1.6.32/LICENSE", 200, None, {}),
        ("GET", "/static/{file}", "/static/nothing.js", 404, None, {}),
    ]
    answers: dict[tuple[str, int], Any] = {}  # the first answer for each path and status
    for method, template, path, expected, body, headers in cases:
        status, got_headers, raw = fetch(server, method, path, body, headers)
        assert status == expected, (method, path, status, raw[:300])
        answer = assert_conforms(template, method, status, got_headers, raw)
        answers.setdefault((path, status), answer)

    # The figures behind the shapes: the example range holds every line loaded for it.
    assert answers[stats_path(CUSTOMER, ok_range), 200]["summary"]["total_requests"] == in_range
    assert answers[stats_path(CUSTOMER, f"from={FIRST}"), 200]["to"] is None
    busy = answers[stats_path("busy_api", f"from={BUSY_DAY}&quantiles=0.9"), 200]
    assert busy["days"][0]["total_requests"] == 5000
    assert busy["summary"]["quantile_error"]["p50"] > 0  # a sketched day
    empty = answers[stats_path(CUSTOMER, f"{empty_range}&quantiles=0.5"), 200]
    assert empty["days"] == [] and empty["summary"]["quantiles_ms"] == {"p50": None}
    assert answers["/ingest", 200] == {"accepted": 1, "rejected": 0, "rejected_by_reason": {}}
    assert answers["/openapi.json", 200] == SPEC

    # No route matched: 404 and 405 still answer with the documented error body.
    error_schema = {"$ref": "#/components/schemas/Error"}
    for method, path, expected in (("GET", "/nowhere", 404), ("DELETE", "/health", 405)):
        status, got_headers, raw = fetch(server, method, path)
        assert status == expected and got_headers["content-type"].startswith("application/json")
        validate_body(error_schema, json.loads(raw))


# `quantiles` values and whether the handler takes them.
QUANTILES_CASES = [
    ("0.9", True),
    (".5", True),
    ("0.9,0.999", True),
    (",".join(["0.1"] * 10), True),
    ("0.000000000000001", True),
    (",".join(["0.1"] * 11), False),
    ("0", False),
    ("1", False),
    ("0.0", False),
    ("1.0", False),
    ("-0.5", False),
    ("1e-3", False),
    ("0.5,", False),
    ("", False),
    ("half", False),
]


@pytest.mark.parametrize(("quantiles", "valid"), QUANTILES_CASES)
def test_quantiles_pattern_is_the_handlers_rule(quantiles: str, valid: bool) -> None:
    """The spec's `quantiles` pattern accepts exactly what the handler accepts (table)."""
    param = next(p for p in SPEC["paths"][STATS]["get"]["parameters"] if p["name"] == "quantiles")
    assert (re.fullmatch(param["schema"]["pattern"], quantiles) is not None) == valid


def test_quantiles_table_matches_the_server(loaded: tuple[Server, int]) -> None:
    """The same table against the real server: 200 where the pattern matches, else 400."""
    server, _ = loaded
    for quantiles, valid in QUANTILES_CASES:
        query = f"from={FIRST}&quantiles={urllib.parse.quote(quantiles)}"
        status = fetch(server, "GET", stats_path(CUSTOMER, query))[0]
        assert status == (200 if valid else 400), quantiles


def shard_pids(server: Server) -> dict[int, int]:
    """Shard index -> pid of its latest start, from the server log."""
    pids = {}
    for m in re.finditer(r"\[shard-(\d+)\] statsd_server\.shard: pid (\d+):", server.log()):
        pids[int(m[1])] = int(m[2])
    return pids


@pytest.mark.slow
def test_unavailable_shard_answers_conform(server_factory: Any) -> None:
    """A frozen shard: its customers' stats and /ready answer 503 with documented bodies."""
    server: Server = server_factory(shards=2)
    customer = next(f"c{i}" for i in range(100) if shard_for(f"c{i}", 2) == 1)
    server.send_tcp(line(FIRST, 0, customer, 200, 10).encode())
    pid = shard_pids(server)[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        # The stats query waits out its 10 s timeout; /ready its 2 s one, meanwhile.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            stats = pool.submit(fetch, server, "GET", stats_path(customer, f"from={FIRST}"))
            ready = pool.submit(fetch, server, "GET", "/ready")
            for template, future in ((STATS, stats), ("/ready", ready)):
                status, headers, raw = future.result()
                assert status == 503, (template, raw)
                body = assert_conforms(template, "GET", status, headers, raw)
                assert "1" in body["error"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert json.loads(fetch(server, "GET", "/ready")[2])["status"] == "ready"


def test_405_names_the_allowed_methods(loaded: tuple[Server, int]) -> None:
    """A wrong method gets 405 with an Allow header (schemathesis's unsupported_method)."""
    server, _ = loaded
    status, headers, _ = fetch(server, "DELETE", "/health")
    assert status == 405 and "GET" in headers.get("allow", "")


def test_schemathesis_finds_no_failures(loaded: tuple[Server, int], tmp_path: Path) -> None:
    """schemathesis against the live server: no 5xx, every answer as documented.

    Its examples, coverage and fuzzing phases, with the checks for server errors, status
    codes, content types, headers and bodies, and that schema-violating input is rejected.

    Left out: `positive_data_acceptance` (it sends `to` before `from`, a rule JSON Schema can't state, and expects a 2xx).
    """
    server, _ = loaded
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"http://127.0.0.1:{server.http_port}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "30",
            "--workers",
            "2",
            "--generation-deterministic",
            "--request-timeout",
            "15",
            "--no-color",
        ],
        cwd=tmp_path,
        # Hypothesis's Unicode tables, cached between runs (seconds to rebuild).
        env={**os.environ, "HYPOTHESIS_STORAGE_DIRECTORY": str(ROOT / ".hypothesis")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # The one warning allowed: generated POSTs reuse Idempotency-Keys with other bodies, and
    # get the documented 422, which schemathesis reports as "mostly rejected". Any other
    # warning (or a second operation under it) fails.
    if "No issues found" not in result.stdout:
        warnings = result.stdout.split("Warnings:")[1].split("Test cases:")[0]
        assert warnings.strip().splitlines() == [
            "⚠️ Schema validation mismatch: 1 operation mostly rejected generated data"
        ], result.stdout[-4000:]
        assert "  - POST /ingest\n\n💡 Check your schema constraints" in result.stdout
