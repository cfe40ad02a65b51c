"""Organizations on the billing side: create one without a card, its status, SSO via sales.

- `POST /api/organizations` (any valid key): the organization is created at once with the
  caller as owner; its trial starts now; no seat count, card, Stripe or free credits. The
  welcome email is queued in the same transaction.
- `GET /api/organizations/{id}` (any member): plan, trial, seats, subscription, credits,
  access (the proxy's own verdict), pricing and the call to action (`status.py`).
- `GET /api/organizations/{id}/members` (any member): who is in, with roles and emails;
  owners also see the pending invitations.
- `POST /api/organizations/{id}/sso/contact-sales` (owners of enterprise organizations):
  SSO is not self-serve; the request is recorded and emailed to `SALES_EMAIL`.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from aiohttp import web

from gateway.access.auth import authenticate
from gateway.access.cache import CACHE
from gateway.access.members import ANY_ROLE, OWNERS, authorize_member
from gateway.access.queries import Queryable, fetch_org_facts
from gateway.access.refusals import billing_url, iso_utc
from gateway.access.rule import OrgFacts, trial_end
from gateway.accounts.emails import queue_email, sales_contact_email, user_address, welcome_email
from gateway.accounts.payloads import choice_field, json_object, require_storable, string_field
from gateway.accounts.status import organization_status, plan_pricing
from gateway.common.context import CONTEXT
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, Forbidden, Reason
from gateway.plans import PLAN_NAMES
from gateway.platform.database import POOL, run_query

MAX_NAME_LENGTH = 100
MAX_MESSAGE_LENGTH = 5000

_CREATE_SQL = """
INSERT INTO organizations (name, plan, require_seats, free_trial_end_at)
VALUES ($1, $2, true, NULL)
RETURNING id::text
"""
_ADD_MEMBER_SQL = """
INSERT INTO organization_memberships (organization_id, user_id, role)
VALUES ($1::uuid, $2, $3)
"""
_NAME_SQL = "SELECT name FROM organizations WHERE id = $1::uuid"
# Pending: neither accepted nor revoked, and not yet expired (every query says it so).
PENDING_INVITATION = "accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()"
_PENDING_SQL = f"""
SELECT count(*) FROM organization_invitations
WHERE organization_id = $1::uuid AND {PENDING_INVITATION} AND ($2 OR role <> 'billing_manager')
"""
_SALES_CONTACT_SQL = """
INSERT INTO sales_contact_requests (organization_id, user_id, topic, message)
VALUES ($1::uuid, $2, 'sso', $3)
RETURNING id::text, created_at
"""
_MEMBERS_SQL = """
SELECT m.user_id, u.email, m.role, m.created_at
FROM organization_memberships m JOIN users u ON u.id = m.user_id
WHERE m.organization_id = $1::uuid ORDER BY m.created_at, m.user_id
"""
# Newest first; the sender is a user id, or null once that user is deleted.
_PENDING_LIST_SQL = f"""
SELECT id::text, email, role, invited_by,
       (SELECT u.email FROM users u WHERE u.id = invited_by) AS invited_by_email,
       created_at, expires_at
FROM organization_invitations
WHERE organization_id = $1::uuid AND {PENDING_INVITATION}
ORDER BY created_at DESC, id DESC
"""
_LOCK_ORG_SQL = "SELECT name, plan FROM organizations WHERE id = $1::uuid FOR NO KEY UPDATE"


def organization_url(app_url: str, organization_id: str) -> str:
    """The organization's page in the app (where a new organization's owner lands)."""
    return f"{app_url}/organizations/{organization_id}"


def membership_changed(app: web.Application, organization_id: str, user_id: str) -> None:
    """Evict this process's cached membership now; the NOTIFY does it everywhere else."""
    change = {"table": "organization_memberships", "organization_id": organization_id}
    app[CACHE].apply_change({**change, "user_id": user_id})


async def count_pending_invitations(
    conn: Queryable, organization_id: str, *, billing_managers: bool = True
) -> int:
    """Invitations still open; `billing_managers=False` counts only those that take a seat."""
    count: int = await conn.fetchval(_PENDING_SQL, organization_id, billing_managers)
    return count


async def lock_organization(conn: Queryable, organization_id: str) -> tuple[str, str] | None:
    """Lock the organization's row for this transaction; its name and plan, or None."""
    row = await conn.fetchrow(_LOCK_ORG_SQL, organization_id)
    return None if row is None else (row["name"], row["plan"])


def organization_name(body: dict[str, Any]) -> str:
    """The `name` field: required, one line, at most 100 characters."""
    name = string_field(body, "name", max_length=MAX_NAME_LENGTH)
    if any(not ch.isprintable() for ch in name):
        raise BadRequest("'name' must be a single line of printable characters.")
    return name


async def create_organization(
    conn: asyncpg.Connection, user_id: str, name: str, plan: str, config: Config
) -> dict[str, Any]:
    """Create the trialing organization, its owner and its welcome email, all or nothing."""
    async with conn.transaction():
        organization_id: str = await conn.fetchval(_CREATE_SQL, name, plan)
        await conn.execute(_ADD_MEMBER_SQL, organization_id, user_id, "owner")
        facts = await fetch_org_facts(conn, organization_id)
        assert facts is not None
        ends_at = trial_end(facts, config.trial_days)
        welcome = welcome_email(
            to=await user_address(conn, user_id),
            organization_name=name,
            plan_name=config.catalog.plans[plan].name,
            trial_days=config.trial_days,
            trial_ends_at=ends_at,
            organization_url=organization_url(config.app_url, organization_id),
            billing_url=billing_url(config.app_url, organization_id),
            price_display=plan_pricing(config.catalog, plan)["display"],
        )
        await queue_email(conn, welcome, organization_id=organization_id)
    return {
        "id": organization_id,
        "name": name,
        "plan": plan,
        "created_at": iso_utc(facts.created_at),
        "trial_ends_at": iso_utc(ends_at),
    }


async def create_handler(request: web.Request) -> web.Response:
    """`POST /api/organizations`: create a trialing organization owned by the caller."""
    app = request.app
    key = await authenticate(request.headers, app[CACHE])
    request[CONTEXT].user_id = key.user_id
    body = await json_object(request)
    name = organization_name(body)
    plan = choice_field(body, "plan", PLAN_NAMES, default="teams")
    config = app[CONFIG]
    timeout = config.database_query_timeout_seconds
    organization = await run_query(
        app[POOL], timeout, create_organization, key.user_id, name, plan, config
    )
    request[CONTEXT].organization_id = organization["id"]
    membership_changed(app, organization["id"], key.user_id)
    redirect_url = organization_url(config.app_url, organization["id"])
    return web.json_response(
        {"organization": organization, "redirect_url": redirect_url}, status=201
    )


async def fetch_status_rows(conn: Queryable, organization_id: str) -> tuple[OrgFacts, str, int]:
    """The organization's facts, name and how many invitations are pending; 403 when it
    does not exist (as for a non-member: the caller's membership was just checked)."""
    facts = await fetch_org_facts(conn, organization_id)
    if facts is None:
        raise Forbidden("You are not a member of this organization.", reason=Reason.NOT_A_MEMBER)
    name: str = await conn.fetchval(_NAME_SQL, organization_id)
    return facts, name, await count_pending_invitations(conn, organization_id)


async def status_handler(request: web.Request) -> web.Response:
    """`GET /api/organizations/{id}`: the organization's status, for any of its members."""
    organization_id, _key, _role = await authorize_member(request, ANY_ROLE)
    status, _facts = await read_status(request.app, organization_id)
    return web.json_response(status)


async def read_status(
    app: web.Application, organization_id: str
) -> tuple[dict[str, Any], OrgFacts]:
    """The organization's status judged now, and the facts it was judged on."""
    config = app[CONFIG]
    timeout = config.database_query_timeout_seconds
    # Read, not cached: the page an owner reloads right after paying shows what the
    # webhook just wrote, not the facts until this process's NOTIFY arrives.
    facts, name, pending = await run_query(app[POOL], timeout, fetch_status_rows, organization_id)
    status = organization_status(
        facts,
        time.time(),
        name=name,
        pending_invitations=pending,
        trial_days=config.trial_days,
        grace_days=config.past_due_grace_days,
        app_url=config.app_url,
        catalog=config.catalog,
    )
    return status, facts


def sales_message(body: dict[str, Any]) -> str:
    """The optional `message` field for sales (at most 5000 characters)."""
    message = body.get("message", "")
    if not isinstance(message, str):
        raise BadRequest("'message' must be a string.")
    if len(message) > MAX_MESSAGE_LENGTH:
        raise BadRequest(f"'message' must be at most {MAX_MESSAGE_LENGTH} characters.")
    require_storable(message, "message")
    return message.strip()


async def record_sales_contact(
    conn: asyncpg.Connection, organization_id: str, user_id: str, message: str, sales_email: str
) -> dict[str, Any]:
    """Record an enterprise organization's SSO request and email sales; 400 for teams."""
    async with conn.transaction():
        found = await lock_organization(conn, organization_id)
        assert found is not None  # the caller is an owner of it
        name, plan = found
        if plan != "enterprise":
            raise BadRequest(
                "Single sign-on (SSO) is an Enterprise plan feature and is set up with our"
                " sales team; it is not self-serve. Teams organizations cannot request it.",
                reason=Reason.SSO_REQUIRES_ENTERPRISE,
            )
        row = await conn.fetchrow(_SALES_CONTACT_SQL, organization_id, user_id, message)
        requester = await user_address(conn, user_id)
        email = sales_contact_email(
            to=sales_email,
            organization_id=organization_id,
            organization_name=name,
            plan=plan,
            requester_email=requester,
            message=message or "(no message)",
        )
        await queue_email(conn, email, organization_id=organization_id)
    return {
        "contact_request": {**_with_times(row), "topic": "sso"},
        "message": f"Our sales team will contact you at {requester} to set up SSO.",
    }


async def contact_sales_handler(request: web.Request) -> web.Response:
    """`POST /api/organizations/{id}/sso/contact-sales`: ask sales for enterprise SSO."""
    organization_id, key, _role = await authorize_member(request, OWNERS)
    message = sales_message(await json_object(request))
    config = request.app[CONFIG]
    result = await run_query(
        request.app[POOL],
        config.database_query_timeout_seconds,
        record_sales_contact,
        organization_id,
        key.user_id,
        message,
        config.sales_email,
    )
    return web.json_response(result, status=202)


async def fetch_members(
    conn: asyncpg.Connection, organization_id: str, with_invitations: bool
) -> dict[str, Any]:
    """The members (and, for owners, the pending invitations) of the organization."""
    members = await conn.fetch(_MEMBERS_SQL, organization_id)
    listing: dict[str, Any] = {"members": [_with_times(r) for r in members]}
    if with_invitations:
        listing["invitations"] = await list_pending_invitations(conn, organization_id)
    return listing


async def list_pending_invitations(
    conn: asyncpg.Connection, organization_id: str
) -> list[dict[str, Any]]:
    """The organization's pending invitations, newest first; never a token or its hash."""
    return [_with_times(r) for r in await conn.fetch(_PENDING_LIST_SQL, organization_id)]


def _with_times(row: Any) -> dict[str, Any]:
    """A row as JSON, its timestamps as ISO 8601 UTC."""
    return {k: iso_utc(v.timestamp()) if k.endswith("_at") else v for k, v in dict(row).items()}


async def members_handler(request: web.Request) -> web.Response:
    """`GET /api/organizations/{id}/members`: members for any member; invitations for owners."""
    organization_id, _key, role = await authorize_member(request, ANY_ROLE)
    timeout = request.app[CONFIG].database_query_timeout_seconds
    listing = await run_query(
        request.app[POOL], timeout, fetch_members, organization_id, role == "owner"
    )
    return web.json_response(listing)


def setup(app: web.Application) -> None:
    """Register this module's routes."""
    app.router.add_post("/api/organizations", create_handler)
    app.router.add_get("/api/organizations/{organization_id}", status_handler)
    app.router.add_get("/api/organizations/{organization_id}/members", members_handler)
    app.router.add_post(
        "/api/organizations/{organization_id}/sso/contact-sales", contact_sales_handler
    )
