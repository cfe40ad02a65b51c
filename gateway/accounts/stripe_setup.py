"""`python -m gateway stripe-setup`: make Stripe hold the products and prices of
`config/plans.toml`, idempotently.

Prices are found by their lookup key first and created only when missing, so a second
run creates nothing. A product is found through one of its plan's prices, else by its
`kilo_plan` metadata, else created. A price whose amount or interval differs from the
file is reported, never changed: Stripe prices are immutable, and moving a lookup key
to a new price is a decision for a person.

It also makes the Billing Portal configuration the portal sessions use
(`POST /api/organizations/{id}/billing/portal`): card updates, invoice history and
cancelling at the period's end, with subscription updates off, since seats change through
`POST .../subscription/seats` (which keeps a decrease for the next period and never goes
below the members). It is found again by its `kilo_portal` metadata; one whose features
differ from these is updated, since stripe-setup owns it (unlike a price, it is mutable
and nothing refers to its old state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.accounts.stripe_client import PORTAL_METADATA_KEY, StripeApi, new_stripe_api
from gateway.config import Config
from gateway.plans import Catalog, Plan, Price

PLAN_METADATA_KEY = "kilo_plan"
PORTAL_NAME = "Kilo Code organizations"
# What the portal offers; compared with what Stripe holds, key by key.
PORTAL_FEATURES: dict[str, Any] = {
    "payment_method_update": {"enabled": True},
    "invoice_history": {"enabled": True},
    # No refunds for cancelling (the spec's non-requirement): access lasts the period out.
    "subscription_cancel": {"enabled": True, "mode": "at_period_end", "proration_behavior": "none"},
    "subscription_update": {"enabled": False},
}


@dataclasses.dataclass
class SetupReport:
    """What stripe-setup found and did, one line per product and price."""

    lines: list[str] = dataclasses.field(default_factory=list)
    created: int = 0
    updated: int = 0
    mismatched: int = 0


async def run_stripe_setup(config: Config) -> SetupReport:
    """Ensure the catalog exists in the Stripe account of `config`."""
    api = new_stripe_api(config)
    try:
        report = await ensure_catalog(api, config.catalog)
        await ensure_portal_configuration(api, report)
        return report
    finally:
        await api.close()


async def ensure_catalog(api: StripeApi, catalog: Catalog) -> SetupReport:
    """Create whatever products and prices of the catalog Stripe lacks."""
    lookup_keys = [p.lookup_key for plan in catalog.plans.values() for p in plan.prices.values()]
    existing = await api.prices_by_lookup_key(lookup_keys)
    products = await api.products()
    report = SetupReport()
    for plan in catalog.plans.values():
        product_id = await ensure_product(api, plan, existing, products, report)
        for price in plan.prices.values():
            found = existing.get(price.lookup_key)
            if found is None:
                await create_price(api, catalog, plan, price, product_id, report)
            else:
                check_price(catalog, price, found, report)
    return report


async def ensure_product(
    api: StripeApi,
    plan: Plan,
    existing: dict[str, dict[str, Any]],
    products: list[dict[str, Any]],
    report: SetupReport,
) -> str:
    """The id of the plan's product: that of one of its prices, else by metadata, else new."""
    for price in plan.prices.values():
        if price.lookup_key in existing:
            product_id = str(existing[price.lookup_key]["product"])
            report.lines.append(f"found   product {product_id} ({plan.name})")
            return product_id
    for product in products:
        if product.get("metadata", {}).get(PLAN_METADATA_KEY) == plan.key:
            report.lines.append(f"found   product {product['id']} ({plan.name})")
            return str(product["id"])
    params = {"name": plan.name, "metadata": {PLAN_METADATA_KEY: plan.key}}
    product_id = await api.create_product(params, f"product-{plan.key}")
    report.lines.append(f"created product {product_id} ({plan.name})")
    report.created += 1
    return product_id


async def create_price(
    api: StripeApi, catalog: Catalog, plan: Plan, price: Price, product_id: str, report: SetupReport
) -> None:
    """Create one per-seat recurring price under its lookup key."""
    params = {
        "product": product_id,
        "currency": catalog.currency,
        "unit_amount": price.unit_amount_cents,
        "recurring": {"interval": price.interval, "usage_type": "licensed"},
        "lookup_key": price.lookup_key,
        # Only an archived price can still hold the key (active ones were found above).
        "transfer_lookup_key": True,
        "nickname": f"{plan.name}, per seat, {price.billing_cycle}",
        "metadata": {PLAN_METADATA_KEY: plan.key, "billing_cycle": price.billing_cycle},
    }
    key = f"price-{price.lookup_key}-{price.unit_amount_cents}-{price.interval}"
    price_id = await api.create_price(params, key)
    report.lines.append(f"created price   {price_id} {describe(catalog, price)}")
    report.created += 1


def check_price(catalog: Catalog, price: Price, found: dict[str, Any], report: SetupReport) -> None:
    """Report an existing price, and whether it still matches the catalog."""
    interval = (found.get("recurring") or {}).get("interval")
    matches = (
        found.get("unit_amount") == price.unit_amount_cents
        and interval == price.interval
        and found.get("currency") == catalog.currency
    )
    if matches:
        report.lines.append(f"found   price   {found['id']} {describe(catalog, price)}")
        return
    report.mismatched += 1
    report.lines.append(
        f"DIFFERS price   {found['id']} {price.lookup_key}: Stripe has "
        f"{found.get('unit_amount')} {found.get('currency')} per {interval}, the catalog says "
        f"{price.unit_amount_cents} {catalog.currency} per {price.interval}; left unchanged"
    )


def describe(catalog: Catalog, price: Price) -> str:
    """`kilo_teams_seat_yearly: 34800 usd per seat per year`."""
    return (
        f"{price.lookup_key}: {price.unit_amount_cents} {catalog.currency} "
        f"per seat per {price.interval}"
    )


def portal_params() -> dict[str, Any]:
    """The Billing Portal configuration stripe-setup creates."""
    return {
        "name": PORTAL_NAME,
        "features": PORTAL_FEATURES,
        "metadata": {PORTAL_METADATA_KEY: "1"},
    }


def has_features(found: Any, wanted: Any) -> bool:
    """True when `found` holds every key of `wanted` with the same value (Stripe adds more)."""
    if isinstance(wanted, dict):
        return isinstance(found, dict) and all(
            has_features(found.get(key), value) for key, value in wanted.items()
        )
    return bool(found == wanted)


async def ensure_portal_configuration(api: StripeApi, report: SetupReport) -> str:
    """The id of our Billing Portal configuration: found (updated if it differs), else new."""
    for found in await api.portal_configurations():
        if not (found.get("metadata") or {}).get(PORTAL_METADATA_KEY):
            continue
        if has_features(found.get("features"), PORTAL_FEATURES):
            report.lines.append(f"found   portal configuration {found['id']}")
        else:
            await api.update_portal_configuration(found["id"], {"features": PORTAL_FEATURES})
            report.lines.append(f"updated portal configuration {found['id']} (features)")
            report.updated += 1
        return str(found["id"])
    configuration_id = await api.create_portal_configuration(portal_params(), "portal-config-1")
    report.lines.append(f"created portal configuration {configuration_id}")
    report.created += 1
    return configuration_id
