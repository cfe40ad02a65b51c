"""The one member check of the organization routes: who the caller is, in which role.

Every `/api/organizations/{organization_id}/...` route (accounts' and the per-organization
model list alike) starts here, so that the key, the path's organization and the role are
judged the same way everywhere.
"""

from __future__ import annotations

from aiohttp import web

from gateway.access.auth import authenticate, parse_organization_id, require_role
from gateway.access.cache import CACHE
from gateway.access.queries import ApiKey
from gateway.common.context import CONTEXT

ANY_ROLE = frozenset({"owner", "member", "billing_manager"})
OWNERS = frozenset({"owner"})


async def authorize_member(request: web.Request, roles: frozenset[str]) -> tuple[str, ApiKey, str]:
    """The path's organization, the caller's key and role, when the role is one of `roles`."""
    organization_id = parse_organization_id(
        request.match_info["organization_id"], "The organization in the path"
    )
    key = await authenticate(request.headers, request.app[CACHE])
    request[CONTEXT].user_id = key.user_id
    request[CONTEXT].organization_id = organization_id
    role = await require_role(key, organization_id, request.app[CACHE], roles)
    return organization_id, key, role
