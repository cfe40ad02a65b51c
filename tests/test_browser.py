"""The organization pages in a real browser: headless Chromium (Debian's `chromium`
package) driven by Playwright, against a real gateway, PostgreSQL and the test Stripe
server. Playwright downloads no browser: it is pointed at /usr/bin/chromium.

A screenshot of every page visited is saved under the test's temporary folder
(`screenshots/`), and, when PAGES_SCREENSHOT_DIR is set, copied there too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect
from yarl import URL

from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import RunningFakeStripe, event_object
from tests.test_webhooks import deliver

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# As root, in a sandbox with no network: no sandbox of its own, nothing fetched on start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHECKOUT_PAGES = "https://checkout.stripe.test/**"
DAY = timedelta(days=1)
pytestmark = [pytest.mark.timeout(120), pytest.mark.stripe_set_up]


@pytest.fixture
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium"
            " (apt-get install -y chromium), or CHROMIUM_PATH naming another Chromium."
        )
    return CHROMIUM


@pytest.fixture
async def chromium(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


class Shots:
    """Screenshots of the pages a test visits, numbered in order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        copy_to = os.environ.get("PAGES_SCREENSHOT_DIR")
        self.copy_to = Path(copy_to) if copy_to else None
        if self.copy_to is not None:
            self.copy_to.mkdir(parents=True, exist_ok=True)
        self.taken: list[Path] = []

    async def take(self, page: Page, name: str) -> Path:
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        if self.copy_to is not None:
            await asyncio.to_thread(shutil.copy, path, self.copy_to / f"{name}.png")
        return path


@pytest.fixture
def shots(tmp_path: Path) -> Shots:
    return Shots(tmp_path / "screenshots")


async def new_page(chromium: Browser) -> Page:
    context = await chromium.new_context(viewport={"width": 1100, "height": 900})
    return await context.new_page()


async def sign_in(page: Page, billing_gateway: RunningGateway, token: str) -> None:
    await page.goto(f"{billing_gateway.url}/login")
    await page.fill("#api_key", token)
    await page.click("text=Sign in with the key")


async def banner_level(page: Page) -> str | None:
    banner = page.locator("[data-banner]")
    if await banner.count() == 0:
        return None
    return await banner.get_attribute("data-level")


async def border_width(page: Page) -> float:
    """The banner's border: what makes each level visibly louder than the one before."""
    width = await page.locator("[data-banner]").evaluate(
        "e => parseFloat(getComputedStyle(e).borderTopWidth)"
    )
    return float(width)


async def test_an_owner_creates_invites_revokes_subscribes_and_contacts_sales(
    chromium: Browser,
    billing_gateway: RunningGateway,
    stripe_server: RunningFakeStripe,
    seed: Seed,
    db: asyncpg.Connection,
    client: aiohttp.ClientSession,
    shots: Shots,
) -> None:
    org_id = await seed.org(credits_acquired_microdollars=0)
    _, token = await seed.member_with_key(org_id, "owner")
    page = await new_page(chromium)

    await page.goto(f"{billing_gateway.url}/organizations")  # not signed in: to sign-in, then back
    await expect(page).to_have_url(f"{billing_gateway.url}/login?next=/organizations")
    await shots.take(page, "login")
    await sign_in(page, billing_gateway, token)
    await expect(page).to_have_url(f"{billing_gateway.url}/organizations/{org_id}")
    assert await banner_level(page) == "info"
    await expect(page.locator("[data-credits]")).to_contain_text("Next step: buy credits.")
    await expect(page.locator("[data-seats]")).to_contain_text("unlimited during the trial")
    await expect(page.locator("[data-price]")).to_have_text(
        "$29 per seat per month, billed annually ($348)"
    )
    await shots.take(page, "organization")

    await page.fill("#invite-email", "lin@example.test")
    await page.click("[data-invite] button")
    await expect(page.locator("[data-notice]")).to_have_text("Invitation sent to lin@example.test.")
    await expect(page.locator('[data-invitation="lin@example.test"]')).to_be_visible()
    await shots.take(page, "invited")
    await page.click("text=Revoke")
    await expect(page.locator("[data-notice]")).to_contain_text("The invitation is revoked")
    await expect(page.locator('[data-invitation="lin@example.test"]')).to_have_count(0)
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM organization_invitations")

    # Subscribing: Stripe's Checkout page is played by the test, which pays as the customer
    # would, has the test Stripe server send its webhook, and returns to the success URL.
    async def pay_on_stripe(route: Route) -> None:
        session_id = route.request.url.rsplit("/", 1)[1]
        session = stripe_server.state.sessions[session_id]
        subscription = stripe_server.state.complete_checkout(session_id)
        stripe_server.state.add_invoice(subscription["id"], "paid")
        event = event_object("customer.subscription.created", subscription)
        status, body = await deliver(client, billing_gateway, event)
        assert status == 200, body
        # APP_URL (app.example.test) fronts this gateway's pages: back to them here.
        back = URL(session["success_url"])
        assert back.path == f"/organizations/{org_id}/billing"
        await route.fulfill(
            status=303, headers={"Location": f"{billing_gateway.url}{back.path_qs}"}
        )

    await page.route(CHECKOUT_PAGES, pay_on_stripe)
    await page.click("text=Subscription")
    await expect(page).to_have_url(f"{billing_gateway.url}/organizations/{org_id}/billing")
    await shots.take(page, "billing")
    await page.fill("#seats", "3")
    await page.click("[data-subscribe] button")
    await expect(page.locator("[data-notice]")).to_contain_text("Stripe has your payment details")
    await expect(page.locator("[data-seat-count]")).to_have_text("3")
    await expect(page.locator("[data-status]")).to_have_text("trialing")
    await expect(page.locator("[data-change-seats]")).to_be_visible()
    await shots.take(page, "billing-subscribed")

    await page.goto(f"{billing_gateway.url}/organizations/new")
    await page.fill("#name", "Initech")
    await page.check("input[value=enterprise]")
    await shots.take(page, "create")
    await page.click("text=Create the organization")
    await expect(page.locator("h1")).to_contain_text("Initech")
    enterprise_id = page.url.rsplit("/", 1)[1]
    await expect(page.locator("[data-price]")).to_have_text(
        "$299 per seat per month, billed annually ($3,588)"
    )
    await page.fill("#sso-message", "We use Okta")
    await page.click("text=Contact sales for SSO")
    await expect(page.locator("[data-notice]")).to_contain_text("Our sales team will contact you")
    await shots.take(page, "contact-sales")
    assert await db.fetchval("SELECT message FROM sales_contact_requests") == "We use Okta"

    # The trial runs out: the banner grows louder, each level more than the one before.
    widths = []
    for age_days, level in ((1, "info"), (25, "warning"), (28, "urgent"), (40, "blocking")):
        await db.execute(
            "UPDATE organizations SET created_at = now() - $2::interval WHERE id = $1::uuid",
            enterprise_id,
            timedelta(days=age_days),
        )
        await page.reload()
        assert await banner_level(page) == level
        widths.append(await border_width(page))
        await shots.take(page, f"banner-{level}")
    assert widths == sorted(set(widths)), widths
    await expect(page.locator("[data-locked]")).to_be_visible()  # blocked: credits locked


async def tab_to(page: Page, selector: str, limit: int = 40) -> None:
    """Press Tab until `selector` has the focus; fails when it never gets it."""
    target = page.locator(selector)
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await target.evaluate("e => e === document.activeElement"):
            return
    raise AssertionError(f"{selector} is not reachable with the keyboard")


async def test_the_main_flow_works_with_the_keyboard_alone(
    chromium: Browser,
    billing_gateway: RunningGateway,
    seed: Seed,
    db: asyncpg.Connection,
    shots: Shots,
) -> None:
    """Sign in, invite, revoke: Tab to each control, type, press Enter or Space; no mouse."""
    org_id = await seed.org()
    _, token = await seed.member_with_key(org_id, "owner")
    page = await new_page(chromium)
    await page.goto(f"{billing_gateway.url}/login")
    await tab_to(page, ".skip")  # the first stop skips the header
    await tab_to(page, "#api_key")
    await page.keyboard.type(token)
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{billing_gateway.url}/organizations/{org_id}")

    await tab_to(page, "#invite-email")
    await page.keyboard.type("kim@example.test")
    await tab_to(page, "#invite-role")
    await page.keyboard.press("ArrowDown")  # member → owner
    await tab_to(page, "[data-invite] button")
    await page.keyboard.press("Enter")
    await expect(page.locator("[data-notice]")).to_have_text("Invitation sent to kim@example.test.")
    focus_ring = await page.locator('[data-invitation="kim@example.test"] button').evaluate(
        "e => { e.focus(); return getComputedStyle(e).outlineStyle; }"
    )
    assert focus_ring != "none"
    await shots.take(page, "keyboard-invited")
    assert await db.fetchval("SELECT role FROM organization_invitations") == "owner"
    await tab_to(page, '[data-invitation="kim@example.test"] button')
    await page.keyboard.press("Space")
    await expect(page.locator('[data-invitation="kim@example.test"]')).to_have_count(0)

    await tab_to(page, "text=Sign out")
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{billing_gateway.url}/login")
    assert await db.fetchval("SELECT count(*) FROM web_sessions") == 0


async def test_a_member_sees_the_pages_without_the_owners_controls(
    chromium: Browser, billing_gateway: RunningGateway, seed: Seed, shots: Shots
) -> None:
    org_id = await seed.org(age=40 * DAY)
    await seed.member_with_key(org_id, "owner")
    _, token = await seed.member_with_key(org_id, "member")
    page = await new_page(chromium)
    await sign_in(page, billing_gateway, token)
    await expect(page).to_have_url(f"{billing_gateway.url}/organizations/{org_id}")
    assert await banner_level(page) == "blocking"
    await expect(page.locator("[data-banner]")).to_contain_text(
        "An owner or billing manager of the organization can fix this"
    )
    await expect(page.locator("[data-invite]")).to_have_count(0)
    await expect(page.locator("text=Buy credits")).to_have_count(0)
    await shots.take(page, "member-blocked")
    await page.goto(f"{billing_gateway.url}/organizations/{org_id}/billing")
    await expect(page.locator("main")).to_contain_text("Only owners and billing managers")
    await expect(page.locator("[data-subscribe]")).to_have_count(0)
