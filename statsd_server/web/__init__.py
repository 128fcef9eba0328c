"""The browser side: the stats page, the API docs, `/openapi.json` and their static files."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from aiohttp import web

from statsd_server.responses import not_found
from statsd_server.web.openapi import openapi_spec

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Vendored libraries sit in directories named with their version: safe to cache for good.
VENDOR_PREFIX = "vendor/"
IMMUTABLE = "public, max-age=31536000, immutable"
# The page's own files change with the server: the browser revalidates them (ETag).
REVALIDATE = "no-cache"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}
# Everything the pages load comes from this server; inline styles are uPlot's and RapiDoc's.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class StaticFile:
    path: Path
    content_type: str
    cache_control: str


def static_files(root: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every servable file under `root` by its URL path; nothing else can be asked for."""
    files = {}
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if not path.is_file() or content_type is None:
            continue
        name = path.relative_to(root).as_posix()
        cache = IMMUTABLE if name.startswith(VENDOR_PREFIX) else REVALIDATE
        files[name] = StaticFile(path, content_type, cache)
    return files


def _file_response(file: StaticFile) -> web.FileResponse:
    headers = {
        "Content-Type": file.content_type,
        "Cache-Control": file.cache_control,
        "X-Content-Type-Options": "nosniff",
    }
    if file.content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return web.FileResponse(file.path, headers=headers)


def add_routes(app: web.Application) -> None:
    """Serve `/`, `/docs`, `/openapi.json` and `/static/...` from `app`."""
    files = static_files()
    spec = msgspec.json.encode(openapi_spec())

    def page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return _file_response(files[name])

        return handler

    async def static(request: web.Request) -> web.StreamResponse:
        file = files.get(request.match_info["file"])
        if file is None:
            return not_found(request)
        return _file_response(file)

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(
            body=spec,
            content_type="application/json",
            headers={"Cache-Control": REVALIDATE},
        )

    app.router.add_get("/", page("index.html"))
    app.router.add_get("/docs", page("docs.html"))
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/static/{file:.+}", static)
