"""Checkout: the parameters Stripe receives, one customer per organization (with the
owner's email), one live subscription, the trial kept when paying during it, the pinned
API version, idempotency, who may buy, the seat and amount bounds, and billing without
Stripe configured.

The gateway talks to `tests/fake_stripe.py` through the real `stripe` library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
import stripe

from gateway.accounts.checkout import store_customer
from gateway.accounts.stripe_client import STRIPE_API_VERSION
from gateway.plans import load_catalog
from tests.conftest import RunningGateway
from tests.factories import Seed, utcnow
from tests.fake_stripe import (
    API_VERSION,
    SECRET_KEY,
    RunningFakeStripe,
    add_catalog_prices,
    stripe_env,
)

APP_URL = "https://app.example.test"
CATALOG = load_catalog()


@pytest.fixture
def price_ids(stripe_server: RunningFakeStripe) -> dict[str, str]:
    """The catalog's prices, as `stripe-setup` would have created them; ids by lookup key."""
    return add_catalog_prices(stripe_server.state, CATALOG)


@pytest.fixture
async def billing_gateway(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe, price_ids: Any
) -> RunningGateway:
    """A gateway with Stripe configured, pointed at the fake."""
    gateway: RunningGateway = await gateway_factory(**stripe_env(stripe_server))
    return gateway


async def post(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str,
    token: str | None,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST JSON with the bearer token; return the status and the decoded body."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with client.post(gateway.url / path.lstrip("/"), json=body, headers=sent) as response:
        return response.status, json.loads(await response.read())


def subscription_path(org_id: str) -> str:
    return f"/api/organizations/{org_id}/subscription/checkout"


def credits_path(org_id: str) -> str:
    return f"/api/organizations/{org_id}/credits/checkout"


async def org_with_owner(seed: Seed, *, members: int = 0, **org: Any) -> tuple[str, str]:
    """An organization, its owner's token, and `members` more members."""
    org_id = await seed.org(**org)
    _, token = await seed.member_with_key(org_id, "owner")
    for _ in range(members):
        await seed.member_with_key(org_id, "member")
    return org_id, token


def session_requests(stripe_server: RunningFakeStripe) -> list[Any]:
    return stripe_server.state.requests_to("POST", "/v1/checkout/sessions")


async def test_subscription_checkout_sends_session_parameters(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
    price_ids: dict[str, str],
) -> None:
    """The session is a subscription for the plan's yearly price, naming the organization."""
    org_id, token = await org_with_owner(seed, members=2)
    status, body = await post(
        client, billing_gateway, subscription_path(org_id), token, {"seats": 3}
    )
    assert status == 200, body
    (request,) = session_requests(stripe_server)
    params = request.params
    customer = await db.fetchval(
        "SELECT stripe_customer_id FROM organizations WHERE id = $1", org_id
    )
    assert body == {
        "url": f"https://checkout.stripe.test/c/pay/{body['session_id']}",
        "session_id": body["session_id"],
    }
    assert params["mode"] == "subscription"
    assert params["customer"] == customer and customer.startswith("cus_")
    assert params["line_items"] == [{"price": price_ids["kilo_teams_seat_yearly"], "quantity": "3"}]
    assert params["client_reference_id"] == org_id
    assert params["metadata"] == {
        "organization_id": org_id,
        "plan": "teams",
        "billing_cycle": "yearly",
    }
    created_at = await db.fetchval("SELECT created_at FROM organizations WHERE id = $1", org_id)
    trial_ends_at = math.ceil((created_at + timedelta(days=30)).timestamp())
    assert params["subscription_data"] == {
        "metadata": {"organization_id": org_id, "plan": "teams"},
        "trial_end": str(trial_ends_at),
    }
    assert params["success_url"] == f"{APP_URL}/organizations/{org_id}/billing?checkout=success"
    assert params["cancel_url"] == f"{APP_URL}/organizations/{org_id}/billing?checkout=cancelled"
    assert request.idempotency_key is not None and request.idempotency_key.startswith(
        "subscription-"
    )
    assert request.authorization == f"Bearer {SECRET_KEY}"


async def test_enterprise_checkout_uses_the_enterprise_yearly_price(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    price_ids: dict[str, str],
) -> None:
    """The plan of the organization picks the price, found by its lookup key."""
    org_id, token = await org_with_owner(seed, plan="enterprise")
    status, _ = await post(client, billing_gateway, subscription_path(org_id), token, {"seats": 1})
    assert status == 200
    (request,) = session_requests(stripe_server)
    assert request.params["line_items"][0]["price"] == price_ids["kilo_enterprise_seat_yearly"]
    lookups = stripe_server.state.requests_to("GET", "/v1/prices")
    assert lookups[0].params["lookup_keys"] == ["kilo_enterprise_seat_yearly"]


async def test_one_customer_per_organization_across_checkouts(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """The customer is created once, with the org in its metadata, and reused after."""
    org_id, token = await org_with_owner(seed)
    for seats in (1, 2):
        status, _ = await post(
            client, billing_gateway, subscription_path(org_id), token, {"seats": seats}
        )
        assert status == 200
    status, _ = await post(client, billing_gateway, credits_path(org_id), token, {"amount_usd": 20})
    assert status == 200
    (created,) = stripe_server.state.requests_to("POST", "/v1/customers")
    assert created.params["metadata"] == {"organization_id": org_id}
    assert created.params["name"] == "Acme"
    assert created.idempotency_key == f"customer-{org_id}"
    stored = await db.fetchval("SELECT stripe_customer_id FROM organizations WHERE id = $1", org_id)
    assert {r.params["customer"] for r in session_requests(stripe_server)} == {stored}
    price_lookups = stripe_server.state.requests_to("GET", "/v1/prices")
    assert len(price_lookups) == 1, "price ids are cached per process"


async def test_existing_customer_is_kept_when_a_racing_checkout_stored_one(
    seed: Seed, db: asyncpg.Connection
) -> None:
    """Storing a customer never replaces one already stored; the stored one is returned."""
    org_id = await seed.org()
    assert await store_customer(db, org_id, "cus_first") == "cus_first"
    assert await store_customer(db, org_id, "cus_second") == "cus_first"


async def test_double_click_gets_the_same_session(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """Two identical checkouts send the same Idempotency-Key, so Stripe makes one session."""
    org_id, token = await org_with_owner(seed)
    first = await post(client, billing_gateway, subscription_path(org_id), token, {"seats": 2})
    second = await post(client, billing_gateway, subscription_path(org_id), token, {"seats": 2})
    assert first == second
    keys = {r.idempotency_key for r in session_requests(stripe_server)}
    assert len(keys) == 1
    assert len(stripe_server.state.sessions) == 1


async def test_client_idempotency_key_scopes_the_session(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """A client's Idempotency-Key header: same key, same session; another key, a new one."""
    org_id, token = await org_with_owner(seed)
    path = subscription_path(org_id)
    a1 = await post(client, billing_gateway, path, token, {"seats": 2}, {"Idempotency-Key": "a"})
    a2 = await post(client, billing_gateway, path, token, {"seats": 2}, {"Idempotency-Key": "a"})
    b = await post(client, billing_gateway, path, token, {"seats": 2}, {"Idempotency-Key": "b"})
    assert a1 == a2
    assert b[1]["session_id"] != a1[1]["session_id"]
    assert len(stripe_server.state.sessions) == 2


@pytest.mark.parametrize(
    ("seats", "status"),
    [
        (3, 200),  # exactly the members using seats
        (1000, 200),
        (2, 400),  # fewer than the members
        (1001, 400),
        (0, 400),
        (-1, 400),
        ("5", 400),
        (5.0, 400),
        (True, 400),
        (None, 400),
    ],
)
async def test_seats_must_cover_members_and_stay_within_1000(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    seats: Any,
    status: int,
) -> None:
    """Seats are a whole number from the members using seats to 1000; else 400 invalid_seats."""
    org_id, token = await org_with_owner(seed, members=2)
    await seed.member_with_key(org_id, "billing_manager")  # takes no seat
    got, body = await post(
        client, billing_gateway, subscription_path(org_id), token, {"seats": seats}
    )
    assert got == status, body
    if status == 400:
        assert body["error_type"] == "invalid_seats"
        assert body["error"]["metadata"]["min_seats"] == 3


@pytest.mark.parametrize(
    ("role", "status", "reason"),
    [
        ("owner", 200, None),
        ("billing_manager", 200, None),
        ("member", 403, "insufficient_role"),
        (None, 403, "not_a_member"),
    ],
)
async def test_only_owners_and_billing_managers_may_check_out(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    role: str | None,
    status: int,
    reason: str | None,
) -> None:
    """Owners and billing managers may buy seats and credits; members and strangers get 403."""
    org_id, _ = await org_with_owner(seed)
    if role is None:
        _, token = await seed.member_with_key(await seed.org(name="Other"), "owner")
    else:
        _, token = await seed.member_with_key(org_id, role)
    for path, body in (
        (subscription_path(org_id), {"seats": 2}),
        (credits_path(org_id), {"amount_usd": 10}),
    ):
        got, answer = await post(client, billing_gateway, path, token, body)
        assert got == status, answer
        assert answer.get("error_type") == reason


async def test_checkout_without_key_is_401(
    billing_gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An anonymous checkout is refused before anything reaches Stripe."""
    org_id, _ = await org_with_owner(seed)
    status, body = await post(
        client, billing_gateway, subscription_path(org_id), None, {"seats": 1}
    )
    assert (status, body["error_type"]) == (401, "invalid_api_key")


async def test_monthly_checkout_is_refused_by_default(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """A monthly subscription is 400 monthly_plan_unavailable, and Stripe is not asked."""
    org_id, token = await org_with_owner(seed)
    body = {"seats": 1, "billing_cycle": "monthly"}
    status, answer = await post(client, billing_gateway, subscription_path(org_id), token, body)
    assert (status, answer["error_type"]) == (400, "monthly_plan_unavailable")
    assert session_requests(stripe_server) == []


async def test_monthly_checkout_is_allowed_when_enabled(
    gateway_factory: Callable[..., Any],
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    price_ids: dict[str, str],
) -> None:
    """With MONTHLY_PLAN_ENABLED=true a monthly subscription uses the monthly price."""
    gateway = await gateway_factory(**stripe_env(stripe_server, MONTHLY_PLAN_ENABLED="true"))
    org_id, token = await org_with_owner(seed)
    body = {"seats": 1, "billing_cycle": "monthly"}
    status, answer = await post(client, gateway, subscription_path(org_id), token, body)
    assert status == 200, answer
    (request,) = session_requests(stripe_server)
    assert request.params["line_items"][0]["price"] == price_ids["kilo_teams_seat_monthly"]
    assert request.params["metadata"]["billing_cycle"] == "monthly"


async def test_unknown_billing_cycle_is_400(
    billing_gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Only yearly and monthly are billing cycles."""
    org_id, token = await org_with_owner(seed)
    body = {"seats": 1, "billing_cycle": "weekly"}
    status, answer = await post(client, billing_gateway, subscription_path(org_id), token, body)
    assert (status, answer["error_type"]) == (400, "invalid_request")


async def test_credits_checkout_sends_payment_parameters(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """Credits are a payment-mode session for the amount, with the org and amount in metadata."""
    org_id, token = await org_with_owner(seed)
    status, body = await post(
        client, billing_gateway, credits_path(org_id), token, {"amount_usd": 49.99}
    )
    assert status == 200, body
    assert body["url"].startswith("https://checkout.stripe.test/")
    (request,) = session_requests(stripe_server)
    params = request.params
    metadata = {"organization_id": org_id, "kind": "credits", "amount_microdollars": "49990000"}
    assert params["mode"] == "payment"
    assert params["line_items"] == [
        {
            "price_data": {
                "currency": "usd",
                "unit_amount": "4999",
                "product_data": {"name": "Kilo Code credits"},
            },
            "quantity": "1",
        }
    ]
    assert params["metadata"] == metadata
    assert params["payment_intent_data"] == {"metadata": metadata}
    assert params["client_reference_id"] == org_id
    assert params["success_url"] == f"{APP_URL}/organizations/{org_id}/billing?checkout=success"
    assert request.idempotency_key is not None and request.idempotency_key.startswith("credits-")


@pytest.mark.parametrize(
    ("amount", "status"),
    [
        (5, 200),
        (10000, 200),
        (19.99, 200),
        (4.99, 400),
        (10000.01, 400),
        (5.555, 400),
        ("50", 400),
        (True, 400),
        (None, 400),
    ],
)
async def test_credit_amount_is_between_5_and_10000_dollars(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    amount: Any,
    status: int,
) -> None:
    """Credits are bought in whole cents from $5 to $10,000; else 400 invalid_amount."""
    org_id, token = await org_with_owner(seed)
    got, body = await post(
        client, billing_gateway, credits_path(org_id), token, {"amount_usd": amount}
    )
    assert got == status, body
    if status == 400:
        assert body["error_type"] == "invalid_amount"


async def test_without_stripe_billing_is_503_and_the_proxy_works(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Without STRIPE_SECRET_KEY checkouts and the webhook are 503; the proxy still serves."""
    org_id, token = await org_with_owner(seed)
    for path, body in (
        (subscription_path(org_id), {"seats": 1}),
        (credits_path(org_id), {"amount_usd": 10}),
        ("/api/stripe/webhook", {}),
    ):
        status, answer = await post(client, gateway, path, token, body)
        assert (status, answer["error_type"]) == (503, "billing_unavailable")
        assert "STRIPE_SECRET_KEY" in answer["error"]["message"]
    chat = await post(client, gateway, "/api/openrouter/chat/completions", token, {"model": "m"})
    assert chat[0] == 200


async def test_stripe_error_is_502_and_never_shows_the_secret_key(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """A Stripe refusal is 502 billing_provider_error whose body does not quote Stripe."""
    org_id, token = await org_with_owner(seed)
    stripe_server.state.fail_next(
        401, "invalid_request_error", f"Invalid API Key provided: {SECRET_KEY}"
    )
    status, body = await post(
        client, billing_gateway, subscription_path(org_id), token, {"seats": 1}
    )
    assert (status, body["error_type"]) == (502, "billing_provider_error")
    assert SECRET_KEY not in json.dumps(body)
    assert "try again" in body["error"]["message"]


async def test_missing_price_is_503_naming_stripe_setup(
    gateway_factory: Callable[..., Any],
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """Before stripe-setup ran, a checkout says billing is not set up yet."""
    gateway = await gateway_factory(**stripe_env(stripe_server))
    org_id, token = await org_with_owner(seed, age=timedelta(days=3))
    status, body = await post(client, gateway, subscription_path(org_id), token, {"seats": 1})
    assert (status, body["error_type"]) == (503, "billing_unavailable")
    assert "stripe-setup" in body["error"]["message"]


async def test_customer_gets_the_owners_email_whoever_checks_out(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """The Stripe customer carries the owner's email (receipts, Stripe's trial reminders),
    also when a billing manager starts the first checkout."""
    org_id, _ = await org_with_owner(seed)
    owner_email = await db.fetchval(
        """SELECT u.email FROM organization_memberships m JOIN users u ON u.id = m.user_id
           WHERE m.organization_id = $1 AND m.role = 'owner'""",
        org_id,
    )
    _, manager = await seed.member_with_key(org_id, "billing_manager")
    path = subscription_path(org_id)
    status, _ = await post(client, billing_gateway, path, manager, {"seats": 1})
    assert status == 200
    (created,) = stripe_server.state.requests_to("POST", "/v1/customers")
    assert created.params["email"] == owner_email


async def test_every_stripe_request_names_the_pinned_api_version(
    gateway_factory: Callable[..., Any],
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    price_ids: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Customer, price lookup and session all say Stripe-Version: the gateway's pinned
    version, whatever version the installed library would default to."""
    # What an upgraded library would default to: its module-wide version and the one its
    # StripeClient takes when given none.
    monkeypatch.setattr(stripe, "api_version", "2099-01-01.future")
    monkeypatch.setattr(stripe._api_version._ApiVersion, "CURRENT", "2099-01-01.future")
    gateway = await gateway_factory(**stripe_env(stripe_server))
    org_id, token = await org_with_owner(seed)
    status, _ = await post(client, gateway, subscription_path(org_id), token, {"seats": 1})
    assert status == 200
    versions = {r.stripe_version for r in stripe_server.state.requests}
    assert versions == {STRIPE_API_VERSION} == {API_VERSION}


# One live subscription.


@pytest.mark.parametrize("purchase_status", ["active", "pending_cancel", "past_due"])
async def test_second_checkout_is_refused_while_a_subscription_is_live(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    purchase_status: str,
) -> None:
    """While a subscription is active (or trialing), past_due or pending_cancel, another
    checkout is 409 subscription_exists naming where to change the one there is; Stripe
    is not asked for a session."""
    org_id, token = await org_with_owner(seed, age=timedelta(days=40))
    await seed.purchase(org_id, seat_count=3, status=purchase_status)
    status, body = await post(
        client, billing_gateway, subscription_path(org_id), token, {"seats": 4}
    )
    assert (status, body["error_type"]) == (409, "subscription_exists")
    base = f"/api/organizations/{org_id}"
    message = body["error"]["message"]
    for endpoint in (
        f"POST {base}/billing/portal",
        f"GET {base}/subscription",
        f"POST {base}/subscription/seats",
    ):
        assert endpoint in message
    metadata = body["error"]["metadata"]
    assert metadata["subscription"]["status"] == purchase_status
    assert metadata["subscription"]["seat_count"] == 3
    assert session_requests(stripe_server) == []


@pytest.mark.parametrize(
    "ended",
    [
        pytest.param({"status": "ended"}, id="ended"),
        pytest.param({"expires_at": utcnow() - timedelta(days=1)}, id="period-over"),
    ],
)
async def test_checkout_is_allowed_once_the_subscription_is_over(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    ended: dict[str, Any],
) -> None:
    """An ended or lapsed subscription is no obstacle to subscribing again."""
    org_id, token = await org_with_owner(seed, age=timedelta(days=400))
    await seed.purchase(org_id, starts_at=utcnow() - timedelta(days=366), **ended)
    status, body = await post(
        client, billing_gateway, subscription_path(org_id), token, {"seats": 1}
    )
    assert status == 200, body


# Paying during the trial.


@pytest.mark.parametrize(
    ("trial_left", "charged_at_trial_end"),
    [
        pytest.param(timedelta(days=20), True, id="day-10-of-30"),
        pytest.param(timedelta(hours=49), True, id="49-hours-left"),
        pytest.param(timedelta(hours=47), False, id="47-hours-left"),
        pytest.param(timedelta(days=-1), False, id="trial-over"),
    ],
)
async def test_paying_during_the_trial_is_charged_when_it_ends(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    trial_left: timedelta,
    charged_at_trial_end: bool,
) -> None:
    """The subscription's trial ends when the organization's does (trial_end), so no free
    day is lost; with less than Stripe's 48 hours left, or after the trial, the first
    charge is at once."""
    trial_ends_at = utcnow() + trial_left
    org_id, token = await org_with_owner(seed, free_trial_end_at=trial_ends_at)
    status, body = await post(
        client, billing_gateway, subscription_path(org_id), token, {"seats": 1}
    )
    assert status == 200, body
    (request,) = session_requests(stripe_server)
    sent = request.params["subscription_data"].get("trial_end")
    expected = str(math.ceil(trial_ends_at.timestamp())) if charged_at_trial_end else None
    assert sent == expected


# Credits for an organization the rule refuses.


@pytest.mark.parametrize(
    ("age", "locked"),
    [
        pytest.param(timedelta(days=40), True, id="trial-over"),
        pytest.param(timedelta(days=3), False, id="trialing"),
    ],
)
async def test_credits_checkout_says_when_the_credits_stay_locked(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    age: timedelta,
    locked: bool,
) -> None:
    """An organization past its trial without a subscription still buys credits, and is
    told they stay locked until it subscribes; a trialing one is told nothing more."""
    org_id, token = await org_with_owner(seed, age=age)
    status, body = await post(
        client, billing_gateway, credits_path(org_id), token, {"amount_usd": 20}
    )
    assert status == 200, body
    assert len(session_requests(stripe_server)) == 1
    assert body["credits_locked"] is locked
    if locked:
        assert body["locked_reason"] == "trial_expired"
        assert "stay locked until the organization subscribes" in body["message"]
        assert f"{APP_URL}/organizations/{org_id}/billing" in body["message"]
    else:
        assert "message" not in body
