"""Pending invitations end to end: owners list and revoke them; a revoked link stops
working and its seat is free again; an invitee refused for seats is told who can act.

A real gateway on a real port and real PostgreSQL; invitation tokens are read from the
emails the gateway queued, as the invited person would read them.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.accounts import api, assert_error
from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.test_invitations import (
    AFTER_TRIAL,
    accept,
    emailed_token,
    invite,
    invited_user,
    owned_org,
)

INVITATION_FIELDS = {
    "id",
    "email",
    "role",
    "invited_by",
    "invited_by_email",
    "created_at",
    "expires_at",
}


async def pending(
    client: aiohttp.ClientSession, gateway: RunningGateway, org_id: str, token: str
) -> Any:
    path = f"/api/organizations/{org_id}/invitations"
    return await api(client, gateway, "GET", path, token=token)


async def revoke(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    org_id: str,
    invitation_id: str,
    token: str,
) -> Any:
    path = f"/api/organizations/{org_id}/invitations/{invitation_id}"
    return await api(client, gateway, "DELETE", path, token=token)


async def invited_id(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    org_id: str,
    token: str,
    email: str,
    role: str | None = None,
) -> str:
    """Invite `email`; the new invitation's id."""
    reply = await invite(client, gateway, org_id, token, email, role)
    assert reply.status == 201, reply.body
    invitation_id: str = reply.body["invitation"]["id"]
    return invitation_id


async def revoked_at(db: asyncpg.Connection, invitation_id: str) -> datetime | None:
    stamp: datetime | None = await db.fetchval(
        "SELECT revoked_at FROM organization_invitations WHERE id = $1::uuid", invitation_id
    )
    return stamp


# Listing


async def test_owners_see_pending_invitations_newest_first_without_secrets(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Only pending ones (not accepted, revoked, expired or another org's), newest first,
    with the sender; neither the token nor its hash."""
    org_id, owner_id, token = await owned_org(seed)
    owner_email = await db.fetchval("SELECT email FROM users WHERE id = $1", owner_id)
    _joiner, joiner_key = await invited_user(seed, "joined@example.test")
    for email in ("joined@example.test", "old@example.test"):
        await invite(client, gateway, org_id, token, email)
    await accept(client, gateway, await emailed_token(db, "joined@example.test"), joiner_key)
    await db.execute(
        "UPDATE organization_invitations SET expires_at = now() - interval '1 second'"
        " WHERE email = 'old@example.test'"
    )
    gone = await invited_id(client, gateway, org_id, token, "gone@example.test")
    assert (await revoke(client, gateway, org_id, gone, token)).status == 204
    first = await invited_id(client, gateway, org_id, token, "first@example.test")
    second = await invited_id(client, gateway, org_id, token, "pay@example.test", "billing_manager")
    other_org, _other_owner, other_token = await owned_org(seed, name="Other")
    await invite(client, gateway, other_org, other_token, "elsewhere@example.test")

    reply = await pending(client, gateway, org_id, token)

    assert reply.status == 200, reply.body
    listed = reply.body["invitations"]
    assert [i["id"] for i in listed] == [second, first]
    assert all(set(i) == INVITATION_FIELDS for i in listed)
    assert (listed[0]["email"], listed[0]["role"]) == ("pay@example.test", "billing_manager")
    assert (listed[1]["invited_by"], listed[1]["invited_by_email"]) == (owner_id, owner_email)
    row = await db.fetchrow(
        "SELECT created_at, expires_at FROM organization_invitations WHERE id = $1::uuid",
        first,
    )
    for name in ("created_at", "expires_at"):
        shown = datetime.fromisoformat(listed[1][name])
        assert abs(shown - row[name]) < timedelta(milliseconds=1), name
    hashes = [r[0] for r in await db.fetch("SELECT token_hash FROM organization_invitations")]
    tokens = [await emailed_token(db, f"{n}@example.test") for n in ("first", "pay")]
    for secret in [*hashes, *tokens, hashlib.sha256(tokens[0].encode()).hexdigest()]:
        assert secret not in str(reply.body)


async def test_the_sender_is_null_once_deleted(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """An invitation whose sender's user was deleted stays pending, sent by nobody."""
    org_id, _owner, token = await owned_org(seed)
    other_owner, _other_token = await seed.member_with_key(org_id, "owner")
    await db.execute(
        """INSERT INTO organization_invitations
               (organization_id, email, role, token_hash, invited_by, expires_at)
           VALUES ($1::uuid, 'orphan@example.test', 'member', 'h', $2, now() + interval '1 day')""",
        org_id,
        other_owner,
    )
    await db.execute("DELETE FROM users WHERE id = $1", other_owner)

    [listed] = (await pending(client, gateway, org_id, token)).body["invitations"]
    assert (listed["email"], listed["invited_by"], listed["invited_by_email"]) == (
        "orphan@example.test",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        ("member", "insufficient_role"),
        ("billing_manager", "insufficient_role"),
        (None, "not_a_member"),
    ],
)
async def test_only_owners_list_invitations(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    role: str | None,
    reason: str,
) -> None:
    """As for inviting: members and billing managers 403 `insufficient_role`, strangers
    `not_a_member`; the listing is not in the refusal."""
    org_id, _owner, owner_token = await owned_org(seed)
    await invite(client, gateway, org_id, owner_token, "secret@example.test")
    if role is None:
        token = await seed.key(await seed.user())
    else:
        _user, token = await seed.member_with_key(org_id, role)
    reply = await pending(client, gateway, org_id, token)
    assert_error(reply, 403, reason)
    assert "secret@example.test" not in str(reply.body)


async def test_listing_a_malformed_organization_is_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, token: str
) -> None:
    """A path organization that is not a UUID: 400 `invalid_organization_id`."""
    assert_error(await pending(client, gateway, "acme", token), 400, "invalid_organization_id")


# Revoking


async def test_a_revoked_invitation_cannot_be_accepted(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """204; the row is revoked, gone from the list and the status count; its link is 404
    `invitation_not_found` saying it was revoked, and no membership is made."""
    org_id, _owner, token = await owned_org(seed)
    _user, key = await invited_user(seed, "bob@example.test")
    invitation_id = await invited_id(client, gateway, org_id, token, "bob@example.test")
    link = await emailed_token(db, "bob@example.test")
    status_path = f"/api/organizations/{org_id}"
    status = await api(client, gateway, "GET", status_path, token=token)
    assert status.body["seats"]["pending_invitations"] == 1

    reply = await revoke(client, gateway, org_id, invitation_id, token)

    assert (reply.status, reply.body) == (204, None)
    assert await revoked_at(db, invitation_id) is not None
    assert (await pending(client, gateway, org_id, token)).body["invitations"] == []
    status = await api(client, gateway, "GET", status_path, token=token)
    assert status.body["seats"]["pending_invitations"] == 0
    error = assert_error(await accept(client, gateway, link, key), 404, "invitation_not_found")
    assert "revoked" in error["message"]
    assert await db.fetchval("SELECT count(*) FROM organization_memberships") == 1


async def test_revoking_frees_the_seat_after_the_trial(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """3 seats, 1 owner, 2 pending: a third invitation is 409 until one is revoked."""
    org_id, _owner, token = await owned_org(seed, age=AFTER_TRIAL)
    await seed.purchase(org_id, seat_count=3)
    first = await invited_id(client, gateway, org_id, token, "a@example.test")
    await invited_id(client, gateway, org_id, token, "b@example.test")
    refused = await invite(client, gateway, org_id, token, "c@example.test")
    assert assert_error(refused, 409, "seats_exhausted")["metadata"]["pending_invitations"] == 2

    assert (await revoke(client, gateway, org_id, first, token)).status == 204
    assert (await invite(client, gateway, org_id, token, "c@example.test")).status == 201
    emails = await db.fetch(
        "SELECT email FROM organization_invitations WHERE revoked_at IS NULL ORDER BY email"
    )
    assert [r["email"] for r in emails] == ["b@example.test", "c@example.test"]


async def test_another_organizations_invitation_is_not_found(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """An owner of one organization revoking another's invitation: 404, as for an unknown
    id, and the invitation stays pending and acceptable."""
    org_id, _owner, token = await owned_org(seed)
    other_org, _other_owner, other_token = await owned_org(seed, name="Other")
    _user, key = await invited_user(seed, "theirs@example.test")
    theirs = await invited_id(client, gateway, other_org, other_token, "theirs@example.test")

    cross = assert_error(
        await revoke(client, gateway, org_id, theirs, token), 404, "invitation_not_found"
    )
    unknown = assert_error(
        await revoke(client, gateway, org_id, "00000000-0000-4000-8000-000000000000", token),
        404,
        "invitation_not_found",
    )
    assert cross == unknown
    assert await revoked_at(db, theirs) is None
    link = await emailed_token(db, "theirs@example.test")
    assert (await accept(client, gateway, link, key)).status == 200


async def test_only_pending_invitations_are_revoked(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Revoked already, accepted or expired: 404 `invitation_not_found`, rows unchanged."""
    org_id, _owner, token = await owned_org(seed)
    _user, key = await invited_user(seed, "in@example.test")
    accepted = await invited_id(client, gateway, org_id, token, "in@example.test")
    await accept(client, gateway, await emailed_token(db, "in@example.test"), key)
    expired = await invited_id(client, gateway, org_id, token, "late@example.test")
    await db.execute(
        "UPDATE organization_invitations SET expires_at = now() - interval '1 second'"
        " WHERE id = $1::uuid",
        expired,
    )
    twice = await invited_id(client, gateway, org_id, token, "twice@example.test")
    assert (await revoke(client, gateway, org_id, twice, token)).status == 204
    first_revoked_at = await revoked_at(db, twice)

    for invitation_id in (twice, accepted, expired):
        reply = await revoke(client, gateway, org_id, invitation_id, token)
        assert_error(reply, 404, "invitation_not_found")
    assert await revoked_at(db, twice) == first_revoked_at
    assert await revoked_at(db, accepted) is None
    assert await revoked_at(db, expired) is None
    assert await db.fetchval("SELECT count(*) FROM organization_memberships") == 2


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        ("member", "insufficient_role"),
        ("billing_manager", "insufficient_role"),
        (None, "not_a_member"),
    ],
)
async def test_only_owners_revoke(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    role: str | None,
    reason: str,
) -> None:
    """Members and billing managers 403 `insufficient_role`, strangers `not_a_member`; the
    invitation stays pending."""
    org_id, _owner, owner_token = await owned_org(seed)
    invitation_id = await invited_id(client, gateway, org_id, owner_token, "x@example.test")
    if role is None:
        token = await seed.key(await seed.user())
    else:
        _user, token = await seed.member_with_key(org_id, role)
    assert_error(await revoke(client, gateway, org_id, invitation_id, token), 403, reason)
    assert await revoked_at(db, invitation_id) is None


@pytest.mark.parametrize(
    "invitation_id",
    [
        "nope",
        "12345",
        "0000000000004000800000000000000a",  # a UUID without its dashes
        "00000000-0000-4000-8000-00000000000g",
        "00000000-0000-4000-8000-000000000000-1",
    ],
)
async def test_a_malformed_invitation_id_is_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, invitation_id: str
) -> None:
    """Not an invitation id in canonical UUID form: 400 `invalid_request`."""
    org_id, _owner, token = await owned_org(seed)
    reply = await revoke(client, gateway, org_id, invitation_id, token)
    assert "invitation id" in assert_error(reply, 400, "invalid_request")["message"]


async def test_an_uppercase_invitation_id_is_the_same_invitation(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """UUIDs are case-insensitive: the uppercase id revokes the invitation."""
    org_id, _owner, token = await owned_org(seed)
    invitation_id = await invited_id(client, gateway, org_id, token, "up@example.test")
    assert (await revoke(client, gateway, org_id, invitation_id.upper(), token)).status == 204
    assert await revoked_at(db, invitation_id) is not None


async def test_revoking_while_accepting_has_one_winner(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Sent together: either the invitee joined and the revocation is 404, or the
    invitation is revoked and the acceptance is 404; never both, never neither."""
    org_id, _owner, token = await owned_org(seed)
    _user, key = await invited_user(seed, "race@example.test")
    invitation_id = await invited_id(client, gateway, org_id, token, "race@example.test")
    link = await emailed_token(db, "race@example.test")

    revoked, accepted = await asyncio.gather(
        revoke(client, gateway, org_id, invitation_id, token), accept(client, gateway, link, key)
    )

    assert sorted([revoked.status, accepted.status]) in ([200, 404], [204, 404])
    members = await db.fetchval("SELECT count(*) FROM organization_memberships")
    row = await db.fetchrow(
        "SELECT accepted_at, revoked_at FROM organization_invitations WHERE id = $1::uuid",
        invitation_id,
    )
    if accepted.status == 200:
        assert (members, row["revoked_at"]) == (2, None)
    else:
        assert (members, row["accepted_at"]) == (1, None)
        assert row["revoked_at"] is not None


# What an invitee refused for seats is told


async def test_an_invitee_without_a_seat_is_told_who_can_act(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Invited while trialing, accepting after the purchase filled every seat: 409
    `seats_exhausted` naming the owner or billing manager, not what the invitee cannot do."""
    org_id, _owner, token = await owned_org(seed)
    await seed.member_with_key(org_id, "member")
    _user, key = await invited_user(seed, "late@example.test")
    await invite(client, gateway, org_id, token, "late@example.test")
    await db.execute("UPDATE organizations SET free_trial_end_at = $1", datetime.now(UTC))
    await seed.purchase(org_id, seat_count=2)

    reply = await accept(client, gateway, await emailed_token(db, "late@example.test"), key)

    message = assert_error(reply, 409, "seats_exhausted")["message"]
    assert "An owner or billing manager of the organization must buy more seats" in message
    assert "pays for 2 seats and has 2 members" in message
    assert "Buy more seats on the billing page" not in message
    assert await db.fetchval("SELECT count(*) FROM organization_memberships") == 2


async def test_an_owner_without_a_seat_is_told_to_buy_or_revoke(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """The owner inviting past the seats is told what they can do themselves."""
    org_id, _owner, token = await owned_org(seed, age=AFTER_TRIAL)
    await seed.purchase(org_id, seat_count=2)
    await invite(client, gateway, org_id, token, "a@example.test")
    reply = await invite(client, gateway, org_id, token, "b@example.test")
    message = assert_error(reply, 409, "seats_exhausted")["message"]
    assert "has 1 member and 1 pending invitation" in message
    assert message.endswith(
        "Buy more seats on the billing page, or remove members or revoke pending invitations."
    )
