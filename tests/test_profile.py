"""What the Kilo clients ask besides completions: profile, user, balance, defaults, and the
organization-mode model list, against a real gateway, database and fake OpenRouter."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import ORGANIZATION_HEADER
from tests.accounts import api, assert_error
from tests.conftest import RunningGateway
from tests.factories import Seed

MODELS = "/api/openrouter/models"


def org_path(org: str, tail: str) -> str:
    return f"/api/organizations/{org}/{tail}"


async def test_profile_names_the_user_and_every_organization_with_its_role(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """`GET /api/profile` is Kilo's shape: the user, and each organization with the role."""
    acme, globex = await seed.org(name="Acme"), await seed.org(name="Globex")
    user, token = await seed.member_with_key(acme, role="owner")
    await seed.member(globex, user, role="billing_manager")
    await db.execute(
        "UPDATE users SET name = 'Ada', image_url = 'https://img.test/a.png' WHERE id = $1", user
    )
    email = await db.fetchval("SELECT email FROM users WHERE id = $1", user)

    reply = await api(client, gateway, "GET", "/api/profile", token=token)

    assert reply.status == 200
    assert reply.body == {
        "user": {"id": user, "email": email, "name": "Ada", "image": "https://img.test/a.png"},
        "organizations": [
            {"id": acme, "name": "Acme", "role": "owner"},
            {"id": globex, "name": "Globex", "role": "billing_manager"},
        ],
    }
    user_reply = await api(client, gateway, "GET", "/api/user", token=token)
    assert user_reply.status == 200
    assert user_reply.body == reply.body["user"]


@pytest.mark.parametrize("path", ["/api/profile", "/api/user", "/api/profile/balance"])
async def test_unknown_and_revoked_keys_are_401(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    path: str,
) -> None:
    """No profile for a key that is not a live one."""
    org = await seed.org()
    user, token = await seed.member_with_key(org)
    assert_error(await api(client, gateway, "GET", path, token="kilo_nope"), 401, "invalid_api_key")
    assert_error(await api(client, gateway, "GET", path), 401, "invalid_api_key")
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", user)
    assert_error(await api(client, gateway, "GET", path, token=token), 401, "invalid_api_key")


async def test_balance_is_the_chosen_organizations_credits(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """The header picks the organization, else the user's only one; spent credits count."""
    rich = await seed.org(credits_acquired_microdollars=12_500_000)
    broke = await seed.org(
        credits_acquired_microdollars=1_000_000, credits_used_microdollars=3_000_000
    )
    user, token = await seed.member_with_key(rich)

    only = await api(client, gateway, "GET", "/api/profile/balance", token=token)
    assert only.status == 200
    assert only.body == {"balance": 12.5, "isDepleted": False}

    await seed.member(broke, user)
    chosen = await api(
        client,
        gateway,
        "GET",
        "/api/profile/balance",
        token=token,
        headers={ORGANIZATION_HEADER: broke},
    )
    assert chosen.body == {"balance": -2.0, "isDepleted": True}
    unchosen = await api(client, gateway, "GET", "/api/profile/balance", token=token)
    error = assert_error(unchosen, 400, "organization_required")
    assert "KILO_ORG_ID" in error["message"]


async def test_balance_of_another_organization_is_403(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A non-member asking for an organization's balance gets the 403 envelope."""
    mine, theirs = await seed.org(), await seed.org()
    _user, token = await seed.member_with_key(mine)
    reply = await api(
        client,
        gateway,
        "GET",
        "/api/profile/balance",
        token=token,
        headers={ORGANIZATION_HEADER: theirs},
    )
    assert_error(reply, 403, "not_a_member")


async def test_defaults_come_from_configuration(
    gateway_factory, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """`/api/defaults` (with or without a key) and the organization's defaults answer the
    configured models; a bad key is 401, a non-member 403."""
    gateway = await gateway_factory(DEFAULT_MODEL="openai/gpt-4o", DEFAULT_FREE_MODEL="x/y:free")
    org, other = await seed.org(), await seed.org()
    _user, token = await seed.member_with_key(org, role="member")
    expected = {"defaultModel": "openai/gpt-4o", "defaultFreeModel": "x/y:free"}

    for reply in [
        await api(client, gateway, "GET", "/api/defaults"),
        await api(client, gateway, "GET", "/api/defaults", token=token),
        await api(client, gateway, "GET", org_path(org, "defaults"), token=token),
    ]:
        assert (reply.status, reply.body) == (200, expected)
    bad = await api(client, gateway, "GET", "/api/defaults", token="kilo_nope")
    assert_error(bad, 401, "invalid_api_key")
    stranger = await api(client, gateway, "GET", org_path(other, "defaults"), token=token)
    assert_error(stranger, 403, "not_a_member")


@pytest.mark.parametrize("role", ["owner", "member", "billing_manager"])
async def test_organization_models_are_openrouters_list_for_every_member(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    role: str,
) -> None:
    """Organization mode's model list is byte for byte the proxy route's, for any role;
    the per-organization modes list is empty."""
    org = await seed.org()
    _user, token = await seed.member_with_key(org, role=role)
    headers = {"Authorization": f"Bearer {token}"}

    async with client.get(gateway.url.with_path(org_path(org, "models")), headers=headers) as r:
        by_org = (r.status, r.headers["Content-Type"], await r.read())
    async with client.get(gateway.url.with_path(MODELS), headers=headers) as r:
        by_proxy = (r.status, r.headers["Content-Type"], await r.read())
    async with client.get(upstream.url + "/models") as r:
        direct = await r.read()

    assert by_org == by_proxy
    assert by_org[0] == 200 and by_org[2] == direct
    modes = await api(client, gateway, "GET", org_path(org, "modes"), token=token)
    assert (modes.status, modes.body) == (200, {"modes": []})


async def test_the_model_list_is_fetched_once_for_both_routes(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """One upstream request serves many callers of both routes within the TTL; another
    query string is another list."""
    org = await seed.org()
    _user, token = await seed.member_with_key(org)
    headers = {"Authorization": f"Bearer {token}"}
    before = upstream.recorder.received

    for path in [MODELS, org_path(org, "models"), MODELS, org_path(org, "models")]:
        async with client.get(gateway.url.with_path(path), headers=headers) as r:
            assert r.status == 200
    assert upstream.recorder.received == before + 1
    async with client.get(
        gateway.url.with_path(MODELS).with_query(supported_parameters="tools"), headers=headers
    ) as r:
        assert r.status == 200
    assert upstream.recorder.received == before + 2
    assert upstream.recorder.last.query_string == "supported_parameters=tools"
    assert upstream.recorder.last.headers["Authorization"] != f"Bearer {token}"


async def test_organization_listings_refuse_strangers_and_bad_keys(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A non-member gets 403, a bad key 401, a malformed id 400: never the list."""
    mine, theirs = await seed.org(), await seed.org()
    _user, token = await seed.member_with_key(mine)
    for tail in ["models", "modes", "defaults"]:
        stranger = await api(client, gateway, "GET", org_path(theirs, tail), token=token)
        assert_error(stranger, 403, "not_a_member")
        bad = await api(client, gateway, "GET", org_path(mine, tail), token="kilo_nope")
        assert_error(bad, 401, "invalid_api_key")
        malformed = await api(client, gateway, "GET", org_path("not-a-uuid", tail), token=token)
        assert_error(malformed, 400, "invalid_organization_id")
