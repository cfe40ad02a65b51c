"""Every place the gateway relies on aiohttp beyond its documented API, each with why.

The proxy route's own connection handler (`serve/fastpath.py`) and the runner that installs
it (`runner.py`) need a few things aiohttp does not offer publicly: to start each
connection with a protocol of our own, to hand a connection to aiohttp's handler half-way,
and to notice when that handler has read a whole head. Every such touch lives here, named,
so that an aiohttp upgrade has one file to read; `INTERNALS` lists them, and a test checks
each is still there on the aiohttp installed (pyproject pins the minor versions the suite
ran on). The rest of the gateway imports these helpers, never the attributes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiohttp import http_parser, web
from aiohttp.tcp_helpers import tcp_keepalive, tcp_nodelay

__all__ = [
    "INTERNALS",
    "SINGLETON_HEADERS",
    "Internal",
    "ServerClassRunner",
    "defer_headers_to_first_write",
    "handler_loop",
    "handler_server",
    "new_handler",
    "requests_read",
    "server_setting",
    "tcp_keepalive",
    "tcp_nodelay",
    "waiting_for_request",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Internal:
    """One private name the gateway uses: on what, and why."""

    owner: Any  # a class, or a module
    name: str
    why: str
    on_instance: bool  # set in __init__ rather than on the class


INTERNALS: tuple[Internal, ...] = (
    Internal(
        web.RequestHandler,
        "_request_count",
        "a head was read: the header deadline (runner.py) stops once it grows",
        on_instance=True,
    ),
    Internal(
        web.RequestHandler,
        "_waiter",
        "set while the handler waits for a request's first bytes: the header deadline"
        " runs only then",
        on_instance=True,
    ),
    Internal(
        web.RequestHandler,
        "_manager",
        "the server that made the handler, which holds the header timeout",
        on_instance=True,
    ),
    Internal(web.RequestHandler, "_loop", "to arm the header deadline", on_instance=True),
    Internal(
        web.Server,
        "_kwargs",
        "the handler settings (timeouts, limits) a connection handed over is served with",
        on_instance=True,
    ),
    Internal(web.Server, "_loop", "the loop aiohttp's handlers are made for", on_instance=True),
    Internal(
        web.AppRunner,
        "_make_server",
        "where the runner makes its server: overridden to give it our connection class",
        on_instance=False,
    ),
    Internal(
        http_parser,
        "SINGLETON_HEADERS",
        "the headers aiohttp refuses to see twice: the fast path hands such heads over",
        on_instance=False,
    ),
    Internal(
        web.StreamResponse,
        "_send_headers_immediately",
        "False sends a relayed response's head with its first body bytes: one write",
        on_instance=False,
    ),
)


# Lowercase, as the fast path compares them.
SINGLETON_HEADERS = frozenset(name.lower() for name in http_parser.SINGLETON_HEADERS)


def requests_read(handler: web.RequestHandler) -> int:
    """How many request heads aiohttp's handler has read on its connection."""
    return int(handler._request_count)


def waiting_for_request(handler: web.RequestHandler) -> bool:
    """True while the handler waits for the next request's bytes."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def handler_server(handler: web.RequestHandler) -> Any:
    """The server that created the handler (None once the connection is lost)."""
    return handler._manager


def handler_loop(handler: web.RequestHandler) -> asyncio.AbstractEventLoop:
    return handler._loop


def server_setting(server: web.Server, name: str, default: Any) -> Any:
    """One of the handler settings the server was made with (`keepalive_timeout`, ...)."""
    return server._kwargs.get(name, default)


def new_handler(server: web.Server, handler_class: type[web.RequestHandler]) -> web.RequestHandler:
    """A connection handler of `handler_class`, made as the server makes its own."""
    return handler_class(server, loop=server._loop, **server._kwargs)


def defer_headers_to_first_write(response_class: type[web.StreamResponse]) -> None:
    """Make `response_class` send its head together with its first body bytes.

    aiohttp's own `web.Response` buffers its head the same way; a `StreamResponse`
    sends it alone at `prepare()`, a second write for every response that arrives whole.
    """
    response_class._send_headers_immediately = False


class ServerClassRunner(web.AppRunner):
    """An AppRunner whose server is of `server_class` (a subclass of `web.Server`).

    aiohttp offers no way to choose the protocol a server's connections start with; the
    server it makes is given our subclass, same object and state, which overrides only
    the protocol factory. `adopt` then sets what the subclass adds.
    """

    server_class: type[web.Server]

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = self.server_class
        self.adopt(server)
        return server

    def adopt(self, server: web.Server) -> None:
        """Fill in the attributes `server_class` adds (override)."""
