"""`GET /api/organizations/{id}/usage`: where an organization's credits went.

Owners and billing managers see totals for a period, broken down by model and by member,
straight from `llm_usage`, so no charge is unexplained.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.access.members import authorize_member
from gateway.access.queries import Queryable
from gateway.common.money import MICRODOLLARS_PER_USD
from gateway.config import CONFIG
from gateway.errors import BadRequest, Reason
from gateway.platform.database import POOL, run_query

DEFAULT_PERIOD = timedelta(days=30)
REPORT_ROLES = frozenset({"owner", "billing_manager"})

_TOTALS_SQL = """
SELECT count(*) AS requests,
       coalesce(sum(cost_microdollars), 0)::bigint AS cost_microdollars,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens
FROM llm_usage
WHERE organization_id = $1::uuid AND created_at >= $2 AND created_at < $3
"""
_BY_MODEL_SQL = """
SELECT model, count(*) AS requests,
       sum(cost_microdollars)::bigint AS cost_microdollars,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens
FROM llm_usage
WHERE organization_id = $1::uuid AND created_at >= $2 AND created_at < $3
GROUP BY model ORDER BY cost_microdollars DESC, model
"""
_BY_MEMBER_SQL = """
SELECT u.user_id, users.email, count(*) AS requests,
       sum(u.cost_microdollars)::bigint AS cost_microdollars,
       coalesce(sum(u.prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(u.completion_tokens), 0)::bigint AS completion_tokens
FROM llm_usage u LEFT JOIN users ON users.id = u.user_id
WHERE u.organization_id = $1::uuid AND u.created_at >= $2 AND u.created_at < $3
GROUP BY u.user_id, users.email ORDER BY cost_microdollars DESC, u.user_id
"""


def parse_period(query: Any, now: datetime) -> tuple[datetime, datetime]:
    """The `from`/`to` query parameters (ISO 8601; default the last 30 days), or 400."""
    end = _parse_instant(query.get("to"), "to") or now
    try:
        start = _parse_instant(query.get("from"), "from") or end - DEFAULT_PERIOD
    except OverflowError:
        raise BadRequest("'to' is too early.", reason=Reason.INVALID_PERIOD) from None
    if start >= end:
        raise BadRequest("'from' must be earlier than 'to'.", reason=Reason.INVALID_PERIOD)
    return start, end


def _parse_instant(value: str | None, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"'{name}' must be an ISO 8601 date or time, like 2026-11-01 or 2026-11-01T00:00:00Z.",
            reason=Reason.INVALID_PERIOD,
        ) from None
    instant = instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)
    try:
        return instant.astimezone(UTC)  # year 0 or 10000 in UTC does not exist
    except OverflowError:
        raise BadRequest(f"'{name}' is out of range.", reason=Reason.INVALID_PERIOD) from None


async def fetch_report(
    conn: Queryable, organization_id: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """Totals, per model and per member, for the organization in [start, end)."""
    totals = await conn.fetchrow(_TOTALS_SQL, organization_id, start, end)
    by_model = await conn.fetch(_BY_MODEL_SQL, organization_id, start, end)
    by_member = await conn.fetch(_BY_MEMBER_SQL, organization_id, start, end)
    return {
        "organization_id": organization_id,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "total": _figures(totals),
        "by_model": [{"model": r["model"], **_figures(r)} for r in by_model],
        "by_member": [
            {"user_id": r["user_id"], "email": r["email"], **_figures(r)} for r in by_member
        ],
    }


def _figures(row: Any) -> dict[str, Any]:
    return {
        "requests": row["requests"],
        "cost_microdollars": row["cost_microdollars"],
        "cost_usd": row["cost_microdollars"] / MICRODOLLARS_PER_USD,
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
    }


async def usage_report_handler(request: web.Request) -> web.Response:
    """Serve the usage report to the organization's owners and billing managers."""
    app = request.app
    organization_id, _key, _role = await authorize_member(request, REPORT_ROLES)
    start, end = parse_period(request.query, datetime.now(UTC))
    timeout = app[CONFIG].database_query_timeout_seconds
    report = await run_query(app[POOL], timeout, fetch_report, organization_id, start, end)
    return web.json_response(report)
