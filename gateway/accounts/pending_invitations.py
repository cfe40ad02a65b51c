"""Pending invitations, for the owners who send them: list them, revoke one.

- `GET /api/organizations/{id}/invitations` (owners, as for inviting): the pending
  invitations, newest first, with who sent them; never the token or its hash.
- `DELETE /api/organizations/{id}/invitations/{invitation_id}` (owners): the invitation
  is revoked (`revoked_at`), so its link stops working and the seat it held after the
  trial is free again. Anything but a pending invitation of this organization is 404,
  so an id of another organization's invitation reveals nothing.

Pending means what it means everywhere (`organizations.PENDING_INVITATION`): neither
accepted nor revoked, and not yet expired; the list is the one the members route gives
owners (`organizations.list_pending_invitations`).
"""

from __future__ import annotations

import asyncpg
from aiohttp import web

from gateway.access.auth import canonical_id
from gateway.access.members import OWNERS, authorize_member
from gateway.accounts.organizations import (
    PENDING_INVITATION,
    list_pending_invitations,
    lock_organization,
)
from gateway.config import CONFIG
from gateway.errors import BadRequest, NotFound, Reason
from gateway.platform.database import POOL, run_query

_REVOKE_SQL = f"""
UPDATE organization_invitations SET revoked_at = now()
WHERE id = $1::uuid AND organization_id = $2::uuid AND {PENDING_INVITATION}
RETURNING id
"""


def invitation_id(value: str) -> str:
    """The canonical form of the invitation id in the path, or 400."""
    canonical = canonical_id(value)
    if canonical is None:
        raise BadRequest("The invitation in the path must be an invitation id (a UUID).")
    return canonical


async def revoke_invitation(
    conn: asyncpg.Connection, organization_id: str, invitation: str
) -> None:
    """Revoke the organization's pending invitation; 404 `invitation_not_found` otherwise."""
    async with conn.transaction():
        # Held in the order inviting and accepting take it: the organization, then the row.
        await lock_organization(conn, organization_id)
        if await conn.fetchval(_REVOKE_SQL, invitation, organization_id) is None:
            raise NotFound(
                "This organization has no pending invitation with this id: it was accepted,"
                " revoked or replaced, has expired, or never existed.",
                reason=Reason.INVITATION_NOT_FOUND,
            )


async def list_handler(request: web.Request) -> web.Response:
    """`GET /api/organizations/{id}/invitations`: an owner lists the pending invitations."""
    organization_id, _key, _role = await authorize_member(request, OWNERS)
    timeout = request.app[CONFIG].database_query_timeout_seconds
    pending = await run_query(request.app[POOL], timeout, list_pending_invitations, organization_id)
    return web.json_response({"invitations": pending})


async def revoke_handler(request: web.Request) -> web.Response:
    """`DELETE /api/organizations/{id}/invitations/{invitation_id}`: an owner revokes one."""
    organization_id, _key, _role = await authorize_member(request, OWNERS)
    invitation = invitation_id(request.match_info["invitation_id"])
    timeout = request.app[CONFIG].database_query_timeout_seconds
    await run_query(request.app[POOL], timeout, revoke_invitation, organization_id, invitation)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app.router.add_get("/api/organizations/{organization_id}/invitations", list_handler)
    app.router.add_delete(
        "/api/organizations/{organization_id}/invitations/{invitation_id}", revoke_handler
    )
