"""JSON responses of the HTTP front, errors included (`{"error": reason, ...}`)."""

from __future__ import annotations

import msgspec
from aiohttp import web


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def error_response(status: int, message: str, **extra: object) -> web.Response:
    return json_response({"error": message, **extra}, status)


def not_found(request: web.Request) -> web.Response:
    """What any path no route serves answers."""
    return error_response(404, "not found", path=request.path[:256])
