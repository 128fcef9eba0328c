"""The baseline of bench/query.py: one aiohttp + uvloop process returning a constant JSON body."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web


async def constant(request: web.Request) -> web.Response:
    return web.json_response({"customer_id": "cust_1", "summary": {"total_requests": 1}})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/{tail:.*}", constant)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
