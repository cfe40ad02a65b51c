"""`python -m gateway stripe-setup`: the catalog's products and prices, created once.

Runs the real `stripe` library against `tests/fake_stripe.py`, in process and as the
command an operator types.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from gateway import config as gateway_config
from gateway.accounts.stripe_client import PORTAL_METADATA_KEY
from gateway.accounts.stripe_setup import SetupReport, run_stripe_setup
from gateway.config import PROJECT_ROOT
from gateway.plans import load_catalog
from tests.fake_stripe import RunningFakeStripe, new_id, stripe_env

COMMAND_TIMEOUT_SECONDS = 30.0
CATALOG = load_catalog()
EXPECTED_PRICES = {
    "kilo_teams_seat_yearly": (34800, "year"),
    "kilo_teams_seat_monthly": (2900, "month"),
    "kilo_enterprise_seat_yearly": (358800, "year"),
    "kilo_enterprise_seat_monthly": (29900, "month"),
}


async def setup_against(stripe_server: RunningFakeStripe) -> SetupReport:
    """Run stripe-setup with the settings pointing at the fake."""
    env = {k: str(v) for k, v in stripe_env(stripe_server).items()}
    config = gateway_config.from_env(env, need_upstream_key=False)
    return await run_stripe_setup(config)


def created(stripe_server: RunningFakeStripe, path: str) -> list[dict[str, Any]]:
    return [r.params for r in stripe_server.state.requests_to("POST", path)]


async def test_creates_two_products_and_four_prices(stripe_server: RunningFakeStripe) -> None:
    """An empty account gets one product per plan and its yearly and monthly seat prices
    (and the portal configuration: 7 created)."""
    report = await setup_against(stripe_server)
    assert (report.created, report.mismatched) == (7, 0)
    products = {p["id"]: p for p in stripe_server.state.products.values()}
    assert sorted(p["name"] for p in products.values()) == [
        "Kilo Code Enterprise",
        "Kilo Code Teams",
    ]
    prices = {p["lookup_key"]: p for p in stripe_server.state.prices.values()}
    assert {k: (p["unit_amount"], p["recurring"]["interval"]) for k, p in prices.items()} == (
        EXPECTED_PRICES
    )
    for lookup_key, price in prices.items():
        plan = CATALOG.by_lookup_key(lookup_key)
        assert plan is not None
        assert products[price["product"]]["metadata"] == {"kilo_plan": plan.plan}
        assert price["currency"] == "usd"
        assert price["nickname"]
        assert price["recurring"]["usage_type"] == "licensed"


async def test_second_run_creates_nothing(stripe_server: RunningFakeStripe) -> None:
    """Everything is found by lookup key the second time; no create request is sent."""
    await setup_against(stripe_server)
    posts_before = len([r for r in stripe_server.state.requests if r.method == "POST"])
    report = await setup_against(stripe_server)
    assert (report.created, report.mismatched) == (0, 0)
    assert len([r for r in stripe_server.state.requests if r.method == "POST"]) == posts_before
    assert all(line.startswith("found") for line in report.lines)
    assert len(stripe_server.state.prices) == 4


async def test_creates_are_idempotent_requests(stripe_server: RunningFakeStripe) -> None:
    """Each create carries an Idempotency-Key naming what it creates, so a retry is harmless."""
    await setup_against(stripe_server)
    keys = {r.idempotency_key for r in stripe_server.state.requests if r.method == "POST"}
    assert "product-teams" in keys
    assert "price-kilo_teams_seat_yearly-34800-year" in keys


async def test_existing_product_of_a_plan_is_reused(stripe_server: RunningFakeStripe) -> None:
    """A product tagged with its plan, but without prices yet, gets the prices."""
    product = {"id": new_id("prod"), "object": "product", "name": "Teams", "active": True}
    stripe_server.state.products[product["id"]] = {**product, "metadata": {"kilo_plan": "teams"}}
    report = await setup_against(stripe_server)
    assert report.created == 6  # four prices, the other product, the portal configuration
    assert [p["name"] for p in created(stripe_server, "/v1/products")] == ["Kilo Code Enterprise"]
    teams = [p for p in stripe_server.state.prices.values() if "teams" in p["lookup_key"]]
    assert {p["product"] for p in teams} == {product["id"]}


async def test_price_differing_from_config_is_reported_not_changed(
    stripe_server: RunningFakeStripe,
) -> None:
    """A price whose amount differs from plans.toml is reported and left as it is."""
    stale = stripe_server.state.add_price(
        product="prod_old",
        currency="usd",
        unit_amount=30000,
        recurring={"interval": "year"},
        lookup_key="kilo_teams_seat_yearly",
    )
    report = await setup_against(stripe_server)
    assert report.mismatched == 1
    assert any(line.startswith(f"DIFFERS price   {stale['id']}") for line in report.lines)
    lookup_keys = [p["lookup_key"] for p in created(stripe_server, "/v1/prices")]
    assert "kilo_teams_seat_yearly" not in lookup_keys
    assert stale["lookup_key"] == "kilo_teams_seat_yearly"


async def run_command(env: dict[str, str]) -> tuple[int, str, str]:
    """`python -m gateway stripe-setup` with `env` added; exit status, stdout, stderr."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    full_env.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "stripe-setup",
        cwd=PROJECT_ROOT,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_command_without_secret_key_names_it() -> None:
    """Without STRIPE_SECRET_KEY the command fails with a message naming it."""
    status, _, stderr = await run_command({})
    assert status == 2
    assert "STRIPE_SECRET_KEY" in stderr


async def test_command_prints_what_it_created_then_found(stripe_server: RunningFakeStripe) -> None:
    """The command lists each product and price; a second run creates nothing."""
    env = {k: str(v) for k, v in stripe_env(stripe_server).items()}
    status, stdout, stderr = await run_command(env)
    assert status == 0, stderr
    assert stdout.count("created price") == 4
    assert stdout.count("created portal configuration") == 1
    assert "stripe-setup: 7 created" in stdout
    status, stdout, _ = await run_command(env)
    assert status == 0
    assert stdout.count("found   price") == 4
    assert stdout.count("found   portal configuration") == 1
    assert "stripe-setup: 0 created, 0 updated" in stdout


# The Billing Portal configuration.


async def test_portal_configuration_is_created_once(stripe_server: RunningFakeStripe) -> None:
    """Run twice, stripe-setup makes one configuration: card updates, invoice history,
    cancelling at the period's end, no quantity changes; marked so it is found again."""
    await setup_against(stripe_server)
    await setup_against(stripe_server)
    (configuration,) = stripe_server.state.portal_configurations.values()
    assert len(created(stripe_server, "/v1/billing_portal/configurations")) == 1
    assert configuration["metadata"] == {PORTAL_METADATA_KEY: "1"}
    features = configuration["features"]
    assert features["payment_method_update"]["enabled"] is True
    assert features["invoice_history"]["enabled"] is True
    assert features["subscription_cancel"] == {
        **features["subscription_cancel"],
        "enabled": True,
        "mode": "at_period_end",
        "proration_behavior": "none",
    }
    assert features["subscription_update"]["enabled"] is False


async def test_portal_configuration_that_drifted_is_updated(
    stripe_server: RunningFakeStripe,
) -> None:
    """Someone turned quantity updates on in the Dashboard: the next run turns them off
    again, in the same configuration, and says so."""
    await setup_against(stripe_server)
    (configuration,) = stripe_server.state.portal_configurations.values()
    configuration["features"]["subscription_update"]["enabled"] = True
    report = await setup_against(stripe_server)
    assert report.updated == 1
    assert f"updated portal configuration {configuration['id']} (features)" in report.lines
    assert configuration["features"]["subscription_update"]["enabled"] is False
    assert len(stripe_server.state.portal_configurations) == 1


async def test_a_configuration_of_someone_else_is_left_alone(
    stripe_server: RunningFakeStripe,
) -> None:
    """A configuration without our mark (the account's default) is neither used nor changed."""
    theirs = {"id": new_id("bpc"), "active": True, "metadata": {}, "features": {}}
    stripe_server.state.portal_configurations[theirs["id"]] = theirs
    await setup_against(stripe_server)
    assert len(stripe_server.state.portal_configurations) == 2
    assert theirs["features"] == {}
