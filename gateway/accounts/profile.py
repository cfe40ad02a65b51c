"""Who the caller is, as the Kilo clients ask on start, in the shapes Kilo's backend uses.

- `GET /api/profile`: `{"user": {"id", "email", "name", "image"}, "organizations":
  [{"id", "name", "role"}]}` (what `kilo profile` prints);
- `GET /api/user`: the same user object (the CLI checks its key with it);
- `GET /api/profile/balance`: `{"balance": <USD>, "isDepleted": <bool>}` for the
  organization in `X-KiloCode-OrganizationId`, else the key's, else the user's only one;
- `GET /api/defaults` and `GET /api/organizations/{id}/defaults`: the models a client
  starts with (`DEFAULT_MODEL`, `DEFAULT_FREE_MODEL`).

Every route takes the bearer key the proxy takes; an unknown or revoked key is 401, an
organization the caller is not in is 403. `/api/defaults` also answers a client with no
key at all (the CLI asks before sign-in, for the free model).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.access.admission import organization_facts
from gateway.access.auth import authenticate, require_role, resolve_organization
from gateway.access.cache import CACHE
from gateway.access.members import ANY_ROLE, authorize_member
from gateway.access.queries import ApiKey, Queryable
from gateway.access.refusals import balance_usd
from gateway.common.context import CONTEXT
from gateway.config import CONFIG
from gateway.errors import InvalidApiKey
from gateway.ledger.writer import LEDGER
from gateway.platform.database import POOL, run_query

_USER_SQL = "SELECT id, email, name, image_url FROM users WHERE id = $1"
_ORGANIZATIONS_SQL = """
SELECT o.id::text AS id, o.name, m.role
FROM organization_memberships m JOIN organizations o ON o.id = m.organization_id
WHERE m.user_id = $1
ORDER BY o.name, o.id
"""


async def fetch_user(conn: Queryable, user_id: str) -> dict[str, Any] | None:
    """The user as the Kilo clients read one, or None when the user is gone."""
    row = await conn.fetchrow(_USER_SQL, user_id)
    if row is None:
        return None
    return {"id": row["id"], "email": row["email"], "name": row["name"], "image": row["image_url"]}


async def fetch_profile(conn: Queryable, user_id: str) -> dict[str, Any] | None:
    """The user and their organizations with roles, or None when the user is gone."""
    user = await fetch_user(conn, user_id)
    if user is None:
        return None
    organizations = await conn.fetch(_ORGANIZATIONS_SQL, user_id)
    return {"user": user, "organizations": [dict(row) for row in organizations]}


async def callers(
    request: web.Request, query: Callable[[Queryable, str], Awaitable[dict[str, Any] | None]]
) -> dict[str, Any]:
    """`query` for the authenticated caller; 401 when the key's user no longer exists."""
    key = await caller_key(request)
    config = request.app[CONFIG]
    found = await run_query(
        request.app[POOL], config.database_query_timeout_seconds, query, key.user_id
    )
    if found is None:
        raise InvalidApiKey("Invalid or revoked API key.")
    return found


async def caller_key(request: web.Request) -> ApiKey:
    """The live key of the request, or 401; noted in the request's log line."""
    key = await authenticate(request.headers, request.app[CACHE])
    request[CONTEXT].user_id = key.user_id
    return key


async def profile_handler(request: web.Request) -> web.Response:
    """`GET /api/profile`."""
    return web.json_response(await callers(request, fetch_profile))


async def user_handler(request: web.Request) -> web.Response:
    """`GET /api/user` (every CLI start): the user alone, one query."""
    return web.json_response(await callers(request, fetch_user))


async def balance_handler(request: web.Request) -> web.Response:
    """`GET /api/profile/balance`: the chosen organization's credits, in USD."""
    key = await caller_key(request)
    cache = request.app[CACHE]
    organization_id = await resolve_organization(request.headers, key, cache)
    request[CONTEXT].organization_id = organization_id
    await require_role(key, organization_id, cache, ANY_ROLE)
    facts = await organization_facts(cache, organization_id)
    # What this process charged and has not written yet is spent already.
    unwritten = request.app[LEDGER].unwritten_microdollars(organization_id)
    balance = facts.balance_microdollars - unwritten
    return web.json_response({"balance": balance_usd(balance), "isDepleted": balance <= 0})


def defaults_body(request: web.Request) -> dict[str, str]:
    config = request.app[CONFIG]
    return {"defaultModel": config.default_model, "defaultFreeModel": config.default_free_model}


async def defaults_handler(request: web.Request) -> web.Response:
    """`GET /api/defaults`: with a key it must be a live one; without, answered as well."""
    if "Authorization" in request.headers:
        await caller_key(request)
    return web.json_response(defaults_body(request))


async def organization_defaults_handler(request: web.Request) -> web.Response:
    """`GET /api/organizations/{id}/defaults`: for members of the organization."""
    await authorize_member(request, ANY_ROLE)
    return web.json_response(defaults_body(request))


def setup(app: web.Application) -> None:
    """Register the profile routes."""
    app.router.add_get("/api/profile", profile_handler)
    app.router.add_get("/api/profile/balance", balance_handler)
    app.router.add_get("/api/user", user_handler)
    app.router.add_get("/api/defaults", defaults_handler)
    app.router.add_get(
        "/api/organizations/{organization_id}/defaults", organization_defaults_handler
    )
