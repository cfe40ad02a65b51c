"""What crosses the gateway and how: the upstream path, and the headers in each direction.

Pure functions of the request's path and headers, so every rule about what may reach
OpenRouter (and what may come back) is tested without a socket.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import REQUEST_ID_HEADER, BadRequest, Reason

PREFIX = "/api/openrouter/"
# Upstream paths named in metrics; every other path is counted as "other".
KNOWN_PATHS = frozenset({"chat/completions", "completions", "models", "generation", "embeddings"})

# Which methods each proxied path takes. Completions and embeddings are POSTed; every
# other proxied path (models, providers, generation, parameters) is a listing, read with
# GET or HEAD. OPTIONS is answered by the gateway itself. Nothing else is forwarded: a
# TRACE echoed by some hop would hand the gateway's own upstream key to the caller.
POSTED_PATHS = frozenset({"chat/completions", "completions", "embeddings"})
POST_ONLY = frozenset({"POST"})
READ_ONLY = frozenset({"GET", "HEAD"})

# Headers that describe one hop, or carry the caller's credentials, never go upstream.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp decodes a compressed request body; the bytes sent on are the decoded ones.
_NOT_FORWARDED = _HOP_BY_HOP | {
    "host",
    "content-length",
    "content-encoding",
    "authorization",
    "cookie",
    "expect",
}
# Set-Cookie from OpenRouter belongs to no user of ours; content-length is re-derived.
_NOT_RELAYED = _HOP_BY_HOP | {"set-cookie", "content-length", REQUEST_ID_HEADER.lower()}

# Encoded slashes and backslashes would let a segment hide a separator; "?" and "#"
# would end the path early; NUL is never meant.
_FORBIDDEN_IN_PATH = ("%2f", "%5c", "\\", "%00", "?", "#")


def upstream_path(raw_path: str) -> str:
    """The upstream path for a request path, still percent-encoded; 400 for path tricks.

    A leading `v1/` is dropped (the base URL already ends in /v1). Dot segments, empty
    segments, encoded slashes and backslashes are refused so the path cannot climb out of
    the base URL's path.
    """
    if not raw_path.startswith(PREFIX):
        raise _invalid_path()
    tail = raw_path[len(PREFIX) :]
    if tail.startswith("v1/"):
        tail = tail[3:]
    lowered = tail.lower()
    if any(bad in lowered for bad in _FORBIDDEN_IN_PATH):
        raise _invalid_path()
    for segment in tail.split("/"):
        if segment in ("", ".", "..") or segment.lower() in ("%2e", "%2e%2e", ".%2e", "%2e."):
            raise _invalid_path()
    return tail


def is_proxied(tail: str, allowed: tuple[str, ...]) -> bool:
    """True when the upstream path is one the extension may reach through the gateway.

    Patterns are exact paths, or prefixes ending in `/*`. Everything else (account-wide
    endpoints such as `credits`, `key` or `keys`, which would show or change the
    gateway's own OpenRouter account) is refused.
    """
    for pattern in allowed:
        if pattern.endswith("/*"):
            if tail.startswith(pattern[:-1]):
                return True
        elif tail == pattern:
            return True
    return False


def allowed_methods(tail: str) -> frozenset[str]:
    """The methods the gateway forwards for a proxied upstream path."""
    return POST_ONLY if tail in POSTED_PATHS else READ_ONLY


def allow_header(methods: frozenset[str]) -> str:
    """The `Allow` value for a path: its methods and the OPTIONS the gateway answers."""
    return ", ".join(sorted(methods | {"OPTIONS"}))


def _invalid_path() -> BadRequest:
    return BadRequest(
        "The requested path is not a valid OpenRouter API path.", reason=Reason.INVALID_PATH
    )


def upstream_target(base_path: str, tail: str, query_string: str) -> str:
    """The request target `{base_path}/{tail}?{query}`, as the client encoded it."""
    target = f"{base_path}/{tail}"
    return f"{target}?{query_string}" if query_string else target


def forward_headers(
    headers: CIMultiDictProxy[str], upstream_key: str, *, plain_body: bool = False
) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them, with our key instead of theirs.

    `plain_body` drops Accept-Encoding, so that the response comes back uncompressed
    (what the gateway meters must be readable; reads keep their compression).
    """
    named_in_connection = _named_in_connection(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if (
            lowered in _NOT_FORWARDED
            or lowered in named_in_connection
            or lowered.startswith("x-kilocode-")
            or (plain_body and lowered == "accept-encoding")
        ):
            continue
        out.add(name, value)
    out["Authorization"] = f"Bearer {upstream_key}"
    return out


def _named_in_connection(headers: CIMultiDictProxy[str]) -> set[str]:
    """Headers that a `Connection` header (every one of them) marks as hop-by-hop."""
    return {
        name.strip().lower()
        for value in headers.getall("Connection", ())
        for name in value.split(",")
        if name.strip()
    }


def relay_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The upstream's response headers as the client should see them."""
    named_in_connection = _named_in_connection(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in _NOT_RELAYED and lowered not in named_in_connection:
            out.add(name, value)
    out["X-Accel-Buffering"] = "no"
    out[REQUEST_ID_HEADER] = request_id
    return out


def metric_route(tail: str) -> str:
    """The route label for an upstream path: a known endpoint or "other"."""
    path = tail.partition("?")[0]
    return PREFIX + (path if path in KNOWN_PATHS else "other")
