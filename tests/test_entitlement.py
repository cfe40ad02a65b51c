"""`entitlement.check`: the verdict, the enforcement mode, and the 402 the extension shows.

Every time is a fixed UNIX instant built from `BASE`; nothing here reads the wall clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.access.refusals import Outcome, balance_usd, billing_url, check, iso_utc
from gateway.access.rule import OrgFacts, Purchase, Reason, Standing
from gateway.accounts.status import organization_status
from gateway.config import EnforcementMode
from gateway.errors import GatewayError, PaymentRequired
from gateway.plans import load_catalog

BASE = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DAY = 86_400.0
TRIAL_DAYS = 30
GRACE_DAYS = 14
TRIAL_END = BASE + TRIAL_DAYS * DAY  # 2027-02-14T08:00:00Z
TRIAL_END_ISO = "2027-02-14T08:00:00Z"
AFTER = TRIAL_END + 10 * DAY
# A payment that failed long enough before AFTER for its grace to be over.
FAILED_AT = AFTER - (GRACE_DAYS + 1) * DAY
APP_URL = "https://app.example.test"
ORG_ID = "0b9e4a5e-6a3c-4a8e-9a43-5f2a1f9c0d11"
BLOCKING_MODES = [EnforcementMode.ENFORCE, EnforcementMode.SHADOW]


def purchase(**overrides: Any) -> Purchase:
    """A paying purchase of 5 seats covering the whole test period."""
    values: dict[str, Any] = {
        "status": "active",
        "seat_count": 5,
        "starts_at": BASE,
        "expires_at": BASE + 400 * DAY,
    }
    values.update(overrides)
    return Purchase(**values)


def facts(**overrides: Any) -> OrgFacts:
    """An organization created at BASE that needs seats, with 3 seats used, no purchase."""
    values: dict[str, Any] = {
        "organization_id": ORG_ID,
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


def judge(org: OrgFacts, mode: EnforcementMode, now: float = AFTER) -> Outcome:
    """Run `check` with the test's fixed trial length and app URL."""
    return check(org, now, trial_days=TRIAL_DAYS, grace_days=GRACE_DAYS, mode=mode, app_url=APP_URL)


def refusal(org: OrgFacts, now: float = AFTER) -> PaymentRequired:
    """The PaymentRequired that enforce mode raises for `org`."""
    with pytest.raises(PaymentRequired) as info:
        judge(org, EnforcementMode.ENFORCE, now)
    return info.value


# (facts, expected reason, seats_purchased in the 402's metadata)
BLOCKED = [
    pytest.param(facts(), Reason.TRIAL_EXPIRED, 0, id="trial-expired"),
    pytest.param(
        facts(purchase=purchase(status="ended")),
        Reason.SUBSCRIPTION_INACTIVE,
        0,
        id="subscription-ended",
    ),
    pytest.param(
        facts(purchase=purchase(expires_at=AFTER)),
        Reason.SUBSCRIPTION_INACTIVE,
        0,
        id="subscription-expired",
    ),
    pytest.param(
        facts(purchase=purchase(starts_at=AFTER + 1)),
        Reason.SUBSCRIPTION_INACTIVE,
        0,
        id="subscription-not-started",
    ),
    pytest.param(
        facts(seats_used=9, purchase=purchase(seat_count=5)),
        Reason.SEATS_EXCEEDED,
        5,
        id="seats-exceeded",
    ),
    pytest.param(
        facts(seats_used=1, purchase=purchase(seat_count=0)),
        Reason.SEATS_EXCEEDED,
        0,
        id="seats-exceeded-zero-purchased",
    ),
    pytest.param(
        facts(seats_used=10, purchases=(purchase(seat_count=3), purchase(seat_count=6))),
        Reason.SEATS_EXCEEDED,
        9,
        id="seats-exceeded-two-subscriptions-add-up",
    ),
    pytest.param(
        facts(purchases=(purchase(status="ended", seat_count=4), purchase(status="ended"))),
        Reason.SUBSCRIPTION_INACTIVE,
        0,
        id="two-lapsed",
    ),
    pytest.param(
        facts(purchase=purchase(status="past_due", payment_failed_at=FAILED_AT)),
        Reason.PAYMENT_FAILED,
        0,
        id="payment-failed-grace-over",
    ),
    pytest.param(
        facts(
            purchases=(
                purchase(status="past_due", seat_count=2, payment_failed_at=FAILED_AT),
                purchase(status="ended", seat_count=4),
            )
        ),
        Reason.PAYMENT_FAILED,
        0,
        id="payment-failed-beside-a-cancelled-one",
    ),
]

# (facts, instant, expected standing)
ALLOWED = [
    pytest.param(facts(), BASE + DAY, Standing.TRIALING, id="trialing"),
    pytest.param(
        facts(seats_used=1000, purchase=purchase(seat_count=0)),
        BASE + DAY,
        Standing.TRIALING,
        id="trialing-seats-unlimited",
    ),
    pytest.param(facts(require_seats=False), AFTER, Standing.EXEMPT, id="exempt"),
    pytest.param(facts(purchase=purchase()), AFTER, Standing.SUBSCRIBED, id="subscribed"),
    pytest.param(
        facts(seats_used=5, purchase=purchase(seat_count=5)),
        AFTER,
        Standing.SUBSCRIBED,
        id="subscribed-seats-equal",
    ),
]

TITLES = {
    Reason.TRIAL_EXPIRED: "Your free trial has ended",
    Reason.SUBSCRIPTION_INACTIVE: "Your subscription is not active",
    Reason.SEATS_EXCEEDED: "Your organization needs more seats",
    Reason.PAYMENT_FAILED: "Your payment failed",
}


def failure_metadata(reason: Reason) -> dict[str, str]:
    """What a payment_failed 402 adds to the metadata of the others."""
    if reason is not Reason.PAYMENT_FAILED:
        return {}
    return {
        "payment_failed_at": iso_utc(FAILED_AT),
        "grace_ends_at": iso_utc(FAILED_AT + GRACE_DAYS * DAY),
    }


class TestAllowed:
    """Organizations the rule allows pass in every mode that checks."""

    @pytest.mark.parametrize("mode", BLOCKING_MODES)
    @pytest.mark.parametrize(("org", "now", "standing"), ALLOWED)
    def test_allowed_has_no_would_block(
        self, org: OrgFacts, now: float, standing: Standing, mode: EnforcementMode
    ):
        """An allowed organization gets would_block None and no exception."""
        outcome = judge(org, mode, now)
        assert outcome.would_block is None
        assert outcome.verdict.allowed
        assert outcome.verdict.standing is standing


class TestShadowMode:
    """Shadow mode lets refused organizations through and says why they would be refused."""

    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_shadow_returns_would_block(self, org: OrgFacts, reason: Reason, seats_purchased: int):
        """A refusal in shadow mode returns the reason as would_block instead of raising."""
        outcome = judge(org, EnforcementMode.SHADOW)
        assert outcome.would_block is reason
        assert outcome.verdict.allowed is False
        assert outcome.verdict.reason is reason
        assert outcome.verdict.trial_ends_at == TRIAL_END


class TestEnforceMode:
    """Enforce mode refuses with the 402 the extension's payment dialog reads."""

    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_enforce_raises_payment_required(
        self, org: OrgFacts, reason: Reason, seats_purchased: int
    ):
        """A refusal in enforce mode raises a 402 PaymentRequired carrying the reason."""
        exc = refusal(org)
        assert isinstance(exc, GatewayError)
        assert exc.status == 402
        assert exc.reason == reason.value

    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_envelope_shape(self, org: OrgFacts, reason: Reason, seats_purchased: int):
        """The envelope has exactly the keys, values and types the payment dialog reads."""
        exc = refusal(org)
        assert exc.envelope() == {
            "error": {
                "code": 402,
                "message": exc.message,
                "title": TITLES[reason],
                "balance": 0.0,
                "buyCreditsUrl": f"{APP_URL}/organizations/{ORG_ID}/billing",
                "metadata": {
                    "reason": reason.value,
                    "organization_id": ORG_ID,
                    "trial_ends_at": TRIAL_END_ISO,
                    "seats_used": org.seats_used,
                    "seats_purchased": seats_purchased,
                    **failure_metadata(reason),
                },
            },
            "error_type": reason.value,
        }

    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_envelope_types(self, org: OrgFacts, reason: Reason, seats_purchased: int):
        """Each field has the JSON type the extension expects, and the body is that JSON."""
        exc = refusal(org)
        error = exc.envelope()["error"]
        assert type(error["code"]) is int
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["title"], str) and error["title"]
        assert type(error["balance"]) is float
        metadata = error["metadata"]
        assert type(metadata["seats_used"]) is int
        assert type(metadata["seats_purchased"]) is int
        assert metadata["trial_ends_at"].endswith("Z")
        assert json.loads(exc.body()) == exc.envelope()

    @pytest.mark.parametrize(
        ("acquired", "used", "balance"),
        [
            pytest.param(0, 0, 0.0, id="no-credits"),
            pytest.param(12_345_678, 0, 12.345678, id="unspent"),
            pytest.param(25_000_000, 5_000_000, 20.0, id="partly-spent"),
            pytest.param(5_000_000, 5_000_000, 0.0, id="all-spent"),
            pytest.param(1_000_000, 1_500_000, -0.5, id="overspent"),
            pytest.param(1, 0, 0.000001, id="one-microdollar"),
        ],
    )
    def test_balance_is_credits_in_usd(self, acquired: int, used: int, balance: float):
        """balance is (acquired - used) microdollars in USD, the credits the refusal locks."""
        org = facts(credits_acquired_microdollars=acquired, credits_used_microdollars=used)
        assert refusal(org).envelope()["error"]["balance"] == pytest.approx(balance)
        assert balance_usd(org.balance_microdollars) == pytest.approx(balance)

    @pytest.mark.parametrize(
        ("free_trial_end_at", "expected"),
        [
            pytest.param(None, TRIAL_END_ISO, id="created-plus-30-days"),
            pytest.param(BASE + 10 * DAY, "2027-01-25T08:00:00Z", id="override"),
            pytest.param(BASE + 0.5, "2027-01-15T08:00:00.500000Z", id="fractional"),
        ],
    )
    def test_trial_ends_at_is_iso_utc_with_z(self, free_trial_end_at: float | None, expected: str):
        """metadata.trial_ends_at is the trial end as ISO 8601 UTC ending in Z."""
        org = facts(free_trial_end_at=free_trial_end_at)
        assert refusal(org).envelope()["error"]["metadata"]["trial_ends_at"] == expected

    def test_refusal_is_judged_at_now(self):
        """The same facts pass at 1s before the trial end and raise exactly at it."""
        org = facts()
        assert judge(org, EnforcementMode.ENFORCE, TRIAL_END - 1).would_block is None
        assert refusal(org, TRIAL_END).reason == Reason.TRIAL_EXPIRED.value


class TestMessages:
    """What the refusal says, in words an owner can act on."""

    def test_trial_expired_message_names_the_date(self):
        """The trial_expired message says when the trial ended and how to subscribe."""
        message = refusal(facts()).message
        assert "2027-02-14" in message
        assert "free trial" in message
        assert message.endswith(f" Subscribe at {APP_URL}/organizations/{ORG_ID}/billing")

    def test_subscription_inactive_message(self):
        """The subscription_inactive message says the subscription is not active."""
        message = refusal(facts(purchase=purchase(status="ended"))).message
        assert "subscription" in message
        assert message.endswith(f" Subscribe at {APP_URL}/organizations/{ORG_ID}/billing")

    def test_seats_exceeded_message_counts_seats(self):
        """The seats_exceeded message says how many members and how many seats are paid for."""
        message = refusal(facts(seats_used=9, purchase=purchase(seat_count=5))).message
        assert "9 members" in message
        assert "5 seats" in message
        assert message.endswith(f" Buy seats at {APP_URL}/organizations/{ORG_ID}/billing")

    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_every_message_ends_with_the_billing_link(
        self, org: OrgFacts, reason: Reason, seats_purchased: int
    ):
        """A client that prints only the message (the Kilo CLI) still shows where to pay:
        the link is its last word, bare, with no full stop a terminal would take as part
        of the URL."""
        org = facts(
            seats_used=org.seats_used,
            purchases=org.purchases,
            credits_acquired_microdollars=25_000_000,
        )
        message = refusal(org).message
        assert message.split()[-1] == billing_url(APP_URL, ORG_ID)
        assert "billing page" not in message

    def test_out_of_credits_message_ends_with_the_billing_link(self):
        """Out of credits on a paid model: the message says :free models still answer and
        ends with where to buy credits."""
        with pytest.raises(PaymentRequired) as caught:
            check(
                facts(purchase=purchase()),
                AFTER,
                trial_days=TRIAL_DAYS,
                grace_days=GRACE_DAYS,
                mode=EnforcementMode.ENFORCE,
                app_url=APP_URL,
                model="openai/gpt-4o",
            )
        assert caught.value.reason == Reason.INSUFFICIENT_CREDITS.value
        assert ":free" in caught.value.message
        assert caught.value.message.endswith(
            f" Buy credits at {APP_URL}/organizations/{ORG_ID}/billing"
        )

    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_message_mentions_locked_credits(
        self, org: OrgFacts, reason: Reason, seats_purchased: int
    ):
        """With a positive balance, every refusal says how much purchased credit stays locked."""
        org = facts(
            seats_used=org.seats_used,
            purchases=org.purchases,
            credits_acquired_microdollars=25_000_000,
            credits_used_microdollars=5_000_000,
        )
        message = refusal(org).message
        assert "$20.00" in message
        assert "locked" in message

    @pytest.mark.parametrize(
        ("acquired", "used", "shown"),
        [
            pytest.param(12_345_678, 0, "$12.35", id="rounded-to-cents"),
            pytest.param(1_234_500_000, 0, "$1,234.50", id="thousands-separator"),
            pytest.param(25_000_000, 5_000_000, "$20.00", id="partly-spent"),
        ],
    )
    def test_locked_credits_are_shown_in_dollars(self, acquired: int, used: int, shown: str):
        """The locked amount is shown in dollars with cents and thousands separators."""
        org = facts(credits_acquired_microdollars=acquired, credits_used_microdollars=used)
        assert f"Your {shown} of purchased credits stay locked" in refusal(org).message

    @pytest.mark.parametrize(
        ("acquired", "used"),
        [pytest.param(0, 0, id="zero"), pytest.param(1_000_000, 3_000_000, id="negative")],
    )
    @pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
    def test_message_without_balance_mentions_no_credits(
        self,
        org: OrgFacts,
        reason: Reason,
        seats_purchased: int,
        acquired: int,
        used: int,
    ):
        """With no positive balance, no refusal talks about locked credits."""
        org = facts(
            seats_used=org.seats_used,
            purchases=org.purchases,
            credits_acquired_microdollars=acquired,
            credits_used_microdollars=used,
        )
        message = refusal(org).message
        assert "locked" not in message
        assert "$" not in message


class TestHelpers:
    """The small pure helpers the 402 is built from."""

    @pytest.mark.parametrize(
        ("unix_seconds", "expected"),
        [
            pytest.param(0.0, "1970-01-01T00:00:00Z", id="epoch"),
            pytest.param(BASE, "2027-01-15T08:00:00Z", id="base"),
            pytest.param(BASE + 4 * 3600, "2027-01-15T12:00:00Z", id="noon"),
        ],
    )
    def test_iso_utc(self, unix_seconds: float, expected: str):
        """UNIX seconds render as ISO 8601 UTC with a trailing Z, never +00:00."""
        assert iso_utc(unix_seconds) == expected

    def test_billing_url(self):
        """The billing URL is {app_url}/organizations/{id}/billing."""
        assert billing_url(APP_URL, ORG_ID) == f"{APP_URL}/organizations/{ORG_ID}/billing"


class TestPaymentFailed:
    """A payment failed: the proxy serves through the grace, then refuses with
    payment_failed, in the envelope of every 402."""

    def test_message_says_declined_and_who_can_update_it(self):
        """The card was declined, the grace ended, an owner or billing manager can update
        the card; the billing link comes last."""
        org = facts(
            purchase=purchase(status="past_due", payment_failed_at=FAILED_AT),
            credits_acquired_microdollars=7_000_000,
        )
        exc = refusal(org)
        assert exc.reason == Reason.PAYMENT_FAILED.value
        assert "declined on 2027-02-09" in exc.message
        assert "grace period (2027-02-23)" in exc.message
        assert "An owner or billing manager can update the card" in exc.message
        assert "$7.00 of purchased credits stay locked" in exc.message
        assert exc.message.endswith(f" Update the card at {billing_url(APP_URL, ORG_ID)}")
        error = exc.envelope()["error"]
        assert (error["title"], error["balance"]) == ("Your payment failed", 7.0)
        assert error["buyCreditsUrl"] == billing_url(APP_URL, ORG_ID)

    def test_served_through_the_grace_then_refused(self):
        """Allowed until the failure plus PAST_DUE_GRACE_DAYS, refused from that instant,
        though the period Stripe moved on to runs for a year."""
        failing = purchase(
            status="past_due",
            starts_at=AFTER,
            expires_at=AFTER + 365 * DAY,
            payment_failed_at=AFTER,
        )
        org = facts(purchase=failing)
        grace_end = AFTER + GRACE_DAYS * DAY
        assert judge(org, EnforcementMode.ENFORCE, grace_end - 1).would_block is None
        assert refusal(org, grace_end).reason == Reason.PAYMENT_FAILED.value
        assert judge(org, EnforcementMode.SHADOW, grace_end).would_block is Reason.PAYMENT_FAILED

    def test_paid_invoice_lets_it_through_at_once(self):
        """The invoice paid, the purchase is active again: the same instant is allowed."""
        paid = facts(purchase=purchase(status="active", starts_at=FAILED_AT))
        assert judge(paid, EnforcementMode.ENFORCE).would_block is None


@pytest.mark.parametrize(("org", "reason", "seats_purchased"), BLOCKED)
def test_seats_purchased_agrees_with_the_status_page(
    org: OrgFacts, reason: Reason, seats_purchased: int
) -> None:
    """The 402's metadata.seats_purchased is the status page's seats.purchased, after a
    cancellation or a lapse too: both are the verdict's `seats_purchased` at the instant
    (0 when nothing pays)."""
    page = organization_status(
        org,
        AFTER,
        name="Acme",
        pending_invitations=0,
        trial_days=TRIAL_DAYS,
        grace_days=GRACE_DAYS,
        app_url=APP_URL,
        catalog=load_catalog(),
    )
    metadata = refusal(org).envelope()["error"]["metadata"]
    assert metadata["seats_purchased"] == page["seats"]["purchased"] == seats_purchased
