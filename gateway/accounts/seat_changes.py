"""A subscription as a person manages it, and a change of its seats as Stripe is asked
for it: pure functions of Stripe's objects (the handlers are `management.py`'s).

    more seats    now: the item's quantity, `proration_behavior=always_invoice`,
                  `payment_behavior=pending_if_incomplete`
    fewer seats   from the next period: a schedule whose current phase is the subscription
                  as it is, and whose next phase (one period) has the new quantity, then
                  released, so the subscription goes on with it
    the same      nothing, but a decrease still pending is dropped (its schedule released)

A decrease is never below the members using seats now (`seats_below_members`), nor on a
subscription cancelling at the period's end (`subscription_ending`). For a subscription
paid for during the organization's trial, the next period starts at the trial's end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gateway.access.refusals import iso_utc
from gateway.accounts.stripe_subscriptions import object_id, seat_items, subscription_state
from gateway.errors import BadRequest, Conflict, Reason
from gateway.plans import Catalog

MAX_SEATS = 1000
# The prorated rest of the period is invoiced and charged at once (see management.py).
INCREASE_PRORATION = "always_invoice"
# A decrease starts with a new period, which is billed in full at the new quantity.
DECREASE_PRORATION = "none"


@dataclasses.dataclass(frozen=True, slots=True)
class SeatItem:
    """The subscription's seat item: what a change of seats changes."""

    item_id: str
    price_id: str
    interval: str
    quantity: int
    period_end: int


def parse_seat_count(body: Mapping[str, Any]) -> int:
    """`seats`: a whole number from 1 to 1000; else 400 `invalid_request`."""
    seats = body.get("seats")
    if isinstance(seats, int) and not isinstance(seats, bool) and 1 <= seats <= MAX_SEATS:
        return seats
    raise BadRequest(
        f"'seats' must be a whole number from 1 to {MAX_SEATS}.",
        metadata={"min_seats": 1, "max_seats": MAX_SEATS},
    )


def seat_item(subscription: Mapping[str, Any], catalog: Catalog) -> SeatItem | None:
    """The one item priced from our catalog, or None (a subscription of another product)."""
    items = seat_items(subscription, catalog)
    if len(items) != 1:
        return None
    item = items[0]
    price = item.get("price") or {}
    return SeatItem(
        item_id=str(item["id"]),
        price_id=str(price.get("id")),
        interval=str((price.get("recurring") or {}).get("interval") or "year"),
        quantity=int(item.get("quantity") or 0),
        period_end=int(
            item.get("current_period_end") or subscription.get("current_period_end") or 0
        ),
    )


def refuse_below_members(seats: int, seats_used: int) -> None:
    """409 `seats_below_members` when fewer seats than members using one are asked for."""
    if seats >= seats_used:
        return
    raise Conflict(
        f"Your organization has {seats_used} member(s) using seats (billing managers take"
        f" none), so it needs at least {seats_used} seats, not {seats}. Remove members"
        " first, then lower the seats.",
        reason=Reason.SEATS_BELOW_MEMBERS,
        metadata={"seats_used": seats_used, "seats_requested": seats, "min_seats": seats_used},
    )


def refuse_decrease_when_ending(subscription: Mapping[str, Any]) -> None:
    """409 `subscription_ending` for fewer seats on a subscription cancelling at the period's
    end: there is no next period, and the schedule a decrease needs would renew it."""
    cancel_at = subscription.get("cancel_at")
    if not (subscription.get("cancel_at_period_end") or cancel_at):
        return
    ends = f" on {iso_utc(cancel_at)}" if isinstance(cancel_at, int) else ""
    raise Conflict(
        f"Your subscription ends{ends}, so there is no next period to have fewer seats in."
        " To keep it with fewer seats, resume it in the billing portal first.",
        reason=Reason.SUBSCRIPTION_ENDING,
        metadata={"cancel_at": iso_utc(cancel_at) if isinstance(cancel_at, int) else None},
    )


def increase_params(item: SeatItem, seats: int) -> dict[str, Any]:
    """The subscription update adding seats now, charged prorated at once."""
    return {
        "items": [{"id": item.item_id, "quantity": seats}],
        "proration_behavior": INCREASE_PRORATION,
        "payment_behavior": "pending_if_incomplete",
    }


def _phase_items(phase: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"price": object_id(i.get("price")), "quantity": int(i.get("quantity") or 0)}
        for i in phase.get("items") or []
    ]


def current_phase(schedule: Mapping[str, Any]) -> dict[str, Any]:
    """The schedule's phase now: the one `current_phase` names, else its first."""
    phases = [dict(p) for p in schedule.get("phases") or []]
    now = schedule.get("current_phase") or {}
    for phase in phases:
        if phase.get("start_date") == now.get("start_date"):
            return phase
    return phases[0]


def decrease_params(
    schedule: Mapping[str, Any], item: SeatItem, seats: int, organization_id: str
) -> dict[str, Any]:
    """The schedule update keeping this period as it is and the next one at `seats`."""
    phase = current_phase(schedule)
    kept: dict[str, Any] = {
        "items": _phase_items(phase),
        "start_date": phase["start_date"],
        "end_date": phase["end_date"],
        "proration_behavior": DECREASE_PRORATION,
    }
    if phase.get("trial_end"):
        # A subscription paid for during the organization's trial keeps trialing.
        kept["trial_end"] = phase["trial_end"]
    following = [
        {**i, "quantity": seats} if i["price"] == item.price_id else i for i in kept["items"]
    ]
    return {
        "end_behavior": "release",
        "proration_behavior": DECREASE_PRORATION,
        "phases": [
            kept,
            {
                "items": following,
                "duration": {"interval": item.interval, "interval_count": 1},
                "proration_behavior": DECREASE_PRORATION,
                "metadata": {"organization_id": organization_id},
            },
        ],
        "metadata": {"organization_id": organization_id, "seats_from_next_period": str(seats)},
    }


def scheduled_seats(schedule: Any, item: SeatItem) -> dict[str, Any] | None:
    """The seats a schedule sets from a later phase on, when they differ from now's."""
    if not isinstance(schedule, Mapping) or schedule.get("status") not in ("active", "not_started"):
        return None
    for phase in schedule.get("phases") or []:
        if int(phase.get("start_date") or 0) < item.period_end:
            continue
        seats = sum(i["quantity"] for i in _phase_items(phase) if i["price"] == item.price_id)
        if seats != item.quantity:
            return {"seats": seats, "effective_at": iso_utc(int(phase["start_date"]))}
    return None


def latest_invoice(invoice: Any) -> dict[str, Any] | None:
    """The latest invoice's id and Stripe status (`paid`, `open`, ...), if there is one."""
    if not isinstance(invoice, Mapping):
        return None if invoice is None else {"id": invoice, "status": None}
    return {"id": invoice.get("id"), "status": invoice.get("status")}


def describe_subscription(
    subscription: Mapping[str, Any], plan: str, catalog: Catalog
) -> dict[str, Any]:
    """What `GET .../subscription` shows of a subscription read from Stripe."""
    state = subscription_state(subscription, catalog)
    item = seat_item(subscription, catalog)
    cancel_at = subscription.get("cancel_at")
    return {
        "id": state.subscription_id,
        "plan": plan,
        "billing_cycle": state.billing_cycle,
        "seats": state.seat_count,
        "status": state.stripe_status,
        "current_period_end": iso_utc(state.expires_at.timestamp()),
        "cancel_at_period_end": bool(subscription.get("cancel_at_period_end") or cancel_at),
        "cancel_at": iso_utc(cancel_at) if isinstance(cancel_at, int) else None,
        "latest_invoice": latest_invoice(subscription.get("latest_invoice")),
        "scheduled_change": None
        if item is None
        else scheduled_seats(subscription.get("schedule"), item),
    }
