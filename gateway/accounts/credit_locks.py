"""What a credits checkout tells an organization the rule refuses now: the purchase goes
through (the balance grows), but the credits stay locked until access is restored.

Judged by `rule.decide` on the organization's facts at the instant of the checkout, the
proxy's own verdict; an organization allowed now is told nothing more.
"""

from __future__ import annotations

from typing import Any

from gateway.access.refusals import billing_url
from gateway.access.rule import OrgFacts, decide
from gateway.config import Config

# What lifts the refusal, by its reason; any other refusal is lifted by subscribing.
_UNLOCKED_WHEN = {
    "seats_exceeded": "has a seat for every member",
    "payment_failed": "pays its failed invoice",
}


def credits_notice(facts: OrgFacts | None, now: float, config: Config) -> dict[str, Any]:
    """`credits_locked`, and for a refused organization a message saying until when."""
    if facts is None:
        return {"credits_locked": False}
    verdict = decide(facts, now, config.trial_days, config.past_due_grace_days)
    if verdict.allowed or verdict.reason is None:
        return {"credits_locked": False}
    reason = verdict.reason.value
    until = _UNLOCKED_WHEN.get(reason, "subscribes")
    page = billing_url(config.app_url, facts.organization_id)
    return {
        "credits_locked": True,
        "locked_reason": reason,
        "message": (
            f"Your organization's access is refused ({reason}): credits bought now are added"
            f" to its balance but stay locked until the organization {until} ({page})."
        ),
    }
