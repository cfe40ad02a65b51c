"""The entitlement rule as a table: facts and an instant in, a verdict out.

Every time is a fixed UNIX instant built from `BASE`; nothing here reads the wall clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.access.rule import (
    PAYING_STATUSES,
    OrgFacts,
    Purchase,
    Reason,
    Standing,
    Verdict,
    decide,
    is_live,
    is_paying,
    trial_end,
)

BASE = 1_800_000_000.0  # 2027-01-15T08:00:00Z: when the organization was created
DAY = 86_400.0
HOUR = 3_600.0
YEAR = 365 * DAY
TRIAL_DAYS = 30
GRACE_DAYS = 14
TRIAL_END = BASE + TRIAL_DAYS * DAY  # 2027-02-14T08:00:00Z
NOON = BASE + 4 * HOUR  # 2027-01-15T12:00:00Z
AFTER = TRIAL_END + 10 * DAY  # well after the default trial


def purchase(**overrides: Any) -> Purchase:
    """A paying yearly purchase of 5 seats covering [TRIAL_END - 1 day, +1 year)."""
    values: dict[str, Any] = {
        "status": "active",
        "seat_count": 5,
        "starts_at": TRIAL_END - DAY,
        "expires_at": TRIAL_END - DAY + YEAR,
        "billing_cycle": "yearly",
    }
    values.update(overrides)
    return Purchase(**values)


def failed(failed_at: float, **overrides: Any) -> Purchase:
    """A past_due purchase whose payment failed at `failed_at`; by default Stripe has moved
    its period on to start at the failure (a failed renewal)."""
    values: dict[str, Any] = {"starts_at": failed_at, "expires_at": failed_at + YEAR}
    values.update(overrides)
    return purchase(status="past_due", payment_failed_at=failed_at, **values)


def facts(**overrides: Any) -> OrgFacts:
    """An organization created at BASE that needs seats, with 3 seats used, no purchase."""
    values: dict[str, Any] = {
        "organization_id": "0b9e4a5e-6a3c-4a8e-9a43-5f2a1f9c0d11",
        "created_at": BASE,
        "free_trial_end_at": None,
        "require_seats": True,
        "seats_used": 3,
        "purchase": None,
    }
    values.update(overrides)
    # `purchase`: the organization's one subscription, the common case.
    single = values.pop("purchase")
    values.setdefault("purchases", () if single is None else (single,))
    return OrgFacts(**values)


ALLOWED_TRIALING = (True, Standing.TRIALING, None)
ALLOWED_EXEMPT = (True, Standing.EXEMPT, None)
ALLOWED_SUBSCRIBED = (True, Standing.SUBSCRIBED, None)
TRIAL_EXPIRED = (False, Standing.BLOCKED, Reason.TRIAL_EXPIRED)
INACTIVE = (False, Standing.BLOCKED, Reason.SUBSCRIPTION_INACTIVE)
SEATS_EXCEEDED = (False, Standing.BLOCKED, Reason.SEATS_EXCEEDED)
PAYMENT_FAILED = (False, Standing.BLOCKED, Reason.PAYMENT_FAILED)


class TestTrialEnd:
    """When the free trial ends."""

    @pytest.mark.parametrize(
        ("free_trial_end_at", "trial_days", "expected"),
        [
            pytest.param(None, 30, BASE + 30 * DAY, id="default-30-days"),
            pytest.param(None, 14, BASE + 14 * DAY, id="configured-14-days"),
            pytest.param(None, 1, BASE + DAY, id="one-day"),
            pytest.param(None, 0, BASE, id="zero-days-ends-at-creation"),
            pytest.param(None, 3650, BASE + 3650 * DAY, id="ten-years"),
            pytest.param(BASE + 10 * DAY, 30, BASE + 10 * DAY, id="override-earlier-than-30d"),
            pytest.param(BASE + 60 * DAY, 30, BASE + 60 * DAY, id="override-later-than-30d"),
            pytest.param(BASE + 60 * DAY, 0, BASE + 60 * DAY, id="override-wins-over-zero-days"),
            pytest.param(BASE, 30, BASE, id="override-equal-to-creation"),
            pytest.param(BASE - DAY, 30, BASE - DAY, id="override-before-creation"),
            pytest.param(BASE + 0.25, 30, BASE + 0.25, id="override-fractional-seconds"),
            pytest.param(0.0, 30, 0.0, id="override-at-epoch-zero-is-not-treated-as-unset"),
        ],
    )
    def test_trial_end(self, free_trial_end_at: float | None, trial_days: int, expected: float):
        """free_trial_end_at wins when set (even if falsy), else created_at + trial_days days."""
        assert trial_end(facts(free_trial_end_at=free_trial_end_at), trial_days) == expected


DECIDE_TABLE = [
    # --- (1) before the trial ends: allowed, trialing, seats unlimited ---------------------
    pytest.param(facts(), BASE, TRIAL_DAYS, ALLOWED_TRIALING, id="trial-at-creation"),
    pytest.param(facts(), BASE - HOUR, TRIAL_DAYS, ALLOWED_TRIALING, id="trial-before-creation"),
    pytest.param(facts(), BASE + 15 * DAY, TRIAL_DAYS, ALLOWED_TRIALING, id="trial-mid"),
    pytest.param(facts(), TRIAL_END - 1, TRIAL_DAYS, ALLOWED_TRIALING, id="trial-last-second"),
    pytest.param(
        facts(), TRIAL_END - 0.001, TRIAL_DAYS, ALLOWED_TRIALING, id="trial-last-millisecond"
    ),
    pytest.param(
        facts(seats_used=1000, purchase=purchase(seat_count=0)),
        BASE + DAY,
        TRIAL_DAYS,
        ALLOWED_TRIALING,
        id="trial-1000-members-0-seats-purchased",
    ),
    pytest.param(
        facts(seats_used=1000),
        BASE + DAY,
        TRIAL_DAYS,
        ALLOWED_TRIALING,
        id="trial-1000-members-no-purchase",
    ),
    pytest.param(
        facts(purchase=purchase(status="ended", starts_at=BASE - YEAR, expires_at=BASE - DAY)),
        BASE + DAY,
        TRIAL_DAYS,
        ALLOWED_TRIALING,
        id="trial-with-ended-purchase",
    ),
    pytest.param(
        facts(purchase=purchase(starts_at=BASE + 20 * DAY)),
        BASE + DAY,
        TRIAL_DAYS,
        ALLOWED_TRIALING,
        id="trial-with-purchase-not-started-yet",
    ),
    pytest.param(
        facts(require_seats=False),
        BASE + DAY,
        TRIAL_DAYS,
        ALLOWED_TRIALING,
        id="trial-takes-precedence-over-exempt",
    ),
    pytest.param(
        facts(free_trial_end_at=BASE + 60 * DAY),
        BASE + 45 * DAY,
        TRIAL_DAYS,
        ALLOWED_TRIALING,
        id="trial-extended-past-30d",
    ),
    pytest.param(
        facts(free_trial_end_at=BASE + 60 * DAY),
        BASE + 60 * DAY - 1,
        0,
        ALLOWED_TRIALING,
        id="trial-override-with-zero-trial-days",
    ),
    pytest.param(facts(), BASE + 13 * DAY, 14, ALLOWED_TRIALING, id="trial-14-days-day-13"),
    # --- exactly at the trial end: no longer trialing ----------------------------------------
    pytest.param(facts(), TRIAL_END, TRIAL_DAYS, TRIAL_EXPIRED, id="at-trial-end-no-purchase"),
    pytest.param(
        facts(require_seats=False), TRIAL_END, TRIAL_DAYS, ALLOWED_EXEMPT, id="at-trial-end-exempt"
    ),
    pytest.param(
        facts(purchase=purchase()),
        TRIAL_END,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="at-trial-end-subscribed",
    ),
    pytest.param(
        facts(seats_used=1000, purchase=purchase(seat_count=0)),
        TRIAL_END,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="at-trial-end-seats-no-longer-unlimited",
    ),
    pytest.param(
        facts(free_trial_end_at=BASE + 10 * DAY),
        BASE + 10 * DAY,
        TRIAL_DAYS,
        TRIAL_EXPIRED,
        id="at-overridden-trial-end",
    ),
    # --- (2) after the trial, require_seats=False: exempt ------------------------------------
    pytest.param(facts(require_seats=False), AFTER, TRIAL_DAYS, ALLOWED_EXEMPT, id="exempt"),
    pytest.param(
        facts(require_seats=False, purchase=purchase(status="ended")),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_EXEMPT,
        id="exempt-with-ended-purchase",
    ),
    pytest.param(
        facts(require_seats=False, purchase=purchase(expires_at=TRIAL_END)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_EXEMPT,
        id="exempt-with-expired-purchase",
    ),
    pytest.param(
        facts(require_seats=False, seats_used=1000, purchase=purchase(seat_count=1)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_EXEMPT,
        id="exempt-ignores-seats",
    ),
    pytest.param(
        facts(require_seats=False), BASE + 10 * YEAR, TRIAL_DAYS, ALLOWED_EXEMPT, id="exempt-years"
    ),
    # --- (3) no purchase at all: trial_expired -----------------------------------------------
    pytest.param(facts(), AFTER, TRIAL_DAYS, TRIAL_EXPIRED, id="no-purchase"),
    pytest.param(facts(), TRIAL_END + 1, TRIAL_DAYS, TRIAL_EXPIRED, id="no-purchase-1s-after"),
    pytest.param(
        facts(seats_used=0), AFTER, TRIAL_DAYS, TRIAL_EXPIRED, id="no-purchase-no-members"
    ),
    pytest.param(facts(), BASE, 0, TRIAL_EXPIRED, id="no-purchase-zero-trial-days"),
    pytest.param(
        facts(free_trial_end_at=BASE + 10 * DAY),
        BASE + 11 * DAY,
        TRIAL_DAYS,
        TRIAL_EXPIRED,
        id="no-purchase-override-ended-before-30d",
    ),
    pytest.param(
        facts(free_trial_end_at=BASE - DAY),
        BASE,
        TRIAL_DAYS,
        TRIAL_EXPIRED,
        id="no-purchase-override-before-creation",
    ),
    # --- (3) paying purchases: every paying status, monthly and yearly ---------------------
    *[
        pytest.param(
            facts(purchase=purchase(status=status, billing_cycle=cycle)),
            AFTER,
            TRIAL_DAYS,
            ALLOWED_SUBSCRIBED,
            id=f"subscribed-{status}-{cycle}",
        )
        for status in ("active", "pending_cancel", "past_due")
        for cycle in ("monthly", "yearly")
    ],
    # --- (3) a purchase that is not paying: subscription_inactive --------------------------
    *[
        pytest.param(
            facts(purchase=purchase(status=status)),
            AFTER,
            TRIAL_DAYS,
            INACTIVE,
            id=f"inactive-status-{status or 'empty'}",
        )
        for status in (
            "ended",
            "canceled",
            "incomplete",
            "incomplete_expired",
            "unpaid",
            "paused",
            "trialing",
            "",
        )
    ],
    pytest.param(
        facts(purchase=purchase(starts_at=AFTER + 1)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-not-started-1s-before",
    ),
    pytest.param(
        facts(purchase=purchase(starts_at=AFTER)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="subscribed-exactly-at-starts-at",
    ),
    pytest.param(
        facts(purchase=purchase(expires_at=AFTER + 1)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="subscribed-last-second-before-expires-at",
    ),
    pytest.param(
        facts(purchase=purchase(expires_at=AFTER)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-exactly-at-expires-at",
    ),
    pytest.param(
        facts(purchase=purchase(expires_at=AFTER - DAY)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-expired-yesterday",
    ),
    pytest.param(
        facts(purchase=purchase(starts_at=AFTER, expires_at=AFTER)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-empty-period",
    ),
    pytest.param(
        facts(purchase=purchase(billing_cycle="monthly", starts_at=AFTER - DAY, expires_at=AFTER)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-monthly-exactly-at-expires-at",
    ),
    pytest.param(
        facts(
            purchase=purchase(
                billing_cycle="monthly", starts_at=AFTER - 29 * DAY, expires_at=AFTER + DAY
            )
        ),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="subscribed-monthly-inside-period",
    ),
    pytest.param(
        facts(purchase=purchase(status="ended", expires_at=AFTER + YEAR)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-ended-inside-period",
    ),
    pytest.param(
        facts(seats_used=1000, purchase=purchase(status="ended", seat_count=1)),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-wins-over-seats-exceeded",
    ),
    pytest.param(
        facts(purchase=purchase(starts_at=BASE, expires_at=BASE + 20 * DAY)),
        TRIAL_END,
        TRIAL_DAYS,
        INACTIVE,
        id="inactive-purchase-lapsed-during-trial",
    ),
    # --- (4) seats ---------------------------------------------------------------------------
    pytest.param(
        facts(seats_used=6, purchase=purchase(seat_count=5)),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="seats-one-over",
    ),
    pytest.param(
        facts(seats_used=1000, purchase=purchase(seat_count=5)),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="seats-far-over",
    ),
    pytest.param(
        facts(seats_used=5, purchase=purchase(seat_count=5)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="seats-equal",
    ),
    pytest.param(
        facts(seats_used=4, purchase=purchase(seat_count=5)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="seats-under",
    ),
    pytest.param(
        facts(seats_used=0, purchase=purchase(seat_count=0)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="seats-zero-of-zero",
    ),
    pytest.param(
        facts(seats_used=1, purchase=purchase(seat_count=0)),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="seats-one-of-zero",
    ),
    *[
        pytest.param(
            facts(seats_used=6, purchase=purchase(status=status, billing_cycle=cycle)),
            AFTER,
            TRIAL_DAYS,
            SEATS_EXCEEDED,
            id=f"seats-exceeded-{status}-{cycle}",
        )
        for status in ("active", "pending_cancel", "past_due")
        for cycle in ("monthly", "yearly")
    ],
    # --- several subscriptions: each is judged, the paying ones' seats add up --------------
    pytest.param(
        facts(seats_used=9, purchases=(purchase(seat_count=3), purchase(seat_count=6))),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="two-subscriptions-3-plus-6-seats-cover-9",
    ),
    pytest.param(
        facts(seats_used=10, purchases=(purchase(seat_count=3), purchase(seat_count=6))),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="two-subscriptions-3-plus-6-seats-short-of-10",
    ),
    pytest.param(
        facts(seats_used=5, purchases=(purchase(status="ended"), purchase(seat_count=6))),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="one-ended-the-other-pays",
    ),
    pytest.param(
        facts(seats_used=5, purchases=(purchase(seat_count=6), purchase(status="ended"))),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="the-newest-ended-an-older-one-pays",
    ),
    pytest.param(
        facts(
            seats_used=7,
            purchases=(purchase(status="ended", seat_count=50), purchase(seat_count=6)),
        ),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="an-ended-subscription-adds-no-seats",
    ),
    pytest.param(
        facts(
            purchases=(
                purchase(status="ended"),
                purchase(starts_at=BASE, expires_at=BASE + 20 * DAY),
            )
        ),
        AFTER,
        TRIAL_DAYS,
        INACTIVE,
        id="none-of-two-pays",
    ),
    pytest.param(
        facts(seats_used=4, purchases=(purchase(status="past_due", seat_count=2),) * 2),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="past-due-seats-add-up",
    ),
    # --- a failed payment: past_due pays from the failure for GRACE_DAYS, not its period ---
    pytest.param(
        facts(purchase=failed(AFTER - DAY)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="past-due-a-day-after-the-failure",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - GRACE_DAYS * DAY + 1)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="past-due-last-second-of-grace",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - GRACE_DAYS * DAY)),
        AFTER,
        TRIAL_DAYS,
        PAYMENT_FAILED,
        id="past-due-exactly-at-grace-end",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - 30 * DAY)),
        AFTER,
        TRIAL_DAYS,
        PAYMENT_FAILED,
        id="past-due-long-after-grace",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - 30 * DAY, expires_at=AFTER + YEAR)),
        AFTER,
        TRIAL_DAYS,
        PAYMENT_FAILED,
        id="past-due-grace-over-inside-the-new-period-buys-nothing",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - 2 * DAY, starts_at=AFTER - YEAR, expires_at=AFTER - DAY)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="past-due-grace-holds-after-the-period-end",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - 20 * DAY, starts_at=AFTER - YEAR, expires_at=AFTER - DAY)),
        AFTER,
        TRIAL_DAYS,
        PAYMENT_FAILED,
        id="past-due-after-the-period-end-and-the-grace",
    ),
    pytest.param(
        facts(purchase=purchase(status="past_due", starts_at=AFTER - 3 * DAY)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="past-due-without-failure-instant-graced-from-its-start",
    ),
    pytest.param(
        facts(purchase=purchase(status="past_due", starts_at=AFTER - GRACE_DAYS * DAY)),
        AFTER,
        TRIAL_DAYS,
        PAYMENT_FAILED,
        id="past-due-without-failure-instant-grace-over",
    ),
    pytest.param(
        facts(purchase=failed(AFTER - DAY)),
        AFTER,
        0,
        ALLOWED_SUBSCRIBED,
        id="past-due-zero-trial-days",
    ),
    pytest.param(
        facts(seats_used=6, purchase=failed(AFTER - DAY)),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="past-due-in-grace-seats-still-counted",
    ),
    pytest.param(
        facts(seats_used=4, purchases=(failed(AFTER - 30 * DAY), purchase(seat_count=4))),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="past-due-over-another-subscription-pays",
    ),
    pytest.param(
        facts(seats_used=6, purchases=(failed(AFTER - 30 * DAY), purchase(seat_count=4))),
        AFTER,
        TRIAL_DAYS,
        SEATS_EXCEEDED,
        id="past-due-over-its-seats-no-longer-count",
    ),
    pytest.param(
        facts(purchases=(failed(AFTER - 30 * DAY), purchase(status="ended"))),
        AFTER,
        TRIAL_DAYS,
        PAYMENT_FAILED,
        id="past-due-over-beside-an-ended-one-is-payment-failed",
    ),
    pytest.param(
        facts(purchase=failed(TRIAL_END)),
        TRIAL_END + DAY,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="first-charge-after-the-trial-failed-in-grace",
    ),
    pytest.param(
        facts(require_seats=False, purchase=failed(AFTER - 30 * DAY)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_EXEMPT,
        id="past-due-exempt",
    ),
    pytest.param(
        facts(purchase=purchase(status="active", starts_at=AFTER - DAY)),
        AFTER,
        TRIAL_DAYS,
        ALLOWED_SUBSCRIBED,
        id="paid-after-the-failure-active-again",
    ),
]


class TestDecide:
    """`decide(facts, now, trial_days, GRACE_DAYS)` across the whole rule."""

    @pytest.mark.parametrize(("org", "now", "trial_days", "expected"), DECIDE_TABLE)
    def test_decide(
        self,
        org: OrgFacts,
        now: float,
        trial_days: int,
        expected: tuple[bool, Standing, Reason | None],
    ):
        """The verdict (allowed, standing, reason) for each row of the rule's table."""
        verdict = decide(org, now, trial_days, GRACE_DAYS)
        assert (verdict.allowed, verdict.standing, verdict.reason) == expected

    @pytest.mark.parametrize(("org", "now", "trial_days", "expected"), DECIDE_TABLE)
    def test_verdict_carries_trial_end(
        self, org: OrgFacts, now: float, trial_days: int, expected: object
    ):
        """Every verdict reports the trial end it was judged against."""
        assert decide(org, now, trial_days, GRACE_DAYS).trial_ends_at == trial_end(org, trial_days)

    @pytest.mark.parametrize(("org", "now", "trial_days", "expected"), DECIDE_TABLE)
    def test_verdict_is_consistent(
        self,
        org: OrgFacts,
        now: float,
        trial_days: int,
        expected: tuple[bool, Standing, Reason | None],
    ):
        """Allowed verdicts have no reason and are not BLOCKED; refusals always have one."""
        verdict = decide(org, now, trial_days, GRACE_DAYS)
        assert (verdict.reason is None) is verdict.allowed
        assert (verdict.standing is Standing.BLOCKED) is not verdict.allowed
        assert verdict.trialing is (verdict.standing is Standing.TRIALING)

    @pytest.mark.parametrize(("org", "now", "trial_days", "expected"), DECIDE_TABLE)
    def test_decide_does_not_change_facts(
        self, org: OrgFacts, now: float, trial_days: int, expected: object
    ):
        """Deciding is pure: the facts are unchanged and the same inputs give the same verdict."""
        before = dataclasses.replace(org)
        first = decide(org, now, trial_days, GRACE_DAYS)
        assert org == before
        assert decide(org, now, trial_days, GRACE_DAYS) == first

    @pytest.mark.parametrize(
        ("org", "now", "seats"),
        [
            pytest.param(facts(), AFTER, 0, id="none-bought"),
            pytest.param(facts(purchases=(purchase(seat_count=3),)), AFTER, 3, id="one"),
            pytest.param(
                facts(purchases=(purchase(seat_count=3), purchase(seat_count=6))),
                AFTER,
                9,
                id="two-add-up",
            ),
            pytest.param(
                facts(purchases=(purchase(seat_count=3), purchase(status="ended"))),
                AFTER,
                3,
                id="ended-counts-none",
            ),
            pytest.param(
                facts(seats_used=9, purchases=(purchase(seat_count=3, starts_at=BASE),)),
                BASE + 10 * DAY,
                3,
                id="bought-during-the-trial",
            ),
        ],
    )
    def test_verdict_counts_the_seats_paying_now(self, org: OrgFacts, now: float, seats: int):
        """The verdict carries the seats it judged against: every paying purchase's, added up."""
        assert decide(org, now, TRIAL_DAYS, GRACE_DAYS).seats_purchased == seats

    def test_trial_stays_open_with_fewer_seats_bought_than_members(self):
        """Bought during the trial for fewer seats than members: allowed until the trial ends,
        then seats_exceeded (the status page warns before)."""
        org = facts(seats_used=9, purchases=(purchase(seat_count=3, starts_at=BASE),))
        assert decide(org, TRIAL_END - 1, TRIAL_DAYS, GRACE_DAYS).standing is Standing.TRIALING
        assert decide(org, TRIAL_END, TRIAL_DAYS, GRACE_DAYS).reason is Reason.SEATS_EXCEEDED


class TestCachedFactsNotVerdicts:
    """Facts read before a deadline are judged against the clock when the request arrives."""

    def test_trial_ending_at_noon(self):
        """Facts read at 11:59:59 allow then, and the same facts refuse at 12:00:00."""
        cached = facts(free_trial_end_at=NOON)
        assert decide(cached, NOON - 1, TRIAL_DAYS, GRACE_DAYS) == Verdict(
            True, Standing.TRIALING, None, NOON
        )
        assert decide(cached, NOON, TRIAL_DAYS, GRACE_DAYS) == Verdict(
            False, Standing.BLOCKED, Reason.TRIAL_EXPIRED, NOON
        )

    def test_subscription_expiring_at_noon(self):
        """A purchase expiring at 12:00:00 allows at 11:59:59 and refuses at 12:00:00."""
        cached = facts(free_trial_end_at=BASE, purchase=purchase(starts_at=BASE, expires_at=NOON))
        assert decide(cached, NOON - 1, TRIAL_DAYS, GRACE_DAYS).standing is Standing.SUBSCRIBED
        assert decide(cached, NOON, TRIAL_DAYS, GRACE_DAYS).reason is Reason.SUBSCRIPTION_INACTIVE

    def test_subscription_starting_at_noon(self):
        """A purchase starting at 12:00:00 refuses at 11:59:59 and allows at 12:00:00."""
        cached = facts(free_trial_end_at=BASE, purchase=purchase(starts_at=NOON))
        assert (
            decide(cached, NOON - 1, TRIAL_DAYS, GRACE_DAYS).reason is Reason.SUBSCRIPTION_INACTIVE
        )
        assert decide(cached, NOON, TRIAL_DAYS, GRACE_DAYS).standing is Standing.SUBSCRIBED


class TestFailedPayment:
    """A past_due purchase: the verdict names the failure and its grace; the grace is judged
    at the request's instant, like every other deadline."""

    def test_verdict_carries_the_failure_and_grace_end(self):
        """Allowed in the grace, the verdict still says when the payment failed and when
        access ends (the status page's call to action reads them)."""
        verdict = decide(facts(purchase=failed(AFTER - DAY)), AFTER, TRIAL_DAYS, GRACE_DAYS)
        assert verdict.allowed
        assert verdict.payment_failed_at == AFTER - DAY
        assert verdict.grace_ends_at == AFTER - DAY + GRACE_DAYS * DAY

    def test_grace_ending_at_noon(self):
        """Facts cached before the grace ends refuse from its last instant on."""
        cached = facts(free_trial_end_at=BASE, purchase=failed(NOON - GRACE_DAYS * DAY))
        assert decide(cached, NOON - 1, TRIAL_DAYS, GRACE_DAYS).allowed
        assert decide(cached, NOON, TRIAL_DAYS, GRACE_DAYS).reason is Reason.PAYMENT_FAILED

    @pytest.mark.parametrize("grace_days", [0, 1, 14, 90])
    def test_grace_is_the_setting(self, grace_days: int):
        """The grace is PAST_DUE_GRACE_DAYS long: allowed a second before, refused at it."""
        cached = facts(purchase=failed(AFTER))
        end = AFTER + grace_days * DAY
        if grace_days:
            assert decide(cached, end - 1, TRIAL_DAYS, grace_days).allowed
        assert decide(cached, end, TRIAL_DAYS, grace_days).reason is Reason.PAYMENT_FAILED

    def test_the_earliest_failure_is_named(self):
        """Two failing subscriptions: the verdict names the one whose grace ends first."""
        org = facts(purchases=(failed(AFTER - DAY), failed(AFTER - 2 * DAY)))
        assert decide(org, AFTER, TRIAL_DAYS, GRACE_DAYS).payment_failed_at == AFTER - 2 * DAY

    @pytest.mark.parametrize(
        ("purchase_", "live"),
        [
            pytest.param(failed(AFTER - 30 * DAY, expires_at=AFTER - DAY), True, id="past-due"),
            pytest.param(purchase(expires_at=AFTER - DAY), False, id="active-period-over"),
            pytest.param(purchase(), True, id="active"),
            pytest.param(purchase(status="ended"), False, id="ended"),
        ],
    )
    def test_past_due_stays_live_while_stripe_retries(self, purchase_: Purchase, live: bool):
        """A past_due subscription is live (a second checkout is refused) whatever its
        period and grace, until Stripe ends it."""
        assert is_live(purchase_, AFTER) is live


class TestIsPaying:
    """Whether a purchase pays for the instant `now`."""

    @pytest.mark.parametrize(
        ("status", "now", "expected"),
        [
            *[pytest.param(s, NOON, True, id=f"{s}-inside") for s in sorted(PAYING_STATUSES)],
            pytest.param("active", BASE, True, id="at-starts-at"),
            pytest.param("active", BASE - 0.001, False, id="just-before-starts-at"),
            pytest.param("active", BASE + DAY - 0.001, True, id="just-before-expires-at"),
            pytest.param("active", BASE + DAY, False, id="at-expires-at"),
            pytest.param("ended", NOON, False, id="ended-inside"),
            pytest.param("canceled", NOON, False, id="canceled-inside"),
            pytest.param("unpaid", NOON, False, id="unpaid-inside"),
        ],
    )
    def test_is_paying(self, status: str, now: float, expected: bool):
        """Paying means a paying status and starts_at <= now < expires_at."""
        paid = purchase(status=status, starts_at=BASE, expires_at=BASE + DAY)
        assert is_paying(paid, now, GRACE_DAYS) is expected

    def test_paying_statuses(self):
        """Exactly active, pending_cancel and past_due count as paying."""
        assert frozenset({"active", "pending_cancel", "past_due"}) == PAYING_STATUSES


class TestOrgFacts:
    """The plain data the rule reads."""

    @pytest.mark.parametrize(
        ("acquired", "used", "expected"),
        [
            pytest.param(0, 0, 0, id="none"),
            pytest.param(12_500_000, 2_500_000, 10_000_000, id="positive"),
            pytest.param(1_000_000, 3_000_000, -2_000_000, id="overspent"),
        ],
    )
    def test_balance_microdollars(self, acquired: int, used: int, expected: int):
        """The balance is credits acquired minus credits used, in microdollars."""
        org = facts(credits_acquired_microdollars=acquired, credits_used_microdollars=used)
        assert org.balance_microdollars == expected

    def test_facts_are_frozen(self):
        """Cached facts cannot be changed in place."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            facts().seats_used = 0  # type: ignore[misc]
