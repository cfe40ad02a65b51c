"""Plans and prices, read once from `config/plans.toml` (never written in code).

Prices are stored per seat in cents for the billing interval; people are always shown
the monthly figure ($29 per seat per month, billed annually as $348).

Also where the files the package ships are: `config/` and `sql/` stay at the top of the
repository and a wheel carries them inside the package, as `gateway.config_files` and
`gateway.sql` (the `package-dir` mapping in pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

# The checkout this module runs from (in a wheel install: the site-packages directory).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Each shipped package and the repository directory it is built from (pyproject.toml).
SHIPPED = {"gateway.config_files": "config", "gateway.sql": "sql"}


def shipped_dir(package: str) -> Path:
    """The directory of `package`, one of SHIPPED, in this installation.

    Running from a checkout, it is the checkout's own directory. A wheel install has it
    inside the package; an editable install maps it to the directory of the checkout it
    was made from (setuptools' finder). Not `importlib.resources.files`: on Python 3.11
    it fails for these directory-only (namespace) packages in an editable install
    (python/importlib_resources#311).
    """
    found: list[Path] = []
    if (PROJECT_ROOT / "pyproject.toml").is_file():  # a checkout, not site-packages
        # First: an editable install maps to the checkout it was made from, which need
        # not be this one (a second worktree, the bench's --baseline-tree).
        found.append(PROJECT_ROOT / SHIPPED[package])
    spec = importlib.util.find_spec(package)
    found += [Path(p) for p in spec.submodule_search_locations or []] if spec else []
    for path in found:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{package} is missing from this installation of the gateway")


PLANS_FILE = shipped_dir("gateway.config_files") / "plans.toml"
PLAN_NAMES = ("teams", "enterprise")
BILLING_CYCLES = ("yearly", "monthly")
_MONTHS = {"year": 12, "month": 1}


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """One per-seat price of a plan."""

    plan: str
    billing_cycle: str
    lookup_key: str
    unit_amount_cents: int
    interval: str  # Stripe's recurring interval: "year" or "month"

    @property
    def monthly_cents(self) -> int:
        """The price per seat per month, the way it is always shown."""
        return self.unit_amount_cents // _MONTHS[self.interval]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    key: str
    name: str
    prices: dict[str, Price]


@dataclasses.dataclass(frozen=True, slots=True)
class Catalog:
    """Every plan and price, plus what the status page needs to show about them."""

    currency: str
    plans: dict[str, Plan]
    contact_sales_url: str
    sso_cost_usd_per_month: int

    def price(self, plan: str, billing_cycle: str) -> Price:
        """The price for a plan and cycle; KeyError when there is none."""
        return self.plans[plan].prices[billing_cycle]

    def by_lookup_key(self, lookup_key: str) -> Price | None:
        """The price with this Stripe lookup key, if it is one of ours."""
        for plan in self.plans.values():
            for price in plan.prices.values():
                if price.lookup_key == lookup_key:
                    return price
        return None


def load_catalog(path: Path = PLANS_FILE) -> Catalog:
    """Read and check the plans file."""
    with path.open("rb") as f:
        raw: dict[str, Any] = tomllib.load(f)
    plans = {key: _plan(key, raw["plans"][key]) for key in PLAN_NAMES}
    return Catalog(
        currency=raw["currency"],
        plans=plans,
        contact_sales_url=raw["contact_sales_url"],
        sso_cost_usd_per_month=int(raw["sso_cost_usd_per_month"]),
    )


def _plan(key: str, raw: dict[str, Any]) -> Plan:
    prices = {
        cycle: Price(
            plan=key,
            billing_cycle=cycle,
            lookup_key=str(raw["prices"][cycle]["lookup_key"]),
            unit_amount_cents=int(raw["prices"][cycle]["unit_amount_cents"]),
            interval=str(raw["prices"][cycle]["interval"]),
        )
        for cycle in BILLING_CYCLES
    }
    return Plan(key=key, name=str(raw["name"]), prices=prices)
