"""Money is integer microdollars everywhere: 1 USD = 1,000,000 (no float sums, no rounding
drift between the ledger, the balance and Stripe's cents)."""

from __future__ import annotations

MICRODOLLARS_PER_USD = 1_000_000
