"""The aiohttp floor: a bare pass-through proxy, what our stack costs before it does anything.

It reads the request, forwards it with one shared ``ClientSession`` and streams the
response back chunk by chunk; no checks, no metrics, no log line. The path is forwarded
unchanged, so ``http://floor/api/v1/chat/completions`` reaches the upstream's
``/api/v1/chat/completions``. Run it with ``python -m bench.floor_proxy --upstream URL``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Final

import aiohttp
from aiohttp import web

SESSION: Final = web.AppKey("floor_session", aiohttp.ClientSession)
UPSTREAM: Final = web.AppKey("floor_upstream", str)
# Hop-by-hop headers, and the ones aiohttp derives itself.
_SKIP: Final = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "upgrade"})


async def forward(request: web.Request) -> web.StreamResponse:
    """Relay one request to the upstream and its response back, as it arrives."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
    headers.pop("Content-Length", None)
    url = request.app[UPSTREAM] + request.path_qs
    body = await request.read()
    async with request.app[SESSION].request(request.method, url, headers=headers, data=body) as up:
        relayed = {k: v for k, v in up.headers.items() if k.lower() not in _SKIP}
        response = web.StreamResponse(status=up.status, headers=relayed)
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """The one upstream session, pooled and unlimited, bytes passed as they come."""
    connector = aiohttp.TCPConnector(limit=0)
    app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    yield
    await app[SESSION].close()


def create_app(upstream_url: str) -> web.Application:
    """The floor proxy in front of ``upstream_url`` (scheme, host and port only)."""
    app = web.Application()
    app[UPSTREAM] = upstream_url.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point for ``python -m bench.floor_proxy``."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor_proxy", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    try:  # the gateway runs on uvloop when it is installed; so does its floor
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    app = create_app(args.upstream)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
