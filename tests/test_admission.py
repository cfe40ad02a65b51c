"""`admit` as a table: the caller, the facts, the instant and the policy in; an Admission
(or the 402 of enforce mode) out. Pure: no cache, no request, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.access.admission import UNREAD, Admission, Policy, admit
from gateway.access.auth import Caller
from gateway.config import EnforcementMode
from gateway.errors import PaymentRequired, Reason
from tests.test_rule import AFTER, NOON, facts

CALLER = Caller("user_a", "0b9e4a5e-6a3c-4a8e-9a43-5f2a1f9c0d11", "member")
ENFORCE = Policy(30, EnforcementMode.ENFORCE, "https://app.example.test", 14)
SHADOW = Policy(30, EnforcementMode.SHADOW, "https://app.example.test", 14)
OFF = Policy(30, EnforcementMode.OFF, "https://app.example.test", 14)
FUNDED = {"credits_acquired_microdollars": 5_000_000}
PAID_MODEL = "openai/gpt-4o-mini"
FREE_MODEL = "meta-llama/llama-3.1-8b-instruct:free"

# (case, facts, instant, policy, unwritten microdollars, model, the Admission)
ADMITTED: list[tuple[str, dict[str, Any], float, Policy, int, Any, Admission]] = [
    ("trialing with credits", FUNDED, NOON, ENFORCE, 0, UNREAD, Admission(CALLER)),
    (
        "trialing, balance used up, model not read yet",
        {},
        NOON,
        ENFORCE,
        0,
        UNREAD,
        Admission(CALLER, needs_model=True),
    ),
    (
        "this process's unwritten charges use the balance up",
        FUNDED,
        NOON,
        ENFORCE,
        5_000_000,
        UNREAD,
        Admission(CALLER, needs_model=True),
    ),
    ("balance used up, a free model", {}, NOON, ENFORCE, 0, FREE_MODEL, Admission(CALLER)),
    (
        "balance left, the model read anyway",
        FUNDED,
        NOON,
        ENFORCE,
        0,
        PAID_MODEL,
        Admission(CALLER),
    ),
    (
        "trial over, shadow mode",
        FUNDED,
        AFTER,
        SHADOW,
        0,
        UNREAD,
        Admission(CALLER, "trial_expired"),
    ),
    (
        "balance used up, a paid model, shadow mode",
        {},
        NOON,
        SHADOW,
        0,
        PAID_MODEL,
        Admission(CALLER, "insufficient_credits"),
    ),
    ("trial over, enforcement off", {}, AFTER, OFF, 0, UNREAD, Admission(CALLER)),
    (
        "balance used up, a paid model, enforcement off",
        {},
        NOON,
        OFF,
        0,
        PAID_MODEL,
        Admission(CALLER),
    ),
]

# (case, facts, instant, unwritten microdollars, model, the reason of the 402)
REFUSED: list[tuple[str, dict[str, Any], float, int, Any, Reason]] = [
    ("trial over, never subscribed", FUNDED, AFTER, 0, UNREAD, Reason.TRIAL_EXPIRED),
    ("trial over, even with the model read", {}, AFTER, 0, PAID_MODEL, Reason.TRIAL_EXPIRED),
    ("balance used up, a paid model", {}, NOON, 0, PAID_MODEL, Reason.INSUFFICIENT_CREDITS),
    (
        "unwritten charges use it up, a paid model",
        FUNDED,
        NOON,
        5_000_000,
        PAID_MODEL,
        Reason.INSUFFICIENT_CREDITS,
    ),
]


@pytest.mark.parametrize(
    ("overrides", "now", "policy", "unwritten", "model", "expected"),
    [case[1:] for case in ADMITTED],
    ids=[case[0] for case in ADMITTED],
)
def test_admitted(
    overrides: dict[str, Any],
    now: float,
    policy: Policy,
    unwritten: int,
    model: Any,
    expected: Admission,
) -> None:
    got = admit(
        CALLER, facts(**overrides), now, policy, unwritten_microdollars=unwritten, model=model
    )
    assert got == expected


@pytest.mark.parametrize(
    ("overrides", "now", "unwritten", "model", "reason"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_in_enforce_mode(
    overrides: dict[str, Any], now: float, unwritten: int, model: Any, reason: Reason
) -> None:
    with pytest.raises(PaymentRequired) as refused:
        admit(
            CALLER, facts(**overrides), now, ENFORCE, unwritten_microdollars=unwritten, model=model
        )
    assert refused.value.reason == reason
