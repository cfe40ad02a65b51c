"""Seats end to end: inviting (unlimited while trialing), accepting, listing and removing.

A real gateway on a real port and real PostgreSQL; invitation tokens are read from the
emails the gateway queued (or delivered), as the invited person would read them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.accounts import (
    APP_URL,
    FAST_EMAIL,
    Mailbox,
    api,
    assert_error,
    chat_status,
    eventually,
    running_mailbox,
    to,
)
from tests.conftest import RunningGateway
from tests.factories import Seed

AFTER_TRIAL = timedelta(days=40)
ACCEPT_LINK = re.compile(re.escape(APP_URL) + r"/invitations/([A-Za-z0-9_-]+)")


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    """A running SMTP server for the test."""
    yield from running_mailbox()


async def invite(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    org_id: str,
    token: str,
    email: str,
    role: str | None = None,
) -> Any:
    body: dict[str, Any] = {"email": email}
    if role is not None:
        body["role"] = role
    path = f"/api/organizations/{org_id}/invitations"
    return await api(client, gateway, "POST", path, token=token, body=body)


async def accept(
    client: aiohttp.ClientSession, gateway: RunningGateway, invitation: str, token: str
) -> Any:
    return await api(client, gateway, "POST", f"/api/invitations/{invitation}/accept", token=token)


async def remove(
    client: aiohttp.ClientSession, gateway: RunningGateway, org_id: str, user_id: str, token: str
) -> Any:
    path = f"/api/organizations/{org_id}/members/{user_id}"
    return await api(client, gateway, "DELETE", path, token=token)


async def emailed_token(db: asyncpg.Connection, email: str) -> str:
    """The token in the latest invitation email queued for `email`."""
    body = await db.fetchval(
        "SELECT body_text FROM email_outbox WHERE kind = 'invitation' AND to_address = $1"
        " ORDER BY id DESC LIMIT 1",
        email,
    )
    match = ACCEPT_LINK.search(body)
    assert match is not None, body
    return match.group(1)


async def owned_org(seed: Seed, **org: Any) -> tuple[str, str, str]:
    """A new organization (keywords as `Seed.org`) and its owner's id and token."""
    org_id = await seed.org(**org)
    user_id, token = await seed.member_with_key(org_id, "owner")
    return org_id, user_id, token


async def invited_user(seed: Seed, email: str) -> tuple[str, str]:
    """A user with this email and an unbound key."""
    user_id = await seed.user(email)
    return user_id, await seed.key(user_id)


# Inviting


async def test_invitation_token_travels_only_by_email(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    mailbox: Mailbox,
) -> None:
    """201 without the token; the email carries the accept link; only its hash is stored."""
    gateway = await gateway_factory(SMTP_URL=mailbox.url, **FAST_EMAIL)
    org_id, _owner, token = await owned_org(seed, name="Acme")
    reply = await invite(client, gateway, org_id, token, "lin@example.test")

    assert reply.status == 201, reply.body
    invitation = reply.body["invitation"]
    assert set(invitation) == {"id", "email", "role", "expires_at"}
    assert (invitation["email"], invitation["role"]) == ("lin@example.test", "member")
    [sent] = await mailbox.wait_for(to("lin@example.test"))
    match = ACCEPT_LINK.search(sent.body)
    assert match is not None and "Acme" in sent.body
    secret = match.group(1)
    assert secret not in str(reply.body)
    row = await db.fetchrow("SELECT * FROM organization_invitations")
    assert row["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["expires_at"] - row["created_at"] == timedelta(days=7)


async def test_trial_invitations_are_unlimited(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """While trialing an owner invites 20 people; all are pending."""
    org_id, _owner, token = await owned_org(seed)
    for n in range(20):
        reply = await invite(client, gateway, org_id, token, f"dev{n}@example.test")
        assert reply.status == 201, reply.body
    status = await api(client, gateway, "GET", f"/api/organizations/{org_id}", token=token)
    assert status.body["seats"]["pending_invitations"] == 20
    assert status.body["seats"]["unlimited"] is True


async def test_after_the_trial_invitations_fit_the_purchased_seats(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """3 seats, 1 owner: two invitations fit, the third is 409 with the upgrade link."""
    org_id, _owner, token = await owned_org(seed, age=AFTER_TRIAL)
    await seed.purchase(org_id, seat_count=3)
    assert (await invite(client, gateway, org_id, token, "a@example.test")).status == 201
    assert (await invite(client, gateway, org_id, token, "b@example.test")).status == 201

    error = assert_error(
        await invite(client, gateway, org_id, token, "c@example.test"), 409, "seats_exhausted"
    )
    assert error["metadata"]["upgrade_url"] == f"{APP_URL}/organizations/{org_id}/billing"
    assert error["metadata"]["seats_purchased"] == 3
    reply = await invite(client, gateway, org_id, token, "money@example.test", "billing_manager")
    assert reply.status == 201


async def test_expired_trial_without_purchase_has_no_seats(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """After the trial with nothing bought, any seat-taking invitation is 409."""
    org_id, _owner, token = await owned_org(seed, age=timedelta(days=31))
    reply = await invite(client, gateway, org_id, token, "a@example.test", "owner")
    assert_error(reply, 409, "seats_exhausted")


async def test_reinviting_revokes_the_older_invitation(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """The same address invited again: the first link stops working, the second works."""
    org_id, _owner, token = await owned_org(seed)
    _user, key = await invited_user(seed, "sam@example.test")
    await invite(client, gateway, org_id, token, "sam@example.test")
    first = await emailed_token(db, "sam@example.test")
    await invite(client, gateway, org_id, token, "SAM@example.test", "billing_manager")
    second = await emailed_token(db, "SAM@example.test")

    assert_error(await accept(client, gateway, first, key), 404, "invitation_not_found")
    reply = await accept(client, gateway, second, key)
    assert reply.status == 200
    assert reply.body["membership"]["role"] == "billing_manager"
    assert await db.fetchval("SELECT count(*) FROM organization_invitations") == 2


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        ("member", "insufficient_role"),
        ("billing_manager", "insufficient_role"),
        (None, "not_a_member"),
    ],
)
async def test_only_owners_invite(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    role: str | None,
    reason: str,
) -> None:
    """Members and billing managers get `insufficient_role`, strangers `not_a_member`."""
    org_id = await seed.org()
    if role is None:
        token = await seed.key(await seed.user())
    else:
        _user, token = await seed.member_with_key(org_id, role)
    assert_error(await invite(client, gateway, org_id, token, "x@example.test"), 403, reason)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": "not an address"},
        {"email": "a@b.test, c@d.test"},
        {"email": "a@example.test", "role": "admin"},
    ],
)
async def test_bad_invitations_are_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, body: dict[str, Any]
) -> None:
    """A missing or malformed address, or an unknown role: 400."""
    org_id, _owner, token = await owned_org(seed)
    path = f"/api/organizations/{org_id}/invitations"
    reply = await api(client, gateway, "POST", path, token=token, body=body)
    assert_error(reply, 400, "invalid_request")


async def test_inviting_a_member_is_a_conflict(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Someone already in the organization: 409 `already_a_member`."""
    org_id, _owner, token = await owned_org(seed)
    await seed.member(org_id, await seed.user("in@example.test"))
    reply = await invite(client, gateway, org_id, token, "IN@example.test")
    assert_error(reply, 409, "already_a_member")


# Accepting


async def test_accepting_makes_a_member_who_can_use_the_proxy(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """The invited user's key accepts (email matched case-insensitively) and can then chat."""
    org_id, _owner, token = await owned_org(seed)
    user_id, key = await invited_user(seed, "bob@example.test")
    await invite(client, gateway, org_id, token, "Bob@Example.test")
    invitation = await emailed_token(db, "Bob@Example.test")
    assert await chat_status(client, gateway, key, org_id) == 403

    reply = await accept(client, gateway, invitation, key)
    assert reply.status == 200, reply.body
    membership = reply.body["membership"]
    assert (membership["organization_id"], membership["user_id"]) == (org_id, user_id)
    assert membership["role"] == "member"
    assert await chat_status(client, gateway, key, org_id) == 200
    row = await db.fetchrow("SELECT accepted_at, accepted_by FROM organization_invitations")
    assert row["accepted_at"] is not None and row["accepted_by"] == user_id
    assert_error(await accept(client, gateway, invitation, key), 404, "invitation_not_found")


async def test_accepting_with_another_users_key_is_refused(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """A key whose user has another email: 403 `invitation_email_mismatch`, no membership."""
    org_id, _owner, token = await owned_org(seed)
    await invite(client, gateway, org_id, token, "bob@example.test")
    _user, mallory = await invited_user(seed, "mallory@example.test")
    invitation = await emailed_token(db, "bob@example.test")
    reply = await accept(client, gateway, invitation, mallory)
    assert_error(reply, 403, "invitation_email_mismatch")
    assert await db.fetchval("SELECT count(*) FROM organization_memberships") == 1


async def test_expired_invitation_is_gone(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Past `expires_at`: 410 `invitation_expired`."""
    org_id, _owner, token = await owned_org(seed)
    _user, key = await invited_user(seed, "late@example.test")
    await invite(client, gateway, org_id, token, "late@example.test")
    await db.execute("UPDATE organization_invitations SET expires_at = now() - interval '1 second'")
    invitation = await emailed_token(db, "late@example.test")
    assert_error(await accept(client, gateway, invitation, key), 410, "invitation_expired")


async def test_unknown_invitation_is_not_found(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A token nobody issued: 404 `invitation_not_found`; no key: 401."""
    _user, key = await invited_user(seed, "who@example.test")
    assert_error(await accept(client, gateway, "made-up", key), 404, "invitation_not_found")
    reply = await api(client, gateway, "POST", "/api/invitations/made-up/accept")
    assert_error(reply, 401, "invalid_api_key")


async def test_accept_rechecks_seats_after_the_trial(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Invited while trialing, accepted after it with 2 seats: the second acceptance is 409."""
    org_id, _owner, token = await owned_org(seed)
    keys = [await invited_user(seed, f"p{n}@example.test") for n in range(2)]
    for n in range(2):
        await invite(client, gateway, org_id, token, f"p{n}@example.test")
    invitations = [await emailed_token(db, f"p{n}@example.test") for n in range(2)]
    await db.execute("UPDATE organizations SET free_trial_end_at = now() - interval '1 minute'")
    await seed.purchase(org_id, seat_count=2)

    assert (await accept(client, gateway, invitations[0], keys[0][1])).status == 200
    error = assert_error(
        await accept(client, gateway, invitations[1], keys[1][1]), 409, "seats_exhausted"
    )
    assert error["metadata"]["upgrade_url"].endswith(f"/organizations/{org_id}/billing")


# Listing and removing members


async def test_members_list_shows_invitations_to_owners_only(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Every member sees who is in; only owners see pending invitations."""
    org_id, owner_id, token = await owned_org(seed)
    member_id, member_token = await seed.member_with_key(org_id, "member")
    await invite(client, gateway, org_id, token, "soon@example.test")
    path = f"/api/organizations/{org_id}/members"

    as_owner = (await api(client, gateway, "GET", path, token=token)).body
    as_member = (await api(client, gateway, "GET", path, token=member_token)).body
    roles = {m["user_id"]: m["role"] for m in as_owner["members"]}
    assert roles == {owner_id: "owner", member_id: "member"}
    assert [i["email"] for i in as_owner["invitations"]] == ["soon@example.test"]
    assert as_member["members"] == as_owner["members"]
    assert "invitations" not in as_member


async def test_removed_member_is_refused_by_the_proxy_within_a_second(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """Removed through one gateway, refused (403) by another that had them cached."""
    first, second = await gateway_factory(), await gateway_factory()
    org_id, _owner, token = await owned_org(seed)
    member_id, member_token = await seed.member_with_key(org_id, "member")
    assert await chat_status(client, second, member_token, org_id) == 200

    assert (await remove(client, first, org_id, member_id, token)).status == 204
    await eventually(lambda: chat_status(client, second, member_token, org_id), 403, 1.0)
    assert await chat_status(client, first, member_token, org_id) == 403


async def test_removing_a_stranger_is_not_found(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A user who is not a member: 404 `member_not_found`."""
    org_id, _owner, token = await owned_org(seed)
    reply = await remove(client, gateway, org_id, await seed.user(), token)
    assert_error(reply, 404, "member_not_found")


async def test_the_last_owner_cannot_leave(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An owner leaves only while another owner remains: else 409 `last_owner`."""
    org_id, first_id, first = await owned_org(seed)
    assert_error(await remove(client, gateway, org_id, first_id, first), 409, "last_owner")
    second_id, second = await seed.member_with_key(org_id, "owner")
    assert (await remove(client, gateway, org_id, first_id, first)).status == 204
    assert_error(await remove(client, gateway, org_id, second_id, second), 409, "last_owner")


async def test_only_owners_remove_members(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A member cannot remove anyone: 403 `insufficient_role`."""
    org_id, owner_id, _token = await owned_org(seed)
    _member, member_token = await seed.member_with_key(org_id, "member")
    reply = await remove(client, gateway, org_id, owner_id, member_token)
    assert_error(reply, 403, "insufficient_role")
