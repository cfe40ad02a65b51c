"""Pending invitations, for the owners who send them: list them, revoke one.

- `GET /api/organizations/{id}/invitations` (owners, as for inviting): the pending
  invitations, newest first, with who sent them; never the token or its hash.
- `DELETE /api/organizations/{id}/invitations/{invitation_id}` (owners): the invitation
  is revoked (`revoked_at`), so its link stops working and the seat it held after the
  trial is free again. Anything but a pending invitation of this organization is 404,
  so an id of another organization's invitation reveals nothing.

Pending means what it means everywhere (`organizations.count_pending_invitations`):
neither accepted nor revoked, and not yet expired.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from aiohttp import web

from gateway.access.members import OWNERS, authorize_member
from gateway.access.refusals import iso_utc
from gateway.accounts.organizations import lock_organization
from gateway.config import CONFIG
from gateway.errors import BadRequest, NotFound, Reason
from gateway.platform.database import POOL, run_query

# The invitation's sender is a user id, or null once that user is deleted.
_LIST_SQL = """
SELECT i.id::text, i.email, i.role, i.invited_by, u.email AS invited_by_email,
       i.created_at, i.expires_at
FROM organization_invitations i LEFT JOIN users u ON u.id = i.invited_by
WHERE i.organization_id = $1::uuid AND i.accepted_at IS NULL AND i.revoked_at IS NULL
  AND i.expires_at > now()
ORDER BY i.created_at DESC, i.id DESC
"""
_REVOKE_SQL = """
UPDATE organization_invitations SET revoked_at = now()
WHERE id = $1::uuid AND organization_id = $2::uuid
  AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()
RETURNING id
"""


def invitation_id(value: str) -> str:
    """The canonical form of the invitation id in the path, or 400."""
    refusal = BadRequest("The invitation in the path must be an invitation id (a UUID).")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError as exc:
        raise refusal from exc
    # uuid.UUID also takes braces, URNs and missing dashes: only the canonical form passes.
    if canonical != value.lower():
        raise refusal
    return canonical


def _as_json(row: asyncpg.Record) -> dict[str, Any]:
    invitation = dict(row)
    for name in ("created_at", "expires_at"):
        invitation[name] = iso_utc(invitation[name].timestamp())
    return invitation


async def list_pending(conn: asyncpg.Connection, organization_id: str) -> list[dict[str, Any]]:
    """The organization's pending invitations, newest first."""
    return [_as_json(row) for row in await conn.fetch(_LIST_SQL, organization_id)]


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
    pending = await run_query(request.app[POOL], timeout, list_pending, organization_id)
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
