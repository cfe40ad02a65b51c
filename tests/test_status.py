"""The pure status logic: days left, call-to-action levels, reminder stages, seats, pricing.

Times are relative to the trial's end `END`; a purchase, when there is one, is active
and covers the instant judged unless the case says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.access.refusals import refusal_message
from gateway.access.rule import SECONDS_PER_DAY, OrgFacts, Purchase, decide
from gateway.accounts.status import (
    Level,
    ReminderStage,
    call_to_action,
    call_to_action_level,
    days_remaining,
    has_seat_for,
    human_time,
    organization_status,
    plan_pricing,
    reminder_stage,
    seats_unlimited,
    trial_stage,
)
from gateway.plans import load_catalog

DAY = SECONDS_PER_DAY
TRIAL_DAYS = 30
GRACE_DAYS = 14
CREATED = 1_800_000_000.0
END = CREATED + TRIAL_DAYS * DAY
CATALOG = load_catalog()
APP_URL = "https://app.example.test"
ORG = "00000000-0000-4000-8000-000000000001"


def purchase(status: str = "active", seats: int = 5, **times: float) -> Purchase:
    """A yearly purchase from a year before END to a year after, unless told otherwise."""
    starts = times.get("starts_at", END - 365 * DAY)
    expires = times.get("expires_at", END + 365 * DAY)
    return Purchase(status, seats, starts, expires, "yearly")


def failed(failed_at: float, seats: int = 5) -> Purchase:
    """A past_due purchase whose payment failed at `failed_at` (Stripe moved its period on)."""
    return dataclasses.replace(
        purchase("past_due", seats, starts_at=failed_at, expires_at=failed_at + 365 * DAY),
        payment_failed_at=failed_at,
    )


def facts(**changes: Any) -> OrgFacts:
    """A teams organization created at CREATED with one member, no purchase."""
    base = OrgFacts(
        organization_id=ORG,
        created_at=CREATED,
        free_trial_end_at=None,
        require_seats=True,
        seats_used=1,
    )
    # `purchase`: the organization's one subscription, the common case.
    if "purchase" in changes:
        single = changes.pop("purchase")
        changes["purchases"] = () if single is None else (single,)
    return dataclasses.replace(base, **changes)


def purchased_seats(org: OrgFacts, now: float) -> int:
    """The seats the status page shows as purchased at `now`."""
    return int(status(org, now)["seats"]["purchased"])


def level_at(org: OrgFacts, now: float) -> Level:
    return call_to_action_level(org, decide(org, now, TRIAL_DAYS, GRACE_DAYS), now)


@pytest.mark.parametrize(
    ("seconds_left", "days"),
    [
        (30 * DAY, 30),
        (30 * DAY - 1, 30),
        (29.5 * DAY, 30),
        (29 * DAY, 29),
        (8 * DAY, 8),
        (8 * DAY - 1, 8),
        (7 * DAY, 7),
        (7.01 * DAY, 8),
        (DAY, 1),
        (DAY - 1, 1),
        (1, 1),
        (0, 0),
        (-5 * DAY, 0),
    ],
)
def test_days_remaining_is_rounded_up_and_never_negative(seconds_left: float, days: int) -> None:
    """Days left as a person counts them, rounded up: 1 on the last day, 0 from the end."""
    assert days_remaining(END, END - seconds_left) == days


@pytest.mark.parametrize("age_seconds", [0, 1, 3600, DAY - 1])
def test_a_new_organization_reads_30_days_left_all_day(age_seconds: float) -> None:
    """On the day it is created a 30-day trial has 30 days left, on the status page and in
    its call to action; not 29 from its first second on."""
    body = status(facts(), CREATED + age_seconds)
    assert body["trial"]["days_remaining"] == 30
    assert body["call_to_action"]["title"] == "30 days left in your free trial"


@pytest.mark.parametrize(
    ("now", "stage"), [(CREATED, "trialing"), (END - 1, "trialing"), (END, "expired")]
)
def test_trial_stage_turns_at_the_exact_end(now: float, stage: str) -> None:
    """`trialing` until the instant the trial ends, `expired` from it."""
    assert trial_stage(END, now) == stage


@pytest.mark.parametrize(
    ("case", "org", "now", "level"),
    [
        ("just created", facts(), CREATED, Level.INFO),
        ("8 days left", facts(), END - 8 * DAY, Level.INFO),
        ("7.01 days left", facts(), END - 7.01 * DAY, Level.INFO),
        ("7 days left", facts(), END - 7 * DAY, Level.WARNING),
        ("4 days left", facts(), END - 4 * DAY, Level.WARNING),
        ("3.01 days left", facts(), END - 3.01 * DAY, Level.WARNING),
        ("3 days left", facts(), END - 3 * DAY, Level.URGENT),
        ("1 day left", facts(), END - DAY, Level.URGENT),
        ("last second", facts(), END - 1, Level.URGENT),
        ("exactly at the end", facts(), END, Level.BLOCKING),
        ("a day after", facts(), END + DAY, Level.BLOCKING),
        ("trialing, already paying", facts(purchase=purchase()), END - DAY, Level.NONE),
        ("trialing, lapsed purchase", facts(purchase=purchase("ended")), END - DAY, Level.URGENT),
        ("subscribed", facts(purchase=purchase()), END + DAY, Level.NONE),
        ("pending cancel", facts(purchase=purchase("pending_cancel")), END + DAY, Level.NONE),
        ("past due, in grace", facts(purchase=failed(END)), END + DAY, Level.BLOCKING),
        ("past due, grace over", facts(purchase=failed(END)), END + 15 * DAY, Level.BLOCKING),
        (
            "past due, exempt",
            facts(require_seats=False, purchase=failed(END)),
            END + DAY,
            Level.NONE,
        ),
        ("ended", facts(purchase=purchase("ended")), END + DAY, Level.BLOCKING),
        (
            "period over",
            facts(purchase=purchase(expires_at=END + DAY)),
            END + DAY,
            Level.BLOCKING,
        ),
        ("seats exceeded", facts(seats_used=6, purchase=purchase()), END + DAY, Level.BLOCKING),
        ("exempt after trial", facts(require_seats=False), END + DAY, Level.NONE),
        ("exempt during trial", facts(require_seats=False), END - DAY, Level.NONE),
        (
            "explicit trial end",
            facts(free_trial_end_at=CREATED + 10 * DAY),
            CREATED + 5 * DAY,
            Level.WARNING,
        ),
        (
            "explicit trial end passed",
            facts(free_trial_end_at=CREATED + 10 * DAY),
            CREATED + 10 * DAY,
            Level.BLOCKING,
        ),
    ],
)
def test_call_to_action_level(case: str, org: OrgFacts, now: float, level: Level) -> None:
    """The level grows louder as the trial ends and is none for paying or exempt orgs."""
    assert level_at(org, now) is level, case


@pytest.mark.parametrize(
    ("case", "org", "now", "stage"),
    [
        ("just created", facts(), CREATED, None),
        ("8 days left", facts(), END - 8 * DAY, None),
        ("a second over 7 days", facts(), END - 7 * DAY - 1, None),
        ("7 days left", facts(), END - 7 * DAY, ReminderStage.DAYS_7),
        ("4 days left", facts(), END - 4 * DAY, ReminderStage.DAYS_7),
        ("3.01 days left", facts(), END - 3.01 * DAY, ReminderStage.DAYS_7),
        ("3 days left", facts(), END - 3 * DAY, ReminderStage.DAYS_3),
        ("2 days left", facts(), END - 2 * DAY, ReminderStage.DAYS_3),
        ("1.01 days left", facts(), END - 1.01 * DAY, ReminderStage.DAYS_3),
        ("1 day left", facts(), END - DAY, ReminderStage.DAYS_1),
        ("last second", facts(), END - 1, ReminderStage.DAYS_1),
        ("exactly at the end", facts(), END, ReminderStage.EXPIRED),
        ("6.99 days after", facts(), END + 6.99 * DAY, ReminderStage.EXPIRED),
        ("a week after", facts(), END + 7 * DAY, None),
        ("subscribed early", facts(purchase=purchase()), END - DAY, None),
        ("subscribed", facts(purchase=purchase()), END + DAY, None),
        ("ended purchase", facts(purchase=purchase("ended")), END + DAY, ReminderStage.EXPIRED),
        ("exempt", facts(require_seats=False), END - DAY, None),
        ("exempt, expired", facts(require_seats=False), END + DAY, None),
    ],
)
def test_reminder_stage(case: str, org: OrgFacts, now: float, stage: ReminderStage | None) -> None:
    """The latest reminder due, by the same whole days as the status page."""
    assert reminder_stage(org, decide(org, now, TRIAL_DAYS, GRACE_DAYS), now) == stage, case


@pytest.mark.parametrize(
    ("role", "unlimited", "taken", "purchased", "fits"),
    [
        ("member", True, 500, 0, True),
        ("member", False, 4, 5, True),
        ("member", False, 5, 5, False),
        ("owner", False, 5, 5, False),
        ("billing_manager", False, 5, 5, True),
        ("member", False, 0, 0, False),
        ("billing_manager", False, 0, 0, True),
    ],
)
def test_has_seat_for(role: str, unlimited: bool, taken: int, purchased: int, fits: bool) -> None:
    """One more member fits within the purchased seats; billing managers take none."""
    assert has_seat_for(role, unlimited=unlimited, taken=taken, purchased=purchased) is fits


@pytest.mark.parametrize(
    ("org", "now", "seats"),
    [
        (facts(), END + DAY, 0),
        (facts(purchase=purchase(seats=7)), END + DAY, 7),
        (facts(purchase=purchase("pending_cancel", seats=7)), END + DAY, 7),
        (facts(purchase=purchase("ended", seats=7)), END + DAY, 0),
        (facts(purchase=purchase(seats=7, expires_at=END)), END, 0),
        (facts(purchase=purchase(seats=7, starts_at=END + DAY)), END, 0),
    ],
)
def test_purchased_seats_counts_only_a_paying_purchase(
    org: OrgFacts, now: float, seats: int
) -> None:
    """Seats are those of a purchase that is paid for and covers the instant."""
    assert purchased_seats(org, now) == seats


@pytest.mark.parametrize(
    ("case", "org", "now", "unlimited"),
    [
        ("trialing, nothing bought", facts(), END - DAY, True),
        ("trialing, bought", facts(purchase=purchase(seats=3)), END - DAY, False),
        ("trialing, purchase ended", facts(purchase=purchase("ended")), END - DAY, True),
        ("exempt", facts(require_seats=False), END + DAY, True),
        ("exempt, bought", facts(require_seats=False, purchase=purchase()), END - DAY, True),
        ("subscribed", facts(purchase=purchase()), END + DAY, False),
        ("blocked", facts(), END + DAY, False),
    ],
)
def test_seats_unlimited_until_the_first_purchase(
    case: str, org: OrgFacts, now: float, unlimited: bool
) -> None:
    """Members are not counted during a trial nothing was bought in, nor when exempt."""
    assert seats_unlimited(org, decide(org, now, TRIAL_DAYS, GRACE_DAYS)) is unlimited, case


def test_seats_of_several_subscriptions_add_up() -> None:
    """Two paying subscriptions pay for their seats together; an ended one for none."""
    org = facts(purchases=(purchase(seats=3), purchase(seats=6), purchase("ended", seats=50)))
    assert purchased_seats(org, END + DAY) == 9


@pytest.mark.parametrize(
    ("case", "seats_used", "now", "level"),
    [
        ("enough seats, trial running", 3, END - 20 * DAY, Level.NONE),
        ("one member too many, 20 days left", 4, END - 20 * DAY, Level.WARNING),
        ("one member too many, 3 days left", 4, END - 3 * DAY, Level.URGENT),
        ("one member too many, last hour", 4, END - 3600, Level.URGENT),
        ("one member too many, trial over", 4, END + DAY, Level.BLOCKING),
    ],
)
def test_paid_during_the_trial_warns_of_missing_seats_before_it_ends(
    case: str, seats_used: int, now: float, level: Level
) -> None:
    """Bought during the trial with fewer seats than members: a warning, then urgent in
    the last 3 days, before the proxy refuses the organization at the trial's end."""
    org = facts(seats_used=seats_used, purchase=purchase(seats=3))
    assert level_at(org, now) is level, case


def test_missing_seats_warning_says_what_happens_at_the_trial_end() -> None:
    """The warning counts members and seats and names the trial's end."""
    org = facts(seats_used=5, purchase=purchase(seats=3))
    action = cta(org, END - 10 * DAY)
    assert action["level"] == "warning"
    assert action["title"] == "Your organization needs more seats"
    assert "5 members but pays for 3 seats" in action["message"]
    assert human_time(END) in action["message"]
    status = organization_status(
        org,
        END - 10 * DAY,
        name="Acme",
        pending_invitations=0,
        trial_days=TRIAL_DAYS,
        grace_days=GRACE_DAYS,
        app_url=APP_URL,
        catalog=CATALOG,
    )
    assert status["seats"] == {
        "used": 5,
        "purchased": 3,
        "unlimited": False,
        "short": 2,
        "pending_invitations": 0,
    }
    assert status["access"] == {"allowed": True, "reason": None}


def test_teams_pricing_is_stated_in_monthly_terms() -> None:
    """Teams: $29 per seat per month, billed annually as $348."""
    assert plan_pricing(CATALOG, "teams") == {
        "per_seat_monthly_usd": 29,
        "billed": "annually",
        "per_seat_yearly_usd": 348,
        "display": "$29 per seat per month, billed annually ($348)",
    }


def test_enterprise_pricing_is_stated_in_monthly_terms() -> None:
    """Enterprise: $299 per seat per month, billed annually as $3,588."""
    assert plan_pricing(CATALOG, "enterprise") == {
        "per_seat_monthly_usd": 299,
        "billed": "annually",
        "per_seat_yearly_usd": 3588,
        "display": "$299 per seat per month, billed annually ($3,588)",
    }


def test_pricing_with_cents_shows_cents() -> None:
    """A price that is not whole dollars a month is shown with its cents."""
    price = dataclasses.replace(CATALOG.price("teams", "yearly"), unit_amount_cents=34500)
    teams = dataclasses.replace(CATALOG.plans["teams"], prices={"yearly": price})
    catalog = dataclasses.replace(CATALOG, plans={**CATALOG.plans, "teams": teams})
    pricing = plan_pricing(catalog, "teams")
    assert pricing["per_seat_monthly_usd"] == 28.75
    assert pricing["display"] == "$28.75 per seat per month, billed annually ($345)"


def cta(org: OrgFacts, now: float) -> dict[str, Any]:
    return call_to_action(
        org, decide(org, now, TRIAL_DAYS, GRACE_DAYS), now, app_url=APP_URL, catalog=CATALOG
    )


@pytest.mark.parametrize(
    ("now", "level", "title_has"),
    [
        (CREATED, "info", "30 days left"),
        (END - 5 * DAY, "warning", "ends in 5 days"),
        (END - 2.5 * DAY, "urgent", "Only 3 days left"),
        (END - 1.5 * DAY, "urgent", "Only 2 days left"),
        (END - DAY, "urgent", "Only 1 day left"),
        (END - 60, "urgent", "Only 1 day left"),
        (END, "blocking", "trial has ended"),
    ],
)
def test_call_to_action_texts_point_to_billing(now: float, level: str, title_has: str) -> None:
    """Each level has a title and a message, and the link is the billing page."""
    action = cta(facts(), now)
    assert action["level"] == level
    assert title_has in action["title"]
    assert action["message"]
    assert action["url"] == f"{APP_URL}/organizations/{ORG}/billing"


def test_louder_levels_warn_of_losing_access() -> None:
    """Warning and urgent texts say when access stops; urgent also says credits lock."""
    warning, urgent = cta(facts(), END - 5 * DAY), cta(facts(), END - DAY)
    assert "$29 per seat per month" in warning["message"]
    assert "stops working" in urgent["message"]
    assert "credits stay locked" in urgent["message"]
    assert urgent["message"].startswith("Subscribe now")


def test_blocking_message_is_the_proxys_refusal() -> None:
    """Once blocked, the status page says exactly what the 402 says."""
    org = facts(credits_acquired_microdollars=12_500_000)
    verdict = decide(org, END + DAY, TRIAL_DAYS, GRACE_DAYS)
    assert cta(org, END + DAY)["message"] == refusal_message(
        org, verdict, 12.5, f"{APP_URL}/organizations/{ORG}/billing"
    )


def test_no_call_to_action_text_when_subscribed() -> None:
    """A paying organization is not asked to upgrade."""
    action = cta(facts(purchase=purchase()), END + DAY)
    assert action["level"] == "none"
    assert action["title"] is None and action["message"] is None


def status(org: OrgFacts, now: float) -> dict[str, Any]:
    return organization_status(
        org,
        now,
        name="Acme",
        pending_invitations=2,
        trial_days=TRIAL_DAYS,
        grace_days=GRACE_DAYS,
        app_url=APP_URL,
        catalog=CATALOG,
    )


def test_status_of_a_trialing_teams_organization() -> None:
    """Every section of the status page for a new teams organization."""
    org = facts(credits_acquired_microdollars=5_000_000)
    body = status(org, CREATED + 0.5 * DAY)
    assert body["trial"] == {
        "ends_at": "2027-02-14T08:00:00Z",
        "days_remaining": 30,
        "stage": "trialing",
    }
    assert body["seats"] == {
        "used": 1,
        "purchased": 0,
        "unlimited": True,
        "short": 0,
        "pending_invitations": 2,
    }
    assert body["subscription"] is None
    assert body["credits"] == {"balance_usd": 5.0, "locked": False}
    assert body["access"] == {"allowed": True, "reason": None}
    assert body["pricing"] == plan_pricing(CATALOG, "teams")
    assert body["call_to_action"]["level"] == "info"
    assert body["sso"] is None
    assert (body["id"], body["name"], body["plan"]) == (ORG, "Acme", "teams")


def test_status_of_an_expired_organization_locks_credits() -> None:
    """After the trial without a purchase: refused, credits locked, blocking prompt."""
    body = status(facts(credits_acquired_microdollars=5_000_000), END)
    assert body["trial"]["stage"] == "expired"
    assert body["trial"]["days_remaining"] == 0
    assert body["access"] == {"allowed": False, "reason": "trial_expired"}
    assert body["credits"] == {"balance_usd": 5.0, "locked": True}
    assert body["seats"]["unlimited"] is False
    assert body["call_to_action"]["level"] == "blocking"


def test_status_of_a_subscribed_enterprise_organization() -> None:
    """Subscription details, purchased seats, enterprise pricing and the SSO note."""
    org = facts(plan="enterprise", purchase=purchase(seats=9, expires_at=END + 100 * DAY))
    body = status(org, END + DAY)
    assert body["subscription"] == {
        "status": "active",
        "billing_cycle": "yearly",
        "seat_count": 9,
        "expires_at": "2027-05-25T08:00:00Z",
        "first_charge_at": None,
    }
    assert body["seats"]["purchased"] == 9
    assert body["trial"]["stage"] == "expired"
    assert body["access"] == {"allowed": True, "reason": None}
    assert body["call_to_action"]["level"] == "none"
    assert body["pricing"]["per_seat_yearly_usd"] == 3588
    assert body["sso"] == {"self_serve": False, "contact_sales_url": CATALOG.contact_sales_url}


def test_failed_payment_is_the_loudest_call_to_action_during_its_grace() -> None:
    """While a payment failed and access goes on, the call to action is blocking, reason
    payment_failed: when the card was declined, when access stops, who can update it."""
    org = facts(purchase=failed(END + 2 * DAY))
    body = status(org, END + 3 * DAY)
    assert body["access"] == {"allowed": True, "reason": None}
    action = body["call_to_action"]
    assert (action["level"], action["reason"]) == ("blocking", "payment_failed")
    assert action["title"] == "Your payment failed"
    assert f"declined on {human_time(END + 2 * DAY)}" in action["message"]
    assert f"keeps working until {human_time(END + 16 * DAY)}" in action["message"]
    assert "an owner or billing manager can update the card" in action["message"]
    assert action["message"].endswith(f"Update the card at {action['url']}")
    assert action["url"] == f"{APP_URL}/organizations/{ORG}/billing"


def test_failed_payment_past_its_grace_shows_the_402() -> None:
    """Once the grace is over the call to action is the proxy's payment_failed refusal."""
    org = facts(purchase=failed(END + 2 * DAY))
    now = END + 16 * DAY
    body = status(org, now)
    assert body["access"] == {"allowed": False, "reason": "payment_failed"}
    assert body["credits"]["locked"] is True
    action = body["call_to_action"]
    assert (action["level"], action["reason"]) == ("blocking", "payment_failed")
    verdict = decide(org, now, TRIAL_DAYS, GRACE_DAYS)
    assert action["message"] == refusal_message(org, verdict, 0.0, action["url"])


def test_paid_invoice_clears_the_failed_payment_call_to_action() -> None:
    """The invoice paid (the purchase active again), the call to action is gone."""
    org = facts(purchase=purchase(starts_at=END + 2 * DAY))
    action = status(org, END + 3 * DAY)["call_to_action"]
    assert (action["level"], action["reason"], action["title"]) == ("none", None, None)


SUBSCRIBE_CASES = [
    pytest.param(facts(), CREATED, id="info"),
    pytest.param(facts(), END - 5 * DAY, id="warning"),
    pytest.param(facts(), END - DAY, id="urgent"),
    pytest.param(facts(), END + DAY, id="trial-expired"),
    pytest.param(facts(purchase=purchase("ended")), END + DAY, id="subscription-inactive"),
    pytest.param(facts(seats_used=9, purchase=purchase()), END + DAY, id="seats-exceeded"),
    pytest.param(facts(seats_used=9, purchase=purchase()), END - DAY, id="seats-short-trial"),
    pytest.param(facts(purchase=failed(END)), END + DAY, id="payment-failing"),
    pytest.param(facts(purchase=failed(END)), END + 20 * DAY, id="payment-failed"),
]


@pytest.mark.parametrize(("org", "now"), SUBSCRIBE_CASES)
def test_every_call_to_action_names_owners_or_billing_managers(org: OrgFacts, now: float) -> None:
    """Members read these too, and billing managers can subscribe and pay as owners can:
    every text that asks to subscribe, buy or update a card says who can."""
    message = cta(org, now)["message"]
    assert "owner or billing manager" in message.lower()
    assert "an owner can subscribe" not in message.lower()
