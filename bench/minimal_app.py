"""The baseline of bench/query.py: one aiohttp + uvloop process returning a constant JSON body.

    python bench/minimal_app.py PORT [BODY_BYTES]

With BODY_BYTES, the constant body is padded to that size (to compare with answers of the
same size as the server's); without, it is a small JSON object.
"""

from __future__ import annotations

import json
import sys

import uvloop
from aiohttp import web


def body(size: int | None) -> bytes:
    small = {"customer_id": "cust_1", "summary": {"total_requests": 1}}
    if size is None:
        return json.dumps(small).encode()
    padding = max(0, size - len(json.dumps({**small, "pad": ""})))
    return json.dumps({**small, "pad": "x" * padding}).encode()


if __name__ == "__main__":
    payload = body(int(sys.argv[2]) if len(sys.argv) > 2 else None)

    async def constant(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", constant)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
