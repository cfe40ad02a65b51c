"""OpenRouter's model list, fetched once per `MODELS_CACHE_TTL_SECONDS` and shared.

The Kilo clients ask for it on every start: `GET /api/openrouter/models` (any valid key)
and, in organization mode (`KILO_ORG_ID`), `GET /api/organizations/{id}/models` (members
of that organization, billing managers too). Both answer the same bytes from one cache,
keyed by the query string; concurrent misses share one upstream request. It is read
with the gateway's own key and no client header, so no caller's request shapes what
another is shown. An upstream answer other than 200 is relayed as it came and never
kept; while OpenRouter is unreachable the last list keeps serving.

`GET /api/organizations/{id}/modes` answers the organization's custom modes: none yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access.cache import Lookup
from gateway.access.members import ANY_ROLE, authorize_member
from gateway.common.context import CONTEXT
from gateway.config import CONFIG
from gateway.proxy.forwarding import relay_headers, upstream_target
from gateway.proxy.upstream import UPSTREAM, UpstreamBroke, UpstreamClient, UpstreamFailed

MODELS_PATH = "models"
# OpenRouter's full list is about 1 MB; far more than that is no model list.
MAX_LISTING_BYTES = 32 * 1024 * 1024
# While OpenRouter is down, the last list is served this much longer than its TTL.
STALE_FACTOR = 12


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """One upstream answer, whole: what is relayed to every caller."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes


class ListingNotKept(Exception):
    """The upstream answered something other than 200: relayed once, never cached."""

    def __init__(self, listing: Listing) -> None:
        super().__init__(listing.status)
        self.listing = listing


class ModelListings:
    """The shared cache of `GET {OPENROUTER_BASE_URL}/models?{query}`."""

    def __init__(self, client: UpstreamClient, upstream_key: str, ttl_seconds: float) -> None:
        self._client = client
        self._upstream_key = upstream_key
        self._lookup: Lookup[str, Listing] = Lookup(
            self._fetch,
            ttl_seconds=ttl_seconds,
            stale_seconds=ttl_seconds * STALE_FACTOR,
            stale_on=(UpstreamFailed, UpstreamBroke),
            maxsize=256,
        )

    async def get(self, query_string: str) -> Listing:
        """The list for this query, from the cache or fetched once for all callers."""
        try:
            listing = await self._lookup.get(query_string)
        except ListingNotKept as exc:
            return exc.listing
        assert listing is not None  # _fetch never answers "absent"
        return listing

    async def _fetch(self, query_string: str) -> Listing:
        target = upstream_target(self._client.base_path, MODELS_PATH, query_string)
        headers = (
            ("Authorization", f"Bearer {self._upstream_key}"),
            ("Accept", "application/json"),
        )
        upstream = await self._client.request("GET", target, headers, b"")
        try:
            body = bytearray(upstream.buffered())
            while len(body) <= MAX_LISTING_BYTES:
                chunk = await upstream.read_chunk()
                if not chunk:
                    break
                body += chunk
            else:
                raise UpstreamBroke("OpenRouter's model list is far larger than expected.")
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        listing = Listing(upstream.status, upstream.reason, upstream.headers, bytes(body))
        if upstream.status != 200:
            raise ListingNotKept(listing)
        return listing


def listing_headers(listing: Listing, request_id: str) -> CIMultiDict[str]:
    """The listing's headers as a caller sees them, with the caller's own request id."""
    return relay_headers(listing.headers, request_id)


async def organization_models(request: web.Request) -> web.Response:
    """`GET /api/organizations/{id}/models`: the shared list, for members of the org."""
    await authorize_member(request, ANY_ROLE)
    ctx = request[CONTEXT]
    listing = await request.app[LISTINGS].get(request.rel_url.raw_query_string)
    ctx.upstream_status = listing.status
    return web.Response(
        status=listing.status,
        reason=listing.reason,
        headers=listing_headers(listing, ctx.request_id),
        body=listing.body,
    )


async def organization_modes(request: web.Request) -> web.Response:
    """`GET /api/organizations/{id}/modes`: custom modes, for members; none defined yet."""
    await authorize_member(request, ANY_ROLE)
    return web.json_response({"modes": []})


LISTINGS = web.AppKey("listings", ModelListings)


async def model_listings(app: web.Application) -> AsyncIterator[None]:
    """The shared model list, over the upstream client the `upstream_session` opens."""
    config = app[CONFIG]
    app[LISTINGS] = ModelListings(
        app[UPSTREAM], config.openrouter_api_key, config.models_cache_ttl_seconds
    )
    yield


def setup(app: web.Application) -> None:
    """Register the per-organization listings and the shared cache."""
    app.router.add_get("/api/organizations/{organization_id}/models", organization_models)
    app.router.add_get("/api/organizations/{organization_id}/modes", organization_modes)
    app.cleanup_ctx.append(model_listings)
