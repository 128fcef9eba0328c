"""The OpenAPI 3.1 description of the HTTP API, served as `/openapi.json`.

Built from the limits the handlers enforce (content types, quantile count, id size,
rejection reasons), so the two cannot drift apart; `tests/statsd_server/test_openapi.py`
checks real responses against it.
"""

from __future__ import annotations

from typing import Any

from statsd_server.front import INGEST_CONTENT_TYPES, MAX_EXTRA_QUANTILES
from statsd_server.line_rules import MAX_CUSTOMER_ID_BYTES, REASONS

JSON = "application/json"
HTML = "text/html"
# Names of the quantiles in `quantile_error` and `quantiles_ms`: p50, p99, p90, p99.9, ...
QUANTILE_NAME = r"^p[0-9]{1,2}(\.[0-9]+)?$"
# A decimal strictly between 0 and 1, also as a float: a non-zero digit, at most 15
# significant ones (the handler takes a few more forms: spaces, 16 nines).
_QUANTILE = r"0?\.(0{0,14}[1-9][0-9]{0,14})"
QUANTILES_PARAM = rf"^{_QUANTILE}(,{_QUANTILE}){{0,{MAX_EXTRA_QUANTILES - 1}}}$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: str, **examples: object) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": _ref(schema)}
    if examples:
        content["examples"] = {name: {"value": value} for name, value in examples.items()}
    return {"description": description, "content": {JSON: content}}


def _figures(nullable: bool) -> dict[str, Any]:
    """The fields shared by a day and a range summary."""
    number: dict[str, Any] = {"type": ["number", "null"] if nullable else "number"}
    null_note = " `null` when there are no requests." if nullable else ""
    count = {"type": "integer", "minimum": 0}
    return {
        "total_requests": {**count, "description": "Requests in the day or range."},
        "successful_requests": {**count, "description": "Status < 400."},
        "failed_requests": {**count, "description": "Status >= 400."},
        "client_errors": {**count, "description": "Status 4xx."},
        "server_errors": {**count, "description": "Status 5xx."},
        "uptime_pct": {
            **number,
            "minimum": 0,
            "maximum": 100,
            "description": "100 x (total - server_errors) / total, 3 decimals." + null_note,
        },
        "avg_latency_ms": {
            **number,
            "minimum": 0,
            "description": "Exact mean duration in ms, 3 decimals." + null_note,
        },
        "median_latency_ms": {
            **number,
            "minimum": 0,
            "description": "Nearest-rank p50 in ms (exact, or from sketches for busy days)."
            + null_note,
        },
        "p99_latency_ms": {
            **number,
            "minimum": 0,
            "description": "Nearest-rank p99 in ms." + null_note,
        },
        "quantile_error": {
            "type": "object",
            "description": "Bound on |reported - exact| / reported for each quantile (p50, "
            "p99 and any asked for), at about 99.7% confidence; 0 where exact. Empty for a "
            "summary without requests.",
            "propertyNames": {"pattern": QUANTILE_NAME},
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "quantiles_ms": {
            "type": "object",
            "description": "Only with `?quantiles=`: each asked quantile in ms, named like "
            "`p90`, `p99.9`." + null_note,
            "propertyNames": {"pattern": QUANTILE_NAME},
            "additionalProperties": number | {"minimum": 0},
        },
    }


_FIGURES_REQUIRED = [
    "total_requests",
    "successful_requests",
    "failed_requests",
    "client_errors",
    "server_errors",
    "uptime_pct",
    "avg_latency_ms",
    "median_latency_ms",
    "p99_latency_ms",
    "quantile_error",
]

# A real answer (README's, for api_requests.log of `make run`).
_STATS_EXAMPLE = {
    "customer_id": "cust_1",
    "from": "2026-10-23",
    "to": "2026-10-25",
    "days": [
        {
            "date": "2026-10-23",
            "total_requests": 1,
            "successful_requests": 1,
            "failed_requests": 0,
            "client_errors": 0,
            "server_errors": 0,
            "uptime_pct": 100.0,
            "avg_latency_ms": 1463.0,
            "median_latency_ms": 1463.0,
            "p99_latency_ms": 1463.0,
            "quantile_error": {"p50": 0.0, "p99": 0.0},
        },
        {
            "date": "2026-10-24",
            "total_requests": 5,
            "successful_requests": 1,
            "failed_requests": 4,
            "client_errors": 3,
            "server_errors": 1,
            "uptime_pct": 80.0,
            "avg_latency_ms": 1252.6,
            "median_latency_ms": 1429.0,
            "p99_latency_ms": 1931.0,
            "quantile_error": {"p50": 0.0, "p99": 0.0},
        },
        {
            "date": "2026-10-25",
            "total_requests": 8,
            "successful_requests": 3,
            "failed_requests": 5,
            "client_errors": 5,
            "server_errors": 0,
            "uptime_pct": 100.0,
            "avg_latency_ms": 1086.375,
            "median_latency_ms": 803.0,
            "p99_latency_ms": 1938.0,
            "quantile_error": {"p50": 0.0, "p99": 0.0},
        },
    ],
    "summary": {
        "total_requests": 14,
        "successful_requests": 5,
        "failed_requests": 9,
        "client_errors": 8,
        "server_errors": 1,
        "uptime_pct": 92.857,
        "avg_latency_ms": 1172.643,
        "median_latency_ms": 1139.0,
        "p99_latency_ms": 1938.0,
        "quantile_error": {"p50": 0.0, "p99": 0.0},
    },
}


def _schemas() -> dict[str, Any]:
    day_figures = _figures(nullable=False)
    return {
        "DayStats": {
            "type": "object",
            "description": "One UTC day with at least one request.",
            "required": ["date", *_FIGURES_REQUIRED],
            "additionalProperties": False,
            "properties": {
                "date": {"type": "string", "format": "date"},
                **day_figures,
            },
        },
        "RangeSummary": {
            "type": "object",
            "description": "The same figures over every day of the range, pooled.",
            "required": _FIGURES_REQUIRED,
            "additionalProperties": False,
            "properties": _figures(nullable=True),
        },
        "Stats": {
            "type": "object",
            "required": ["customer_id", "from", "to", "days", "summary"],
            "additionalProperties": False,
            "properties": {
                "customer_id": {"type": "string"},
                "from": {"type": "string", "format": "date"},
                "to": {
                    "type": ["string", "null"],
                    "format": "date",
                    "description": "`null` when not given: up to the newest day.",
                },
                "days": {
                    "type": "array",
                    "description": "Ascending; only days with at least one request.",
                    "items": _ref("DayStats"),
                },
                "summary": _ref("RangeSummary"),
            },
        },
        "IngestSummary": {
            "type": "object",
            "required": ["accepted", "rejected", "rejected_by_reason"],
            "additionalProperties": False,
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "rejected": {"type": "integer", "minimum": 0},
                "rejected_by_reason": {
                    "type": "object",
                    "description": "Rejected lines by reason; reasons with no line are left out.",
                    # customer_limit: the owning shard refused a new customer (the cap).
                    "propertyNames": {"enum": [*REASONS, "customer_limit"]},
                    "additionalProperties": {"type": "integer", "minimum": 1},
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "additionalProperties": False,
            "properties": {"status": {"const": "ok"}},
        },
        "Ready": {
            "type": "object",
            "required": ["status", "shards"],
            "additionalProperties": False,
            "properties": {
                "status": {"const": "ready"},
                "shards": {"type": "integer", "minimum": 1},
            },
        },
        "NotReady": {
            "type": "object",
            "required": ["error", "missing_shards"],
            "additionalProperties": False,
            "properties": {
                "error": {"type": "string"},
                "missing_shards": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "integer", "minimum": 0},
                },
            },
        },
        "Error": {
            "type": "object",
            "description": "Every error answer. `path` is set when no route matched "
            "(unknown path, wrong method).",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {"type": "string", "minLength": 1},
                "path": {"type": "string"},
            },
        },
        "OpenAPI": {
            "type": "object",
            "required": ["openapi", "info", "paths"],
            "properties": {"openapi": {"type": "string"}},
        },
    }


def _not_found(what: str) -> dict[str, Any]:
    return _json_response(what, "Error")


def _page(operation_id: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "tags": ["browser"],
            "responses": {"200": {"description": "The page.", "content": {HTML: {}}}},
        }
    }


def _paths() -> dict[str, Any]:
    stats_params = [
        {
            "name": "customer_id",
            "in": "path",
            "required": True,
            "description": f"1-{MAX_CUSTOMER_ID_BYTES} bytes of UTF-8 without whitespace or "
            "control characters, percent-encoded (`tenant%3A7%2Fprod`).",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_CUSTOMER_ID_BYTES,
                "pattern": r"^[^\s\u0000-\u001f\u007f-\u009f]+$",
            },
            "example": _STATS_EXAMPLE["customer_id"],
        },
        {
            "name": "from",
            "in": "query",
            "required": True,
            "description": "First UTC day, inclusive.",
            "schema": {"type": "string", "format": "date", "pattern": DATE_PATTERN},
            "example": _STATS_EXAMPLE["from"],
        },
        {
            "name": "to",
            "in": "query",
            "required": False,
            "description": "Last UTC day, inclusive, not before `from`; without it, up to "
            "the newest day.",
            "schema": {"type": "string", "format": "date", "pattern": DATE_PATTERN},
            "example": _STATS_EXAMPLE["to"],
        },
        {
            "name": "quantiles",
            "in": "query",
            "required": False,
            "description": f"Up to {MAX_EXTRA_QUANTILES} extra quantiles, comma-separated "
            "decimals strictly between 0 and 1 (`0.9,0.999`, `.5`); each adds "
            "`quantiles_ms.pNN` and `quantile_error.pNN` to every day and the summary.",
            "schema": {"type": "string", "pattern": QUANTILES_PARAM},
            "example": "0.9,0.999",
        },
    ]
    lines_schema = {"type": "string", "description": "Text or JSON lines, one request a line."}
    return {
        "/customers/{customer_id}/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Daily request counts, uptime and latency of one customer",
                "description": "Days are UTC. Counts and the mean are exact; the median, "
                "p99 and extra quantiles are nearest-rank values, exact for days of up to "
                "STATS_KLL_K requests and from sketches beyond (see `quantile_error`). A "
                "known customer without requests in the range gets `days: []`, zero "
                "counts and `null` figures.",
                "tags": ["stats"],
                "parameters": stats_params,
                "responses": {
                    "200": _json_response(
                        "Per-day figures and their summary.", "Stats", readme=_STATS_EXAMPLE
                    ),
                    "400": _json_response(
                        "`from` missing or not a calendar date, `to` empty or invalid or "
                        "before `from`, `quantiles` not 1-10 decimals in (0, 1), or a "
                        "customer id that can't be valid.",
                        "Error",
                        missing_from={
                            "error": "missing required query parameter 'from' (YYYY-MM-DD)"
                        },
                        to_before_from={"error": "'to' (2026-11-01) is before 'from' (2026-11-20)"},
                    ),
                    "404": _json_response(
                        "Customer never seen, or all its days expired.",
                        "Error",
                        unknown={
                            "error": "unknown customer 'nobody' (never seen, or its data expired)"
                        },
                    ),
                    "503": _json_response(
                        "The shard owning the customer is not answering.",
                        "Error",
                        unavailable={"error": "shard 1 is unavailable: timed out"},
                    ),
                },
            }
        },
        "/ingest": {
            "post": {
                "operationId": "ingest",
                "summary": "Send log lines",
                "description": "The body is streamed, not buffered whole. Bad lines are "
                "counted by reason and never stop the good ones; the answer comes once "
                "the accepted lines are applied, so queries made after it see them.",
                "tags": ["ingest"],
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "Send the same key when retrying the same body: the "
                        "first answer is returned again (header Idempotent-Replayed: true) and "
                        "nothing is counted twice. Keys are kept 24 hours, across restarts.",
                        "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                    }
                ],
                "requestBody": {
                    "description": "Lines; an empty or missing body is zero lines.",
                    "required": False,
                    "content": {ct: {"schema": lines_schema} for ct in INGEST_CONTENT_TYPES},
                },
                "responses": {
                    "200": _json_response(
                        "What was accepted and rejected.",
                        "IngestSummary",
                        mixed={
                            "accepted": 2,
                            "rejected": 2,
                            "rejected_by_reason": {"fields": 1, "status": 1},
                        },
                    ),
                    "415": _json_response(
                        "Any other Content-Type.",
                        "Error",
                        json={
                            "error": "unsupported Content-Type 'application/json'; send lines "
                            "as " + " or ".join(INGEST_CONTENT_TYPES)
                        },
                    ),
                    "400": _json_response("An invalid Idempotency-Key.", "Error"),
                    "408": _json_response(
                        "The body stopped arriving (STATS_IDLE_TIMEOUT).", "Error"
                    ),
                    "422": _json_response(
                        "The Idempotency-Key was used for another body.", "Error"
                    ),
                    "503": _json_response("A shard is not answering.", "Error"),
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness: the HTTP front is up",
                "tags": ["operations"],
                "responses": {"200": _json_response("Up.", "Health")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: every shard answers a ping",
                "tags": ["operations"],
                "responses": {
                    "200": _json_response("Every shard answers.", "Ready"),
                    "503": _json_response(
                        "Some shards do not answer.",
                        "NotReady",
                        one_missing={"error": "shards not answering: 1", "missing_shards": [1]},
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of every process (text exposition format)",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "Counters, gauges and histograms, merged over processes.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/": _page(
            "page",
            "The stats page",
            "Pick a customer and a date range: daily requests, uptime and latency as charts, "
            "with the summary. `?customer=ID&from=YYYY-MM-DD&to=YYYY-MM-DD` opens a view.",
        ),
        "/docs": _page("docs", "This API description, rendered", "RapiDoc, served locally."),
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This API description (OpenAPI 3.1)",
                "tags": ["browser"],
                "responses": {"200": _json_response("The description.", "OpenAPI")},
            }
        },
        "/static/{file}": {
            "get": {
                "operationId": "static",
                "summary": "Files of the page and the docs",
                "description": "Vendored libraries live under versioned directories and "
                "may be cached for a year; the page's own files are revalidated (ETag).",
                "tags": ["browser"],
                "parameters": [
                    {
                        "name": "file",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                        "example": "app.js",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {
                            ct: {}
                            for ct in (
                                "text/javascript",
                                "text/css",
                                "text/html",
                                "text/plain",
                                "text/markdown",
                            )
                        },
                    },
                    "404": _not_found("No such file."),
                },
            }
        },
    }


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI document of every endpoint, with its answers and errors."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "statsd_server",
            "version": "0.1.0",
            "description": "A sharded, in-memory stats server for API request logs. Every "
            'error answer is JSON, `{"error": "..."}`; an unknown path gets 404 and a '
            "known path with the wrong method 405, both with the `path` as well.",
        },
        "tags": [
            {"name": "stats", "description": "Query a customer's figures."},
            {"name": "ingest", "description": "Send lines (also on the TCP port)."},
            {"name": "operations", "description": "Health and readiness probes."},
            {"name": "browser", "description": "The page, these docs and their files."},
        ],
        "paths": _paths(),
        "components": {"schemas": _schemas()},
    }
