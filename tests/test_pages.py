"""The organization pages over HTTP: sign-in and its session, CSRF, roles, the banner's
levels, seats, prices, errors in words; against a real gateway and PostgreSQL (the real
browser tests are in test_browser.py)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from gateway import config as gateway_config
from tests.accounts import FAST_EMAIL, Mailbox, running_mailbox, to
from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import RunningFakeStripe, stripe_env
from tests.pages import Browser, Page

# Stripe as `stripe-setup` leaves it: products, prices, the portal configuration.
pytestmark = pytest.mark.stripe_set_up


@pytest.fixture
async def browser(gateway: RunningGateway) -> AsyncIterator[Browser]:
    b = Browser(gateway)
    yield b
    await b.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    yield from running_mailbox()


async def owner_of(seed: Seed, **org: Any) -> tuple[str, str]:
    """A new organization and its owner's key."""
    org_id = await seed.org(**org)
    _, token = await seed.member_with_key(org_id, "owner")
    return org_id, token


def set_cookie_of(page: Page, name: str) -> str:
    """The Set-Cookie header that set `name` (on the answer itself, not followed)."""
    for header in page.headers.getall("Set-Cookie", []):
        if header.startswith(f"{name}="):
            return str(header)
    raise AssertionError(f"no Set-Cookie for {name}: {page.headers}")


# --- Signing in -----------------------------------------------------------------------------


async def test_a_key_signs_in_to_a_server_side_session_behind_a_safe_cookie(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    """The key's user gets a session row (only the cookie's hash stored) and an HttpOnly,
    SameSite=Lax cookie; their only organization opens at once."""
    org_id, token = await owner_of(seed)
    login = await browser.get("/login")
    answer = await browser.post(
        "/login/key", {"csrf_token": login.csrf, "api_key": token}, follow=False
    )
    assert answer.status == 303
    cookie = set_cookie_of(answer, "kilo_session")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here
    value = browser.cookie("kilo_session")
    assert value is not None
    stored = await db.fetch("SELECT id_hash FROM web_sessions")
    assert [r["id_hash"] for r in stored] == [hashlib.sha256(value.encode()).hexdigest()]
    page = await browser.get("/organizations")
    assert page.status == 200 and page.url.path == f"/organizations/{org_id}"


async def test_the_cookie_is_secure_when_the_page_came_over_https(
    browser: Browser, seed: Seed
) -> None:
    _, token = await owner_of(seed)
    login = await browser.get("/login")
    https = {"X-Forwarded-Proto": "https"}
    answer = await browser.post(
        "/login/key", {"csrf_token": login.csrf, "api_key": token}, follow=False, headers=https
    )
    assert "Secure" in set_cookie_of(answer, "kilo_session")


async def test_a_bad_key_is_refused_in_words_and_opens_no_session(
    browser: Browser, db: asyncpg.Connection
) -> None:
    login = await browser.get("/login")
    page = await browser.post("/login/key", {"csrf_token": login.csrf, "api_key": "kilo_nope"})
    assert page.status == 401
    assert page.has("That is not a valid Kilo API key, or it was revoked.")
    assert await db.fetchval("SELECT count(*) FROM web_sessions") == 0


@pytest.mark.parametrize("csrf", [None, "forged"])
async def test_a_sign_in_form_without_its_csrf_value_is_refused(
    browser: Browser, seed: Seed, db: asyncpg.Connection, csrf: str | None
) -> None:
    _, token = await owner_of(seed)
    await browser.get("/login")  # the cookie half is there; the form half is not
    fields = {"api_key": token} if csrf is None else {"api_key": token, "csrf_token": csrf}
    page = await browser.post("/login/key", fields)
    assert page.status == 403 and 'data-reason="csrf_token_invalid"' in page.text
    assert await db.fetchval("SELECT count(*) FROM web_sessions") == 0


async def test_an_emailed_link_signs_in_once(
    gateway_factory: Callable[..., Any], seed: Seed, mailbox: Mailbox, db: asyncpg.Connection
) -> None:
    """The link arrives through the outbox and SMTP; its page asks for a click (mail
    scanners open links); it works once; no token is stored in clear."""
    gateway = await gateway_factory(SMTP_URL=mailbox.url, **FAST_EMAIL)
    org_id = await seed.org()
    user_id = await seed.user("grace@example.test")
    await seed.member(org_id, user_id, "owner")
    browser = Browser(gateway)
    try:
        login = await browser.get("/login")
        sent = await browser.post(
            "/login/email", {"csrf_token": login.csrf, "email": "Grace@Example.test"}
        )
        assert sent.status == 200 and "data-sent" in sent.text
        (message,) = await mailbox.wait_for(to("grace@example.test"))
        link = re.search(r"https://app\.example\.test(/login/link/\S+)", message.body)
        assert link is not None, message.body
        token = link.group(1).rsplit("/", 1)[1]
        assert (
            await db.fetchval("SELECT count(*) FROM web_sign_in_links WHERE token_hash = $1", token)
            == 0
        )
        assert (
            await db.fetchval("SELECT count(*) FROM web_sessions") == 0
        )  # opening signs in nobody
        confirm = await browser.get(link.group(1))
        page = await browser.post(
            "/login/link", {"csrf_token": confirm.csrf, "token": token, "next": "/organizations"}
        )
        assert page.status == 200 and page.url.path == f"/organizations/{org_id}"
        again = Browser(gateway)
        try:
            second = await again.get(link.group(1))
            reused = await again.post("/login/link", {"csrf_token": second.csrf, "token": token})
            assert reused.status == 401 and reused.has("already used")
        finally:
            await again.close()
    finally:
        await browser.close()


async def test_an_address_that_is_none_is_asked_again_on_the_sign_in_page(browser: Browser) -> None:
    login = await browser.get("/login")
    page = await browser.post("/login/email", {"csrf_token": login.csrf, "email": "nobody"})
    assert page.status == 400 and page.url.path == "/login/email"
    assert page.has("Enter the email address of your Kilo Code account.")
    assert 'id="email"' in page.text  # the form is there to try again


async def test_an_unknown_address_is_answered_the_same_and_gets_no_email(
    browser: Browser, db: asyncpg.Connection
) -> None:
    login = await browser.get("/login")
    page = await browser.post("/login/email", {"csrf_token": login.csrf, "email": "nobody@x.test"})
    assert page.status == 200 and "data-sent" in page.text
    assert await db.fetchval("SELECT count(*) FROM email_outbox") == 0
    assert await db.fetchval("SELECT count(*) FROM web_sign_in_links") == 0


async def test_the_email_form_cannot_flood_an_inbox(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    """Past five links a quarter of an hour, no more are made or sent; the page says the
    same (it never tells whether an address has an account)."""
    await seed.user("flood@example.test")
    for _ in range(8):
        login = await browser.get("/login")
        page = await browser.post(
            "/login/email", {"csrf_token": login.csrf, "email": "flood@example.test"}
        )
        assert page.status == 200 and "data-sent" in page.text
    assert await db.fetchval("SELECT count(*) FROM web_sign_in_links") == 5
    assert await db.fetchval("SELECT count(*) FROM email_outbox WHERE kind = 'sign_in'") == 5


async def test_sign_out_ends_the_session_everywhere(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, token = await owner_of(seed)
    page = await browser.sign_in(token)
    copied = browser.cookie("kilo_session")
    out = await browser.submit(page, "/logout")
    assert out.url.path == "/login"
    assert await db.fetchval("SELECT count(*) FROM web_sessions") == 0
    thief = Browser(browser.gateway)
    try:
        thief.session.cookie_jar.update_cookies({"kilo_session": copied or ""}, browser.gateway.url)
        stolen = await thief.get(f"/organizations/{org_id}")
        assert stolen.url.path == "/login"
    finally:
        await thief.close()


async def test_an_expired_session_sends_the_browser_to_sign_in_and_back(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, token = await owner_of(seed)
    await browser.sign_in(token)
    await db.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second'")
    page = await browser.get(f"/organizations/{org_id}/billing")
    assert page.url.path == "/login"
    assert page.url.query["next"] == f"/organizations/{org_id}/billing"
    back = await browser.post(
        "/login/key", {"csrf_token": page.csrf, "api_key": token, "next": page.url.query["next"]}
    )
    assert back.url.path == f"/organizations/{org_id}/billing"


async def test_a_form_posted_after_the_session_ended_signs_in_back_to_its_page(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, token = await owner_of(seed)
    page = await browser.sign_in(token)
    await db.execute("DELETE FROM web_sessions")
    answer = await browser.submit(
        page, f"/organizations/{org_id}/invitations", {"email": "a@b.test"}
    )
    assert answer.url.path == "/login"
    assert answer.url.query["next"] == f"/organizations/{org_id}"
    assert await db.fetchval("SELECT count(*) FROM organization_invitations") == 0


@pytest.mark.parametrize("next_path", ["//evil.test/x", "https://evil.test/", "/\\evil.test"])
async def test_sign_in_never_redirects_off_the_site(
    browser: Browser, seed: Seed, next_path: str
) -> None:
    _, token = await owner_of(seed)
    login = await browser.get("/login")
    answer = await browser.post(
        "/login/key",
        {"csrf_token": login.csrf, "api_key": token, "next": next_path},
        follow=False,
    )
    assert answer.headers["Location"] == "/organizations"


# --- Forms, roles, errors -------------------------------------------------------------------


@pytest.mark.parametrize("csrf", [None, "forged"])
async def test_a_form_post_without_the_sessions_csrf_token_changes_nothing(
    browser: Browser, seed: Seed, db: asyncpg.Connection, csrf: str | None
) -> None:
    org_id, token = await owner_of(seed)
    await browser.sign_in(token)
    fields = (
        {"email": "x@example.test"}
        if csrf is None
        else {"email": "x@example.test", "csrf_token": csrf}
    )
    page = await browser.post(f"/organizations/{org_id}/invitations", fields)
    assert page.status == 403 and 'data-reason="csrf_token_invalid"' in page.text
    assert await db.fetchval("SELECT count(*) FROM organization_invitations") == 0


async def test_owners_invite_and_revoke_from_the_page(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, token = await owner_of(seed)
    page = await browser.sign_in(token)
    invited = await browser.submit(
        page,
        f"/organizations/{org_id}/invitations",
        {"email": "lin@example.test", "role": "member"},
    )
    assert invited.has("Invitation sent to lin@example.test.")
    assert 'data-invitation="lin@example.test"' in invited.text
    invitation_id = await db.fetchval("SELECT id::text FROM organization_invitations")
    revoked = await browser.submit(
        invited, f"/organizations/{org_id}/invitations/{invitation_id}/revoke"
    )
    assert revoked.has("The invitation is revoked")
    assert 'data-invitation="lin@example.test"' not in revoked.text
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM organization_invitations")


async def test_a_refused_action_is_said_on_the_page_in_words(browser: Browser, seed: Seed) -> None:
    org_id, token = await owner_of(seed)
    page = await browser.sign_in(token)
    refused = await browser.submit(
        page, f"/organizations/{org_id}/invitations", {"email": "not an address"}
    )
    assert refused.status == 200 and refused.url.path == f"/organizations/{org_id}"
    assert refused.has("'email' must be an email address, like ada@example.com.")
    assert "notice-error" in refused.text


@pytest.mark.parametrize(
    ("role", "invites", "pays"),
    [("owner", True, True), ("billing_manager", False, True), ("member", False, False)],
)
async def test_each_role_sees_only_what_it_may_do(
    gateway: RunningGateway, seed: Seed, role: str, invites: bool, pays: bool
) -> None:
    org_id = await seed.org()
    await seed.member_with_key(org_id, "owner")
    _, token = await seed.member_with_key(org_id, role)
    browser = Browser(gateway)
    try:
        page = await browser.sign_in(token)
        assert page.url.path == f"/organizations/{org_id}"
        assert ("data-invite" in page.text) is invites
        assert ("Buy credits" in page.text) is pays
        billing = await browser.get(f"/organizations/{org_id}/billing")
        assert billing.status == 200
        assert billing.has("Only owners and billing managers") is not pays
    finally:
        await browser.close()


async def test_a_member_posting_an_owners_form_is_refused_and_nothing_changes(
    gateway: RunningGateway, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id = await seed.org()
    _, token = await seed.member_with_key(org_id, "member")
    browser = Browser(gateway)
    try:
        page = await browser.sign_in(token)
        refused = await browser.submit(
            page, f"/organizations/{org_id}/invitations", {"email": "z@example.test"}
        )
        assert refused.has("Only owners of this organization may do this.")
        assert await db.fetchval("SELECT count(*) FROM organization_invitations") == 0
    finally:
        await browser.close()


async def test_someone_elses_organization_is_a_403_page_not_a_traceback(
    browser: Browser, seed: Seed
) -> None:
    _, token = await owner_of(seed)
    other = await seed.org(name="Other")
    await browser.sign_in(token)
    page = await browser.get(f"/organizations/{other}")
    assert page.status == 403 and page.headers["Content-Type"].startswith("text/html")
    assert page.has("You are not a member of this organization.")
    assert "Traceback" not in page.text


async def test_pages_say_no_to_framing_scripts_and_caching(browser: Browser) -> None:
    page = await browser.get("/login")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    assert "<script" not in page.text


# --- What the organization page shows -------------------------------------------------------


@pytest.mark.parametrize(
    ("age_days", "level"),
    [(1, "info"), (25, "warning"), (28, "urgent"), (40, "blocking")],
)
async def test_the_banner_grows_louder_as_the_trial_ends(
    browser: Browser, seed: Seed, age_days: int, level: str
) -> None:
    _org_id, token = await owner_of(seed, age=timedelta(days=age_days))
    page = await browser.sign_in(token)
    assert f'data-level="{level}"' in page.text
    assert f"banner-{level}" in page.text
    assert ("data-locked" in page.text) is (level == "blocking")


async def test_a_blocked_organization_is_told_the_reason_and_the_way_out(
    browser: Browser, seed: Seed
) -> None:
    _, token = await owner_of(seed, age=timedelta(days=40))
    page = await browser.sign_in(token)
    assert page.has("Your free trial has ended") or page.has("trial")
    assert page.has("Locked: your credits stay yours")
    assert 'role="alert"' in page.text and "Go to the subscription page" in page.text


async def test_a_new_organization_is_told_to_buy_credits_with_seats_unlimited(
    browser: Browser, seed: Seed
) -> None:
    _, token = await owner_of(seed, credits_acquired_microdollars=0)
    page = await browser.sign_in(token)
    assert page.has("Next step: buy credits.")
    assert "card callout" in page.text
    assert page.has("1 used · unlimited during the trial")
    assert page.has("$29 per seat per month, billed annually ($348)")


async def test_a_paying_organization_shows_seats_used_of_purchased(
    browser: Browser, seed: Seed
) -> None:
    org_id, token = await owner_of(seed, age=timedelta(days=40))
    await seed.member_with_key(org_id, "member")
    await seed.purchase(org_id, seat_count=5)
    page = await browser.sign_in(token)
    assert page.has("2 used of 5 purchased")
    assert "data-banner" not in page.text


async def test_enterprise_shows_its_price_and_contact_sales_for_sso(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, token = await owner_of(seed, plan="enterprise")
    page = await browser.sign_in(token)
    assert page.has("$299 per seat per month, billed annually ($3,588)")
    sent = await browser.submit(page, f"/organizations/{org_id}/sso", {"message": "We use Okta"})
    assert sent.has("Our sales team will contact you at")
    row = await db.fetchrow("SELECT topic, message FROM sales_contact_requests")
    assert (row["topic"], row["message"]) == ("sso", "We use Okta")


async def test_teams_organizations_have_no_sso_form(browser: Browser, seed: Seed) -> None:
    _, token = await owner_of(seed)
    page = await browser.sign_in(token)
    assert "Contact sales for SSO" not in page.text


async def test_creating_an_organization_lands_on_its_page(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    _, token = await owner_of(seed)
    await browser.sign_in(token)
    form = await browser.get("/organizations/new")
    assert "seat" not in form.text.lower().split("<form")[1].split("</form>")[0].replace(
        "per seat", ""
    )
    page = await browser.submit(form, "/organizations", {"name": "Initech", "plan": "enterprise"})
    row = await db.fetchrow("SELECT id::text, plan FROM organizations WHERE name = 'Initech'")
    assert row["plan"] == "enterprise"
    assert page.url.path == f"/organizations/{row['id']}"
    assert page.has("Initech is created") and 'data-level="info"' in page.text


# --- Invitations and billing ----------------------------------------------------------------


async def test_an_invitee_accepts_on_the_invitation_page(
    gateway: RunningGateway, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, owner = await owner_of(seed)
    owner_browser, invitee_browser = Browser(gateway), Browser(gateway)
    try:
        page = await owner_browser.sign_in(owner)
        await owner_browser.submit(
            page, f"/organizations/{org_id}/invitations", {"email": "lin@example.test"}
        )
        body = await db.fetchval("SELECT body_text FROM email_outbox WHERE kind = 'invitation'")
        link = re.search(r"https://app\.example\.test(/invitations/\S+)", body)
        assert link is not None
        user_id = await seed.user("lin@example.test")
        token = await seed.key(user_id)
        invitation = await invitee_browser.get(link.group(1))
        assert invitation.url.path == "/login"  # sign in first, then back to the invitation
        back = await invitee_browser.post(
            "/login/key",
            {"csrf_token": invitation.csrf, "api_key": token, "next": invitation.url.query["next"]},
        )
        assert back.url.path == link.group(1)
        joined = await invitee_browser.submit(back, f"{link.group(1)}/accept")
        assert joined.url.path == f"/organizations/{org_id}"
        assert joined.has("you are now a member")
        assert (
            await db.fetchval(
                "SELECT role FROM organization_memberships WHERE user_id = $1", user_id
            )
            == "member"
        )
    finally:
        await owner_browser.close()
        await invitee_browser.close()


async def test_the_402s_billing_link_opens_the_subscription_page_when_app_url_is_the_gateway(
    gateway_factory: Callable[..., Any], seed: Seed, client: Any
) -> None:
    first = await gateway_factory()
    gateway = await gateway_factory(APP_URL=str(first.url))
    await first.close()
    org_id, token = await owner_of(seed, age=timedelta(days=40))
    async with client.post(
        gateway.url / "api/openrouter/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status == 402
        link = (await response.json())["error"]["buyCreditsUrl"]
    assert link == f"{first.url}/organizations/{org_id}/billing"
    browser = Browser(gateway)
    try:
        await browser.sign_in(token)
        page = await browser.get(f"/organizations/{org_id}/billing")
        assert page.status == 200 and "data-subscription" in page.text
    finally:
        await browser.close()


def test_the_embedded_set_up_links_to_its_own_pages() -> None:
    """No DATABASE_URL and no APP_URL: the links open this gateway's pages; an APP_URL
    or a real database keeps the configured or production address."""
    base = {"OPENROUTER_API_KEY": "k", "GATEWAY_PORT": "8080"}
    assert gateway_config.from_env(base).app_url == "http://localhost:8080"
    assert gateway_config.from_env({**base, "GATEWAY_HOST": "127.0.0.2"}).app_url == (
        "http://127.0.0.2:8080"
    )
    assert (
        gateway_config.from_env({**base, "APP_URL": "https://x.test"}).app_url == "https://x.test"
    )
    with_db = {**base, "DATABASE_URL": "postgresql://db/x"}
    assert gateway_config.from_env(with_db).app_url == "https://app.kilocode.ai"


async def test_subscribing_goes_to_stripe_checkout_for_the_seats_asked(
    billing_gateway: RunningGateway, stripe_server: RunningFakeStripe, seed: Seed
) -> None:
    org_id, token = await owner_of(seed)
    browser = Browser(billing_gateway)
    try:
        await browser.sign_in(token)
        billing = await browser.get(f"/organizations/{org_id}/billing")
        assert billing.has("Billed annually.") and "billing_cycle" in billing.text
        answer = await browser.post(
            f"/organizations/{org_id}/billing/subscribe",
            {"csrf_token": billing.csrf, "seats": "3", "billing_cycle": "yearly"},
            follow=False,
        )
        assert answer.status == 303
        (session,) = stripe_server.state.sessions.values()
        assert answer.headers["Location"] == session["url"]
        assert stripe_server.state.line_items[session["id"]][0]["quantity"] == "3"
        too_few = await browser.post(
            f"/organizations/{org_id}/billing/subscribe",
            {"csrf_token": billing.csrf, "seats": "0"},
        )
        assert too_few.url.path == f"/organizations/{org_id}/billing"
        assert too_few.has("'seats' must be a whole number from 1 to 1000")
    finally:
        await browser.close()


async def test_monthly_is_offered_only_behind_its_flag(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe, seed: Seed
) -> None:
    org_id, token = await owner_of(seed)
    for enabled in (False, True):
        gateway = await gateway_factory(
            **stripe_env(stripe_server), MONTHLY_PLAN_ENABLED=str(enabled).lower()
        )
        browser = Browser(gateway)
        try:
            await browser.sign_in(token)
            billing = await browser.get(f"/organizations/{org_id}/billing")
            assert ('value="monthly"' in billing.text) is enabled
        finally:
            await browser.close()


async def test_a_failed_payment_is_shown_loudly_on_the_subscription_page(
    browser: Browser, seed: Seed, db: asyncpg.Connection
) -> None:
    org_id, token = await owner_of(seed, age=timedelta(days=40))
    await seed.purchase(org_id, status="past_due")
    await db.execute(
        "UPDATE organization_seats_purchases SET payment_failed_at = now() - interval '1 day'"
    )
    await browser.sign_in(token)
    page = await browser.get(f"/organizations/{org_id}/billing")
    assert "data-payment-failed" in page.text and "banner-blocking" in page.text
    assert page.has("Your payment failed") and page.has("Update the card")
