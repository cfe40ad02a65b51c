"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, bytes as they come.

Why not aiohttp's `ClientSession`: it is built for every use (cookies, redirects, proxies,
decompression, tracing, retries of any payload) and in the profile it cost about as much
CPU per request as everything else the gateway does. The gateway needs one thing: send
a request it already holds in full to one origin, and hand back the response's status,
headers and body bytes as they arrive, unchanged. The client does that and no more:

- one TCP (or TLS) connection per request in flight, kept alive and reused LIFO;
- the request goes out in one write; the response is parsed as it comes, the body
  de-framed (Content-Length, chunked, or until close) and queued, with back-pressure;
- three deadlines: connecting, the response head, and silence mid-body;
- a request on a reused connection that dies before any response byte is retried once
  on a new connection, for idempotent methods only (RFC 9112 §9.3.1), as aiohttp does.

This module is the pool and the connecting; the rest lives apart, each below the one
before: a connection and the response on it in `connection.py`, llhttp and RFC 9110's
rules for the bytes in `wire.py`, the response handed back and the errors in
`upstream_response.py`. Callers import all of it from here, the client's public face.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohappyeyeballs
from aiohttp import web

from gateway.proxy.connection import (
    KEEPALIVE_SECONDS,
    PAUSE_AT_BYTES,
    Connection,
    LostBeforeHead,
)
from gateway.proxy.upstream_response import (
    UpstreamBroke,
    UpstreamDown,
    UpstreamFailed,
    UpstreamMisspoke,
    UpstreamResponse,
    UpstreamSilent,
)
from gateway.proxy.wire import (
    IDEMPOTENT_METHODS,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_INTERIM_RESPONSES,
    MAX_LENGTH_DIGITS,
    MAX_LINE_BYTES,
    NO_BODY_STATUSES,
)

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "DNS_TTL_SECONDS",
    "HAPPY_EYEBALLS_DELAY_SECONDS",
    "IDEMPOTENT_METHODS",
    "KEEPALIVE_SECONDS",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_IDLE_CONNECTIONS",
    "MAX_INTERIM_RESPONSES",
    "MAX_LENGTH_DIGITS",
    "MAX_LINE_BYTES",
    "NO_BODY_STATUSES",
    "PAUSE_AT_BYTES",
    "UPSTREAM",
    "Origin",
    "UpstreamBroke",
    "UpstreamClient",
    "UpstreamDown",
    "UpstreamFailed",
    "UpstreamMisspoke",
    "UpstreamResponse",
    "UpstreamSilent",
]

CONNECT_TIMEOUT_SECONDS = 10.0
# RFC 8305's recommended wait before racing the next address.
HAPPY_EYEBALLS_DELAY_SECONDS = 0.25
MAX_IDLE_CONNECTIONS = 256
DNS_TTL_SECONDS = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """Where the upstream lives, from its base URL."""

    scheme: str
    host: str
    port: int
    base_path: str  # no trailing slash
    host_header: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(
            scheme=parts.scheme,
            host=host,
            port=port,
            base_path=parts.path.rstrip("/"),
            host_header=shown if port == default_port else f"{shown}:{port}",
        )


class UpstreamClient:
    """Sends requests to one origin over a pool of keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_seconds: float,
        head_timeout_seconds: float,
        idle_timeout_seconds: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.head_timeout_seconds = head_timeout_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._ssl = (
            (ssl_context or ssl.create_default_context()) if self.origin.scheme == "https" else None
        )
        self._idle: list[Connection] = []
        self._addresses: list[aiohappyeyeballs.AddrInfoType] = []
        self._addresses_expire = 0.0
        self._closed = False

    @property
    def base_path(self) -> str:
        return self.origin.base_path

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send the request; return once the response head arrived (502/504 otherwise).

        `target` is the request target as sent (path and query, already encoded).
        """
        headers = tuple(headers)
        conn = self._take_idle()
        retry = conn is not None and method in IDEMPOTENT_METHODS
        while True:
            if conn is None:
                conn = await self._connect()
            try:
                return await conn.send(method, target, headers, body)
            except LostBeforeHead as exc:
                if retry and not conn.received_any:
                    retry, conn = False, None
                    continue
                raise UpstreamDown("the connection closed before a response") from exc
            except BaseException:
                # Cancelled (the client went away), timed out, a response that broke the
                # protocol, or a header we cannot send: closing the connection is also
                # what tells the upstream to stop.
                conn.abort()
                raise

    def _take_idle(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable_at(now):
                return conn
            conn.abort()
        return None

    def put_back(self, conn: Connection) -> None:
        """A connection whose response ended cleanly, ready for the next request."""
        if self._closed or len(self._idle) >= MAX_IDLE_CONNECTIONS:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _connect(self) -> Connection:
        """A new connection to the origin, racing its addresses (RFC 8305, Happy
        Eyeballs): the next address is tried `HAPPY_EYEBALLS_DELAY_SECONDS` after the one
        before it, so one black-holed address (IPv6 without a route) costs a quarter of a
        second, not the whole connect budget."""
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout(self._connect_timeout_seconds):
                sock = await aiohappyeyeballs.start_connection(
                    await self._resolve(), happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_SECONDS
                )
                try:
                    _transport, conn = await loop.create_connection(
                        lambda: Connection(self),
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=origin.host if self._ssl is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
                return conn
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._addresses_expire = 0.0  # resolve afresh next time
            raise UpstreamDown(f"could not connect: {exc}") from exc

    async def _resolve(self) -> list[aiohappyeyeballs.AddrInfoType]:
        """The origin's addresses, looked up at most every DNS_TTL_SECONDS."""
        now = time.monotonic()
        if self._addresses and now < self._addresses_expire:
            return self._addresses
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.origin.host, self.origin.port, type=socket.SOCK_STREAM
        )
        self._addresses = list(infos)
        self._addresses_expire = now + DNS_TTL_SECONDS
        return self._addresses

    async def close(self) -> None:
        """Close every idle connection; responses still being read close their own."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()


UPSTREAM = web.AppKey("upstream", UpstreamClient)
