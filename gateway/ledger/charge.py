"""The `Charge` record, and writing a batch of charges to the ledger exactly once.

A `Charge` is one metered request as `llm_usage` records it; `Charge.make` clamps every
field to fit its column, whatever the upstream reported. `read_spool` turns a spool file
back into charges.

`write_batch` is the one statement that charges organizations: it inserts into `llm_usage`
only the rows whose `request_id` is new and adds to `credits_used_microdollars` only what
it inserted, so a batch retried after an unknown outcome never charges twice, and several
processes charging one organization leave exactly the sum. Kept apart from the queueing
and spooling in `writer.py` because it is what decides what an organization pays, and is
tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import structlog

from gateway.common.money import MICRODOLLARS_PER_USD
from gateway.ledger.spool import read_records
from gateway.platform.database import UNAVAILABLE_ERRORS

log = structlog.get_logger("gateway.usage")

INT4_MAX = 2**31 - 1
# No single request costs more than this; a larger figure from the upstream is an error,
# charged at this ceiling (and logged) rather than overflowing the ledger.
MAX_COST_MICRODOLLARS = 10_000 * MICRODOLLARS_PER_USD
MAX_MODEL_LENGTH = 300
# Charges encoded at a time before other work on the event loop may run.
ENCODE_SLICE = 128
# Errors worth retrying as they are: serialization failures and deadlocks.
_RETRY_SQLSTATE_CLASS = "40"


class Charge(NamedTuple):
    """One metered request, as `llm_usage` records it (a tuple: one is made per request,
    and a batch turns into the statement's columns with one `zip`)."""

    request_id: str
    organization_id: str
    user_id: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_microdollars: int
    streamed: bool
    status: int
    cancelled: bool = False

    @classmethod
    def make(
        cls,
        request_id: str,
        organization_id: str,
        user_id: str,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cost_microdollars: int,
        streamed: bool,
        status: int,
        cancelled: bool,
    ) -> Charge:
        """A charge whose every field fits its column, whatever the upstream reported."""
        if not 0 <= cost_microdollars <= MAX_COST_MICRODOLLARS:
            if cost_microdollars > MAX_COST_MICRODOLLARS:
                log.warning("usage_cost_capped", request_id=request_id, reported=cost_microdollars)
            cost_microdollars = min(max(cost_microdollars, 0), MAX_COST_MICRODOLLARS)
        if model is not None and (len(model) > MAX_MODEL_LENGTH or "\x00" in model):
            model = model.replace("\x00", "")[:MAX_MODEL_LENGTH]
        if prompt_tokens is not None and not 0 <= prompt_tokens <= INT4_MAX:
            prompt_tokens = _clamp_tokens(prompt_tokens)
        if completion_tokens is not None and not 0 <= completion_tokens <= INT4_MAX:
            completion_tokens = _clamp_tokens(completion_tokens)
        if not 0 <= status <= 999:
            status = min(max(status, 0), 999)
        # Positional: this runs once per metered request.
        return cls(
            request_id,
            organization_id,
            user_id,
            model,
            prompt_tokens,
            completion_tokens,
            cost_microdollars,
            streamed,
            status,
            cancelled,
        )

    def record(self) -> dict[str, Any]:
        """The charge as a plain record (for the spool)."""
        return self._asdict()

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Charge:
        return cls(**record)


def worth_retrying(exc: asyncpg.PostgresError) -> bool:
    """An error that says nothing about the rows: an outage, a deadlock, a serialization
    failure. Any other error refuses the rows, and retrying them as they are cannot help."""
    return isinstance(exc, UNAVAILABLE_ERRORS) or (exc.sqlstate or "").startswith(
        _RETRY_SQLSTATE_CLASS
    )


def _clamp_tokens(count: int) -> int:
    return min(max(count, 0), INT4_MAX)


def read_spool(path: Path) -> list[Charge]:
    """The charges in a spool file (a torn last line is skipped). Blocking: not for the
    event loop (the ledger replays through its spool thread)."""
    with path.open("r", encoding="utf-8") as f:
        return charges_of(read_records(f))


def charges_of(records: list[dict[str, Any]]) -> list[Charge]:
    charges = []
    for record in records:
        with contextlib.suppress(TypeError):
            charges.append(Charge.from_record(record))
    return charges


# One statement: insert the batch, then charge each organization for exactly what it
# inserted. The batch arrives as one JSON array of rows (Charge's fields, in order):
# encoding ten arrays element by element cost the gateway about 3 us per row, JSON 0.5.
# `{on_conflict}` is empty for the first attempt (see `write_batch`).
_WRITE_BATCH_TEMPLATE = """
WITH batch AS (
    SELECT r->>0 AS request_id, (r->>1)::uuid AS organization_id, r->>2 AS user_id,
           r->>3 AS model, (r->>4)::int AS prompt_tokens, (r->>5)::int AS completion_tokens,
           (r->>6)::bigint AS cost_microdollars, (r->>7)::bool AS streamed,
           (r->>8)::int AS status, (r->>9)::bool AS cancelled, position
    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS rows(r, position)
), inserted AS (
    INSERT INTO llm_usage (request_id, organization_id, user_id, model, prompt_tokens,
                           completion_tokens, cost_microdollars, streamed, status, cancelled)
    SELECT request_id, organization_id, user_id, model, prompt_tokens, completion_tokens,
           cost_microdollars, streamed, status, cancelled
    FROM batch ORDER BY position
    {on_conflict}
    RETURNING organization_id, cost_microdollars
), per_org AS (
    SELECT organization_id, sum(cost_microdollars)::bigint AS total
    FROM inserted GROUP BY organization_id
), charged AS (
    UPDATE organizations o
    SET credits_used_microdollars = o.credits_used_microdollars + per_org.total
    FROM per_org
    WHERE o.id = per_org.organization_id AND per_org.total <> 0
    RETURNING per_org.total
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       coalesce((SELECT sum(total) FROM charged), 0)::bigint AS charged
"""
_INSERT_BATCH_SQL = _WRITE_BATCH_TEMPLATE.format(on_conflict="")
_INSERT_NEW_OF_BATCH_SQL = _WRITE_BATCH_TEMPLATE.format(
    on_conflict="ON CONFLICT (request_id) DO NOTHING"
)


# Rows go in a fixed order, organization then request (see `write_batch`).
LOCK_ORDER = operator.itemgetter(1, 0)
ORGANIZATION = operator.itemgetter(1)
COST = operator.itemgetter(6)


async def write_batch(conn: asyncpg.Connection, charges: list[Charge]) -> tuple[int, int]:
    """Write a batch atomically; return (rows new to the ledger, microdollars charged).

    Rows go in a fixed order (organization, then request) so that two processes writing
    overlapping batches take their locks in the same order instead of deadlocking.
    """
    ordered = sorted(charges, key=LOCK_ORDER)
    payload = await _encode_in_slices(ordered)
    # One statement is one transaction: no BEGIN and COMMIT round trips around it.
    try:
        # A plain insert costs PostgreSQL about 6 us a row, one with ON CONFLICT 9: the
        # speculative insertion it needs is paid for every row, conflict or not.
        row = await conn.fetchrow(_INSERT_BATCH_SQL, payload)
    except asyncpg.UniqueViolationError:
        # Some rows are in already (a batch retried after an unknown outcome, a spool
        # replayed again): the failed statement changed nothing; skip the rows written.
        row = await conn.fetchrow(_INSERT_NEW_OF_BATCH_SQL, payload)
    assert row is not None
    return int(row["inserted"]), int(row["charged"])


async def _encode_in_slices(rows: list[Charge]) -> str:
    """The rows as one JSON array, encoded a slice at a time.

    A batch of 500 encoded at once held the event loop for about half a millisecond, and
    every request and stream chunk arriving meanwhile waited; between slices they go first.
    """
    parts = []
    for start in range(0, len(rows), ENCODE_SLICE):
        if start:
            await asyncio.sleep(0)
        parts.append(json.dumps(rows[start : start + ENCODE_SLICE])[1:-1])
    return f"[{','.join(parts)}]"
