"""A real aiohttp server that speaks enough of Stripe's REST API for the gateway's tests.

The real `stripe` library talks to it (`STRIPE_API_BASE` points here): form-encoded
POSTs to create customers, Checkout Sessions, products and prices, to update
subscriptions, to create, update and release subscription schedules, and to create
Billing Portal configurations and sessions and update configurations; GETs to list prices
by lookup key, products and portal configurations and to retrieve subscriptions (with
`expand[]` of the latest invoice and the schedule). Like Stripe it refuses a parameter
the endpoint does not take (400 `invalid_request_error`, "Received unknown parameter:
X"; what each endpoint takes comes from the library's own request types,
`tests/stripe_params.py`) and a Checkout trial that ends within 48 hours, replays the
first answer to a repeated `Idempotency-Key` and refuses the key when the parameters
differ. Every request is recorded with its decoded parameters and headers, the
`Stripe-Version` included.

Also here: builders for the Stripe-shaped subscription and event objects the webhook
tests sign and deliver, and what Stripe does behind its API: a Checkout completed
(`complete_checkout`: the subscription it creates, trialing until the session's
`trial_end`), a subscription changed (`update_subscription`) or renewed (`renew`, with
its schedule's next quantity), each with its event.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from gateway.accounts.stripe_setup import run_stripe_setup
from gateway.config import from_env
from gateway.plans import Catalog
from tests.stripe_params import refusal

API_VERSION = "2026-10-28.endive"
# Stripe's floor for a Checkout Session's subscription_data.trial_end.
MIN_TRIAL_SECONDS = 48 * 3600
# The secrets a test gateway is configured with; the fake accepts any `sk_` key.
SECRET_KEY = "sk_test_gateway_0123456789abcdefSECRET"
WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
_BRACKETS = re.compile(r"\[([^\]]*)\]")
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    """A Stripe-looking object id, unique in this process."""
    return f"{prefix}_test{next(_ids):012d}"


def decode_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket encoding (`line_items[0][price]=p`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        tokens = [key.split("[", 1)[0], *_BRACKETS.findall(key)]
        node = root
        for token in tokens[:-1]:
            node = node.setdefault(token or str(len(node)), {})
        node[tokens[-1] or str(len(node))] = value
    result: dict[str, Any] = _listify(root)
    return result


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received: what was asked, with which key and idempotency key."""

    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    authorization: str | None
    stripe_version: str | None = None


@dataclasses.dataclass
class FakeStripe:
    """What the fake holds: objects by id, requests received, failures to serve next."""

    customers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    products: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    schedules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    portal_configurations: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    portal_sessions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # A session's line items, which Stripe keeps but does not return with the session.
    line_items: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    requests: list[RecordedRequest] = dataclasses.field(default_factory=list)
    # (status, Stripe error object) answered to the next requests, in order.
    failures: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    _replays: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = dataclasses.field(
        default_factory=dict
    )

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """The recorded requests with this method and path."""
        return [r for r in self.requests if r.method == method and r.path == path]

    def fail_next(self, status: int, error_type: str, message: str, code: str = "") -> None:
        """Answer the next request with a Stripe error."""
        self.failures.append((status, {"type": error_type, "message": message, "code": code}))

    def add_subscription(self, subscription: dict[str, Any]) -> None:
        """Make a subscription retrievable by its id."""
        self.subscriptions[subscription["id"]] = subscription

    def update_subscription(
        self, subscription_id: str, *, quantity: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Change a subscription as Stripe would (its seat item's quantity, any top-level
        field); returns a copy of it as it is now, for an event."""
        subscription = self.subscriptions[subscription_id]
        item = subscription["items"]["data"][0]
        if quantity is not None:
            item["quantity"] = quantity
        subscription.update(fields)
        if "cancel_at_period_end" in fields:
            cancelling = bool(fields["cancel_at_period_end"])
            subscription["cancel_at"] = item["current_period_end"] if cancelling else None
        return copy.deepcopy(subscription)

    def complete_checkout(self, session_id: str, *, now: float | None = None) -> dict[str, Any]:
        """Pay a subscription session as the customer would: the subscription it creates
        (trialing until the session's trial_end, if any) is stored; returns a copy of it."""
        session = self.sessions[session_id]
        data = session.get("subscription_data") or {}
        trial_end = int(data["trial_end"]) if data.get("trial_end") else None
        (line,) = self.line_items[session_id]
        price = self.prices[line["price"]]
        subscription = subscription_object(
            organization_id=None,
            customer=session["customer"],
            status="active" if trial_end is None else "trialing",
            quantity=int(line["quantity"]),
            interval=price["recurring"]["interval"],
            period_start=now,
            period_end=trial_end,
            price=price,
        )
        subscription["metadata"] = dict(data.get("metadata") or {})
        subscription["trial_end"] = trial_end
        paid = "paid" if trial_end is None else "no_payment_required"
        session.update(status="complete", payment_status=paid, subscription=subscription["id"])
        self.add_subscription(subscription)
        return copy.deepcopy(subscription)

    def renew(self, subscription_id: str) -> dict[str, Any]:
        """The period ends and the next begins, as Stripe renews: the quantity is that of
        the schedule's phase starting then, if any; returns a copy of the subscription."""
        subscription = self.subscriptions[subscription_id]
        item = subscription["items"]["data"][0]
        start, end = item["current_period_start"], item["current_period_end"]
        item["current_period_start"], item["current_period_end"] = end, end + (end - start)
        schedule = self.schedules.get(subscription.get("schedule") or "")
        for phase in [] if schedule is None else schedule["phases"]:
            if phase["start_date"] == end:
                item["quantity"] = phase["items"][0]["quantity"]
                schedule["current_phase"] = {k: phase[k] for k in ("start_date", "end_date")}
        subscription.update(status="active", trial_end=None)
        return copy.deepcopy(subscription)

    def add_invoice(self, subscription_id: str, status: str = "paid", **fields: Any) -> str:
        """An invoice of the subscription, now its latest; returns its id."""
        invoice = {"id": new_id("in"), "object": "invoice", "status": status, **fields}
        self.invoices[invoice["id"]] = invoice
        self.subscriptions[subscription_id]["latest_invoice"] = invoice["id"]
        return str(invoice["id"])

    def add_price(self, **fields: Any) -> dict[str, Any]:
        """Store a price as `stripe-setup` would have created it; returns it."""
        price = {"id": new_id("price"), "object": "price", "active": True, **fields}
        self.prices[price["id"]] = price
        return price


FAKE = web.AppKey("fake_stripe", FakeStripe)
PARAMS = web.RequestKey("params", dict)


def error_response(status: int, error: dict[str, Any]) -> web.Response:
    """A Stripe error body (`{"error": {...}}`) with `status`."""
    return web.json_response({"error": error}, status=status)


def stripe_list(url: str, data: list[dict[str, Any]]) -> dict[str, Any]:
    """A Stripe list object."""
    return {"object": "list", "url": url, "has_more": False, "data": data}


@web.middleware
async def stripe_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record the request, serve queued failures, and replay repeated idempotency keys."""
    fake = request.app[FAKE]
    form = await request.post() if request.method == "POST" else request.query
    params = decode_form((k, str(v)) for k, v in form.items())
    key = request.headers.get("Idempotency-Key")
    headers = request.headers
    fake.requests.append(
        RecordedRequest(
            request.method,
            request.path,
            params,
            key,
            headers.get("Authorization"),
            headers.get("Stripe-Version"),
        )
    )
    request[PARAMS] = params
    if fake.failures:
        return error_response(*fake.failures.pop(0))
    if not (request.headers.get("Authorization") or "").startswith("Bearer sk_"):
        return error_response(401, {"type": "invalid_request_error", "message": "No API key."})
    route = getattr(request.match_info.route.resource, "canonical", "")
    unknown = refusal(request.method, route, params)
    if unknown is not None:
        return error_response(400, {"type": "invalid_request_error", "message": unknown})
    if request.method != "POST" or key is None:
        return await handler(request)
    return await _idempotent(fake, request, handler, key, params)


async def _idempotent(
    fake: FakeStripe, request: web.Request, handler: Any, key: str, params: dict[str, Any]
) -> web.StreamResponse:
    replay = fake._replays.get(key)
    if replay is not None:
        if replay[0] != params:
            message = "Keys for idempotent requests can only be used with the same parameters."
            return error_response(400, {"type": "idempotency_error", "message": message})
        return web.json_response(replay[2], status=replay[1], headers={"Idempotent-Replayed": "1"})
    response = await handler(request)
    assert isinstance(response, web.Response) and response.text is not None
    fake._replays[key] = (params, response.status, json.loads(response.text))
    return response


def _now() -> int:
    return int(time.time())


async def create_customer(request: web.Request) -> web.Response:
    params = request[PARAMS]
    customer = {
        "id": new_id("cus"),
        "object": "customer",
        "created": _now(),
        "name": params.get("name"),
        "email": params.get("email"),
        "metadata": params.get("metadata", {}),
    }
    request.app[FAKE].customers[customer["id"]] = customer
    return web.json_response(customer)


async def create_session(request: web.Request) -> web.Response:
    params = request[PARAMS]
    trial_end = (params.get("subscription_data") or {}).get("trial_end")
    if trial_end is not None and int(trial_end) < _now() + MIN_TRIAL_SECONDS:
        message = "subscription_data.trial_end must be at least 48 hours in the future."
        return error_response(400, {"type": "invalid_request_error", "message": message})
    session_id = new_id("cs")
    session = {
        "id": session_id,
        "object": "checkout.session",
        "url": f"https://checkout.stripe.test/c/pay/{session_id}",
        "status": "open",
        "payment_status": "unpaid",
        "subscription": None,
        "payment_intent": None,
        **{k: v for k, v in params.items() if k not in ("line_items",)},
    }
    request.app[FAKE].sessions[session_id] = session
    request.app[FAKE].line_items[session_id] = list(params.get("line_items") or [])
    return web.json_response(session)


async def create_product(request: web.Request) -> web.Response:
    params = request[PARAMS]
    product = {
        "id": params.get("id") or new_id("prod"),
        "object": "product",
        "created": _now(),
        "active": True,
        "name": params["name"],
        "metadata": params.get("metadata", {}),
    }
    request.app[FAKE].products[product["id"]] = product
    return web.json_response(product)


async def list_products(request: web.Request) -> web.Response:
    products = list(request.app[FAKE].products.values())
    return web.json_response(stripe_list("/v1/products", products))


async def create_price(request: web.Request) -> web.Response:
    fake, params = request.app[FAKE], request[PARAMS]
    lookup_key = params.get("lookup_key")
    holders = [p for p in fake.prices.values() if lookup_key and p.get("lookup_key") == lookup_key]
    if holders and params.get("transfer_lookup_key") != "true":
        message = f"A price ({holders[0]['id']}) already uses that lookup key."
        return error_response(400, {"type": "invalid_request_error", "message": message})
    for holder in holders:
        holder["lookup_key"] = None
    recurring = params.get("recurring")
    price = fake.add_price(
        product=params["product"],
        currency=params["currency"],
        unit_amount=int(params["unit_amount"]),
        recurring=None if recurring is None else {"interval_count": 1, **recurring},
        type="recurring" if recurring else "one_time",
        lookup_key=lookup_key,
        nickname=params.get("nickname"),
        metadata=params.get("metadata", {}),
    )
    return web.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    lookup_keys = request[PARAMS].get("lookup_keys")
    prices = [
        p
        for p in request.app[FAKE].prices.values()
        if lookup_keys is None or p.get("lookup_key") in lookup_keys
    ]
    return web.json_response(stripe_list("/v1/prices", prices))


def missing(kind: str, object_id: str) -> web.Response:
    """Stripe's 404 for an object it does not hold."""
    message = f"No such {kind}: '{object_id}'"
    error = {"type": "invalid_request_error", "code": "resource_missing", "message": message}
    return error_response(404, error)


async def retrieve_subscription(request: web.Request) -> web.Response:
    fake, subscription_id = request.app[FAKE], request.match_info["subscription_id"]
    subscription = fake.subscriptions.get(subscription_id)
    if subscription is None:
        return missing("subscription", subscription_id)
    shown = copy.deepcopy(subscription)
    # `expand[]`: the references it names inline, as Stripe expands them.
    held = {"latest_invoice": fake.invoices, "schedule": fake.schedules}
    for field in request[PARAMS].get("expand") or []:
        if field in held and shown.get(field):
            shown[field] = held[field][shown[field]]
    return web.json_response(shown)


async def update_subscription(request: web.Request) -> web.Response:
    """Stripe's subscription update: item quantities, cancelling at period end, metadata."""
    fake, params = request.app[FAKE], request[PARAMS]
    subscription = fake.subscriptions.get(request.match_info["subscription_id"])
    if subscription is None:
        return await retrieve_subscription(request)
    before = sum(item["quantity"] for item in subscription["items"]["data"])
    for change in params.get("items") or []:
        for item in subscription["items"]["data"]:
            if item["id"] == change.get("id") and "quantity" in change:
                item["quantity"] = int(change["quantity"])
    added = sum(item["quantity"] for item in subscription["items"]["data"]) - before
    if added > 0 and params.get("proration_behavior") == "always_invoice":
        # The prorated rest of the period, invoiced and (in the fake, always) paid at once.
        fake.add_invoice(subscription["id"], billing_reason="subscription_update")
    fields: dict[str, Any] = {}
    if "cancel_at_period_end" in params:
        fields["cancel_at_period_end"] = params["cancel_at_period_end"] == "true"
    if "metadata" in params:
        fields["metadata"] = {**subscription["metadata"], **params["metadata"]}
    return web.json_response(fake.update_subscription(subscription["id"], **fields))


def _typed(value: Any) -> Any:
    """Form values back into JSON: booleans, and whole numbers where Stripe has integers."""
    if isinstance(value, dict):
        # Metadata stays strings, as Stripe keeps it.
        return {k: v if k == "metadata" else _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if value in ("true", "false"):
        return value == "true"
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


# What Stripe shows of a configuration's features that were not set (a few of them).
PORTAL_DEFAULTS: dict[str, Any] = {
    "customer_update": {"enabled": False, "allowed_updates": []},
    "invoice_history": {"enabled": False},
    "payment_method_update": {"enabled": False, "payment_method_configuration": None},
    "subscription_cancel": {
        "enabled": False,
        "mode": "at_period_end",
        "proration_behavior": "none",
        "cancellation_reason": {"enabled": False, "options": []},
    },
    "subscription_update": {"enabled": False, "default_allowed_updates": [], "products": []},
}


async def create_portal_configuration(request: web.Request) -> web.Response:
    params = _typed(request[PARAMS])
    configuration = {
        "id": new_id("bpc"),
        "object": "billing_portal.configuration",
        "active": True,
        "is_default": False,
        "name": params.get("name"),
        "features": _merged(PORTAL_DEFAULTS, params.get("features") or {}),
        "metadata": request[PARAMS].get("metadata", {}),
    }
    request.app[FAKE].portal_configurations[configuration["id"]] = configuration
    return web.json_response(configuration)


async def list_portal_configurations(request: web.Request) -> web.Response:
    active = request[PARAMS].get("active")
    found = [
        c
        for c in request.app[FAKE].portal_configurations.values()
        if active is None or c["active"] == (active == "true")
    ]
    return web.json_response(stripe_list("/v1/billing_portal/configurations", found))


async def update_portal_configuration(request: web.Request) -> web.Response:
    configuration_id = request.match_info["configuration"]
    configuration = request.app[FAKE].portal_configurations.get(configuration_id)
    if configuration is None:
        return missing("billing_portal.configuration", configuration_id)
    configuration.update(_merged(configuration, _typed(request[PARAMS])))
    return web.json_response(configuration)


async def create_portal_session(request: web.Request) -> web.Response:
    fake, params = request.app[FAKE], request[PARAMS]
    if params.get("customer") not in fake.customers:
        return missing("customer", str(params.get("customer")))
    configuration = params.get("configuration")
    if configuration is not None and configuration not in fake.portal_configurations:
        return missing("billing_portal.configuration", configuration)
    session_id = new_id("bps")
    session = {
        "id": session_id,
        "object": "billing_portal.session",
        "url": f"https://billing.stripe.test/p/session/{session_id}",
        "created": _now(),
        **params,
    }
    fake.portal_sessions[session_id] = session
    return web.json_response(session)


async def create_schedule(request: web.Request) -> web.Response:
    """A schedule from a subscription: one phase, the subscription as it is now."""
    fake = request.app[FAKE]
    subscription_id = request[PARAMS].get("from_subscription", "")
    subscription = fake.subscriptions.get(subscription_id)
    if subscription is None:
        return missing("subscription", subscription_id)
    if subscription.get("schedule"):
        message = "The subscription is already attached to a schedule."
        return error_response(400, {"type": "invalid_request_error", "message": message})
    items = subscription["items"]["data"]
    period = {k: items[0][f"current_period_{k[:-5]}"] for k in ("start_date", "end_date")}
    phase = {
        **period,
        "items": [{"price": i["price"]["id"], "quantity": i["quantity"]} for i in items],
        "proration_behavior": "create_prorations",
        "trial_end": subscription.get("trial_end"),
    }
    schedule = {
        "id": new_id("sub_sched"),
        "object": "subscription_schedule",
        "subscription": subscription_id,
        "customer": subscription["customer"],
        "status": "active",
        "end_behavior": "release",
        "current_phase": period,
        "phases": [phase],
        "metadata": {},
    }
    fake.schedules[schedule["id"]] = schedule
    subscription["schedule"] = schedule["id"]
    return web.json_response(schedule)


async def update_schedule(request: web.Request) -> web.Response:
    """New phases: the first must start when the current one did; a `duration` ends one."""
    schedule = request.app[FAKE].schedules.get(request.match_info["schedule"])
    if schedule is None:
        return missing("subscription_schedule", request.match_info["schedule"])
    params = _typed(request[PARAMS])
    phases = params.pop("phases", None)
    if phases is not None:
        if phases[0].get("start_date") != schedule["current_phase"]["start_date"]:
            message = "The first phase must start when the current phase started."
            return error_response(400, {"type": "invalid_request_error", "message": message})
        for before, phase in itertools.pairwise([None, *phases]):
            if before is not None:
                phase.setdefault("start_date", before["end_date"])
            duration = phase.pop("duration", None)
            if duration is not None:
                length = 365 * 86_400 if duration["interval"] == "year" else 30 * 86_400
                phase["end_date"] = phase["start_date"] + length * duration["interval_count"]
        schedule["phases"] = phases
    schedule.update(_merged(schedule, params))
    return web.json_response(schedule)


async def release_schedule(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    schedule = fake.schedules.get(request.match_info["schedule"])
    if schedule is None:
        return missing("subscription_schedule", request.match_info["schedule"])
    schedule.update(status="released", released_subscription=schedule["subscription"])
    fake.subscriptions[schedule["subscription"]]["schedule"] = None
    return web.json_response(schedule)


def create_fake_stripe_app(fake: FakeStripe | None = None) -> web.Application:
    """The fake Stripe API as an aiohttp application."""
    app = web.Application(middlewares=[stripe_middleware])
    app[FAKE] = fake or FakeStripe()
    app.router.add_post("/v1/customers", create_customer)
    app.router.add_post("/v1/checkout/sessions", create_session)
    app.router.add_post("/v1/products", create_product)
    app.router.add_get("/v1/products", list_products)
    app.router.add_post("/v1/prices", create_price)
    app.router.add_get("/v1/prices", list_prices)
    app.router.add_get("/v1/subscriptions/{subscription_id}", retrieve_subscription)
    app.router.add_post("/v1/subscriptions/{subscription_id}", update_subscription)
    app.router.add_post("/v1/subscription_schedules", create_schedule)
    app.router.add_post("/v1/subscription_schedules/{schedule}", update_schedule)
    app.router.add_post("/v1/subscription_schedules/{schedule}/release", release_schedule)
    portal = "/v1/billing_portal"
    app.router.add_get(f"{portal}/configurations", list_portal_configurations)
    app.router.add_post(f"{portal}/configurations", create_portal_configuration)
    app.router.add_post(f"{portal}/configurations/{{configuration}}", update_portal_configuration)
    app.router.add_post(f"{portal}/sessions", create_portal_session)
    return app


@dataclasses.dataclass
class RunningFakeStripe:
    """A started fake Stripe: its base URL and what it holds."""

    runner: web.AppRunner
    url: str
    state: FakeStripe

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_fake_stripe() -> RunningFakeStripe:
    """Serve the fake Stripe API on an ephemeral loopback port."""
    app = create_fake_stripe_app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return RunningFakeStripe(runner, f"http://127.0.0.1:{port}", app[FAKE])


async def start_fake_stripe_set_up() -> RunningFakeStripe:
    """The fake Stripe API once `stripe-setup` has run against it (products, prices, the
    portal configuration), as a deployed gateway finds Stripe."""
    running = await start_fake_stripe()
    env = {k: str(v) for k, v in stripe_env(running).items()}
    await run_stripe_setup(from_env(env, need_upstream_key=False))
    return running


def stripe_env(running: RunningFakeStripe, **overrides: Any) -> dict[str, Any]:
    """Gateway settings that point it at this fake Stripe."""
    return {
        "STRIPE_SECRET_KEY": SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": running.url,
        **overrides,
    }


def add_catalog_prices(fake: FakeStripe, catalog: Catalog) -> dict[str, str]:
    """Store every catalog price as stripe-setup would; returns price ids by lookup key."""
    ids = {}
    for plan in catalog.plans.values():
        product = new_id("prod")
        for price in plan.prices.values():
            ids[price.lookup_key] = fake.add_price(
                product=product,
                currency=catalog.currency,
                unit_amount=price.unit_amount_cents,
                recurring={"interval": price.interval, "interval_count": 1},
                lookup_key=price.lookup_key,
            )["id"]
    return ids


def subscription_object(
    *,
    organization_id: str | None,
    customer: str = "cus_unknown",
    status: str = "active",
    quantity: int = 5,
    interval: str = "year",
    period_start: float | None = None,
    period_end: float | None = None,
    cancel_at_period_end: bool = False,
    lookup_key: str | None = "kilo_teams_seat_yearly",
    subscription_id: str | None = None,
    price: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Stripe subscription as the current API shapes it: the period lives on the item.

    Its price is `price` (one the fake holds), else a new one with `lookup_key`; a
    lookup key of None is a price of another product, none of ours.
    """
    start = int(period_start if period_start is not None else time.time() - 60)
    length = 365 * 86_400 if interval == "year" else 30 * 86_400
    end = int(period_end if period_end is not None else start + length)
    sub_id = subscription_id or new_id("sub")
    item = {
        "id": new_id("si"),
        "object": "subscription_item",
        "quantity": quantity,
        "current_period_start": start,
        "current_period_end": end,
        "subscription": sub_id,
        "price": copy.deepcopy(price)
        or {
            "id": new_id("price"),
            "object": "price",
            "lookup_key": lookup_key,
            "unit_amount": 34800,
            "currency": "usd",
            "recurring": {"interval": interval, "interval_count": 1},
            "metadata": {},
        },
    }
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "cancel_at": end if cancel_at_period_end else None,
        "canceled_at": None,
        "ended_at": None,
        "start_date": start,
        "metadata": {} if organization_id is None else {"organization_id": organization_id},
        "items": {"object": "list", "has_more": False, "data": [item]},
    }


def event_object(
    event_type: str, data_object: dict[str, Any], *, created: float | None = None
) -> dict[str, Any]:
    """A Stripe event (snapshot payload) wrapping `data_object`."""
    return {
        "id": new_id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": int(created if created is not None else time.time()),
        "type": event_type,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": data_object},
    }
