"""Seats: invite members (unlimited while trialing), accept an invitation, remove a member.

After the trial, and from the first purchase on even during it, an invitation needs a
free seat: members who are not billing managers, plus pending invitations for such roles,
plus this one, within the seats the paying purchases pay for together; else 409
`seats_exhausted` with the upgrade link. Accepting checks again (members only). Each
change runs in one transaction holding the organization's row, so concurrent
invitations cannot both take the last seat.

The invitation token travels only in the email; the database keeps its SHA-256.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import asyncpg
from aiohttp import web

from gateway.access.auth import authenticate, hash_token
from gateway.access.cache import CACHE
from gateway.access.members import OWNERS, authorize_member
from gateway.access.queries import fetch_org_facts, fetch_role
from gateway.access.refusals import billing_url, iso_utc
from gateway.access.rule import decide
from gateway.accounts.emails import invitation_email, queue_email, user_address
from gateway.accounts.organizations import (
    count_pending_invitations,
    lock_organization,
    membership_changed,
)
from gateway.accounts.payloads import choice_field, json_object, string_field
from gateway.accounts.status import has_seat_for, seats_unlimited
from gateway.common.context import CONTEXT
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, Conflict, Forbidden, Gone, NotFound, Reason
from gateway.platform.database import POOL, run_query

ROLES = ("member", "owner", "billing_manager")
MAX_EMAIL_LENGTH = 254
MAX_TOKEN_LENGTH = 200
# Deliberately loose: one address, no spaces, commas or angle brackets.
_EMAIL = re.compile(r"[^@\s,<>\"]+@[^@\s,<>\"]+\.[^@\s,<>\"]+")

_MEMBER_EMAIL_SQL = """
SELECT 1 FROM organization_memberships m JOIN users u ON u.id = m.user_id
WHERE m.organization_id = $1::uuid AND lower(u.email) = lower($2)
"""
_REVOKE_SQL = """
UPDATE organization_invitations SET revoked_at = now()
WHERE organization_id = $1::uuid AND lower(email) = lower($2)
  AND accepted_at IS NULL AND revoked_at IS NULL
"""
_INVITE_SQL = """
INSERT INTO organization_invitations
    (organization_id, email, role, token_hash, invited_by, expires_at)
VALUES ($1::uuid, $2, $3, $4, $5, now() + make_interval(days => $6))
RETURNING id::text, expires_at
"""
_FIND_SQL = "SELECT organization_id::text FROM organization_invitations WHERE token_hash = $1"
_OPEN_SQL = """
SELECT id::text, organization_id::text, email, role, expires_at <= now() AS expired,
       revoked_at IS NOT NULL AS revoked
FROM organization_invitations
WHERE token_hash = $1 AND accepted_at IS NULL
FOR UPDATE
"""
_ACCEPTED_SQL = """
UPDATE organization_invitations SET accepted_at = now(), accepted_by = $2 WHERE id = $1::uuid
"""
_JOIN_SQL = """
INSERT INTO organization_memberships (organization_id, user_id, role)
VALUES ($1::uuid, $2, $3)
RETURNING created_at
"""
_OWNERS_SQL = """
SELECT count(*) FROM organization_memberships WHERE organization_id = $1::uuid AND role = 'owner'
"""
_REMOVE_SQL = (
    "DELETE FROM organization_memberships WHERE organization_id = $1::uuid AND user_id = $2"
)


def invited_email(body: dict[str, Any]) -> str:
    """The `email` field: one plausible address."""
    email = string_field(body, "email", max_length=MAX_EMAIL_LENGTH)
    if _EMAIL.fullmatch(email) is None:
        raise BadRequest("'email' must be an email address, like ada@example.com.")
    return email


def accept_url(app_url: str, token: str) -> str:
    """The link in the invitation email."""
    return f"{app_url}/invitations/{token}"


async def ensure_seat(
    conn: asyncpg.Connection, organization_id: str, role: str, config: Config, *, pending: bool
) -> None:
    """409 `seats_exhausted` unless one more `role` fits (counting pending invitations)."""
    facts = await fetch_org_facts(conn, organization_id)
    assert facts is not None
    now = time.time()
    open_seats = await count_pending_invitations(conn, organization_id, billing_managers=False)
    taken = facts.seats_used + (open_seats if pending else 0)
    verdict = decide(facts, now, config.trial_days, config.past_due_grace_days)
    purchased, unlimited = verdict.seats_purchased, seats_unlimited(facts, verdict)
    if has_seat_for(role, unlimited=unlimited, taken=taken, purchased=purchased):
        return
    raise Conflict(
        _no_seat_message(purchased, facts.seats_used, open_seats, inviting=pending),
        reason=Reason.SEATS_EXHAUSTED,
        metadata={
            "upgrade_url": billing_url(config.app_url, organization_id),
            "seats_used": facts.seats_used,
            "seats_purchased": purchased,
            "pending_invitations": open_seats,
        },
    )


def _no_seat_message(purchased: int, members: int, open_seats: int, *, inviting: bool) -> str:
    """Said to the owner inviting, or to the invitee accepting, who can change nothing."""
    if not inviting:  # accepting counts members only, pending invitations are no obstacle
        return (
            f"No seat is free for you: the organization pays for {_count(purchased, 'seat')}"
            f" and has {_count(members, 'member')}. An owner or billing manager of the"
            " organization must buy more seats, or an owner must remove a member; then"
            " accept this invitation again."
        )
    return (
        f"No seat is free: your organization pays for {_count(purchased, 'seat')} and has"
        f" {_count(members, 'member')} and {_count(open_seats, 'pending invitation')}."
        " Buy more seats on the billing page, or remove members or revoke pending invitations."
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


async def create_invitation(
    conn: asyncpg.Connection,
    organization_id: str,
    inviter_id: str,
    email: str,
    role: str,
    config: Config,
) -> dict[str, Any]:
    """Revoke the address's older invitation, check the seat, store and email a new one."""
    async with conn.transaction():
        found = await lock_organization(conn, organization_id)
        assert found is not None  # the caller is an owner of it
        if await conn.fetchval(_MEMBER_EMAIL_SQL, organization_id, email):
            raise Conflict(f"{email} is already a member.", reason=Reason.ALREADY_A_MEMBER)
        await conn.execute(_REVOKE_SQL, organization_id, email)
        await ensure_seat(conn, organization_id, role, config, pending=True)
        token = secrets.token_urlsafe(32)
        row = await conn.fetchrow(
            _INVITE_SQL,
            organization_id,
            email,
            role,
            hash_token(token),
            inviter_id,
            config.invitation_ttl_days,
        )
        expires_at = row["expires_at"].timestamp()
        message = invitation_email(
            to=email,
            organization_name=found[0],
            inviter_email=await user_address(conn, inviter_id),
            role=role,
            accept_url=accept_url(config.app_url, token),
            expires_at=expires_at,
        )
        await queue_email(conn, message, organization_id=organization_id)
    return {"id": row["id"], "email": email, "role": role, "expires_at": iso_utc(expires_at)}


async def invite_handler(request: web.Request) -> web.Response:
    """`POST /api/organizations/{id}/invitations`: an owner invites someone by email."""
    organization_id, key, _role = await authorize_member(request, OWNERS)
    body = await json_object(request)
    email = invited_email(body)
    role = choice_field(body, "role", ROLES, default="member")
    config = request.app[CONFIG]
    invitation = await run_query(
        request.app[POOL],
        config.database_query_timeout_seconds,
        create_invitation,
        organization_id,
        key.user_id,
        email,
        role,
        config,
    )
    return web.json_response({"invitation": invitation}, status=201)


def _not_found(*, revoked: bool = False) -> NotFound:
    message = (
        "This invitation was revoked by an owner of the organization, or replaced by a newer"
        " one; ask an owner for a new invitation."
        if revoked
        else "This invitation does not exist, was replaced by a newer one, or was already used."
    )
    return NotFound(message, reason=Reason.INVITATION_NOT_FOUND)


async def accept_invitation(
    conn: asyncpg.Connection, token_hash: str, user_id: str, config: Config
) -> dict[str, Any]:
    """Make the invited user a member and mark the invitation accepted, all or nothing."""
    async with conn.transaction():
        organization_id = await conn.fetchval(_FIND_SQL, token_hash)
        # The organization is locked before the invitation, in the order inviting uses.
        if organization_id is None or await lock_organization(conn, organization_id) is None:
            raise _not_found()
        invitation = await conn.fetchrow(_OPEN_SQL, token_hash)
        if invitation is None or invitation["revoked"]:
            raise _not_found(revoked=invitation is not None)
        await _check_acceptable(conn, invitation, user_id)
        await ensure_seat(conn, organization_id, invitation["role"], config, pending=False)
        joined = await conn.fetchval(_JOIN_SQL, organization_id, user_id, invitation["role"])
        await conn.execute(_ACCEPTED_SQL, invitation["id"], user_id)
    return {
        "organization_id": organization_id,
        "user_id": user_id,
        "role": invitation["role"],
        "created_at": iso_utc(joined.timestamp()),
    }


async def _check_acceptable(conn: asyncpg.Connection, invitation: Any, user_id: str) -> None:
    email = await user_address(conn, user_id)
    if email.lower() != invitation["email"].lower():
        raise Forbidden(
            "This invitation was sent to another email address; accept it with a key of"
            " the user it was sent to.",
            reason=Reason.INVITATION_EMAIL_MISMATCH,
        )
    if invitation["expired"]:
        raise Gone(
            "This invitation has expired; ask an owner of the organization for a new one.",
            reason=Reason.INVITATION_EXPIRED,
        )
    if await fetch_role(conn, invitation["organization_id"], user_id) is not None:
        raise Conflict(
            "You are already a member of this organization.", reason=Reason.ALREADY_A_MEMBER
        )


async def accept_handler(request: web.Request) -> web.Response:
    """`POST /api/invitations/{token}/accept`: the invited user joins the organization."""
    app = request.app
    key = await authenticate(request.headers, app[CACHE])
    request[CONTEXT].user_id = key.user_id
    token = request.match_info["token"]
    if len(token) > MAX_TOKEN_LENGTH:
        raise _not_found()
    config = app[CONFIG]
    membership = await run_query(
        app[POOL],
        config.database_query_timeout_seconds,
        accept_invitation,
        hash_token(token),
        key.user_id,
        config,
    )
    request[CONTEXT].organization_id = membership["organization_id"]
    membership_changed(app, membership["organization_id"], key.user_id)
    return web.json_response({"membership": membership})


async def remove_member(conn: asyncpg.Connection, organization_id: str, user_id: str) -> None:
    """Remove the member; 404 when not one, 409 `last_owner` for the only owner."""
    async with conn.transaction():
        await lock_organization(conn, organization_id)
        role = await fetch_role(conn, organization_id, user_id)
        if role is None:
            raise NotFound("No such member in this organization.", reason=Reason.MEMBER_NOT_FOUND)
        if role == "owner" and await conn.fetchval(_OWNERS_SQL, organization_id) <= 1:
            raise Conflict(
                "An organization needs an owner: make someone else an owner first.",
                reason=Reason.LAST_OWNER,
            )
        await conn.execute(_REMOVE_SQL, organization_id, user_id)


async def remove_handler(request: web.Request) -> web.Response:
    """`DELETE /api/organizations/{id}/members/{user_id}`: an owner removes a member."""
    organization_id, _key, _role = await authorize_member(request, OWNERS)
    user_id = request.match_info["user_id"]
    if "\x00" in user_id or not user_id.isprintable():
        raise NotFound("No such member in this organization.", reason=Reason.MEMBER_NOT_FOUND)
    timeout = request.app[CONFIG].database_query_timeout_seconds
    await run_query(request.app[POOL], timeout, remove_member, organization_id, user_id)
    membership_changed(request.app, organization_id, user_id)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app.router.add_post("/api/organizations/{organization_id}/invitations", invite_handler)
    app.router.add_post("/api/invitations/{token}/accept", accept_handler)
    app.router.add_delete("/api/organizations/{organization_id}/members/{user_id}", remove_handler)
