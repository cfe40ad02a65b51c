"""Talking to Stripe: one client per process, the calls the gateway makes, webhook
signature checks, and the one place where Stripe's exceptions become ours.

Every request names the API version the gateway was written against (`STRIPE_API_VERSION`),
never the installed library's default, so upgrading the library cannot change the shape
of what Stripe answers; the webhook endpoint is created with the same version.

Every call is async (`*_async` over aiohttp), so the event loop is never blocked, and
retried by the library on network errors and 5xx (`max_network_retries`). A Stripe
failure reaches the caller as 502 `billing_provider_error`; the message never carries
Stripe's own text, which may quote the request, so no secret can leak through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, cast

import aiohttp
import stripe
import structlog
from aiohttp import web
from cachetools import TTLCache

from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, BillingProviderError, BillingUnavailable, Reason

log = structlog.get_logger("gateway.stripe")

# The API version of every request, and of the webhook endpoint (README, "Stripe").
STRIPE_API_VERSION = "2026-10-28.endive"
MAX_NETWORK_RETRIES = 2
STRIPE_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
# Price ids move only when stripe-setup moves a lookup key; an hour bounds the staleness.
PRICE_CACHE_TTL_SECONDS = 3600.0
SETUP_HINT = "run `python -m gateway stripe-setup` to create the products and prices"
# Marks the Billing Portal configuration stripe-setup manages, so it is found again.
PORTAL_METADATA_KEY = "kilo_portal"


class StripeApi:
    """The Stripe calls the gateway makes, each async and with Stripe's errors mapped."""

    def __init__(self, client: stripe.StripeClient, http_client: stripe.HTTPClient) -> None:
        self.client = client
        self._http_client = http_client
        self._price_ids: TTLCache[str, str] = TTLCache(maxsize=64, ttl=PRICE_CACHE_TTL_SECONDS)
        # The portal configuration's id, which moves as seldom as the prices.
        self._portal: TTLCache[str, str] = TTLCache(maxsize=1, ttl=PRICE_CACHE_TTL_SECONDS)

    async def close(self) -> None:
        """Close the HTTP connections to Stripe."""
        await self._http_client.close_async()

    async def price_id(self, lookup_key: str) -> str:
        """The id of the active price with this lookup key (cached); 503 when there is none."""
        cached = self._price_ids.get(lookup_key)
        if cached is not None:
            return cached
        prices = await self.prices_by_lookup_key([lookup_key])
        if lookup_key not in prices:
            raise BillingUnavailable(
                f"Billing is not set up yet: Stripe has no price '{lookup_key}' ({SETUP_HINT})."
            )
        self._price_ids[lookup_key] = prices[lookup_key]["id"]
        return self._price_ids[lookup_key]

    async def prices_by_lookup_key(self, lookup_keys: list[str]) -> dict[str, dict[str, Any]]:
        """The active prices with these lookup keys, by lookup key."""
        params = {"lookup_keys": lookup_keys, "active": True, "limit": 100}
        with provider_errors("look up the prices"):
            found = await self.client.v1.prices.list_async(params=cast(Any, params))
        return {p.lookup_key: p.to_dict() for p in found.data if p.lookup_key}

    async def products(self) -> list[dict[str, Any]]:
        """Every active product in the account."""
        params = {"active": True, "limit": 100}
        with provider_errors("list the products"):
            page = await self.client.v1.products.list_async(params=cast(Any, params))
            return [p.to_dict() async for p in page.auto_paging_iter()]

    async def create_customer(self, params: Mapping[str, Any], idempotency_key: str) -> str:
        """Create a customer; returns its id."""
        with provider_errors("create the customer"):
            customer = await self.client.v1.customers.create_async(
                params=cast(Any, params), options={"idempotency_key": idempotency_key}
            )
        return customer.id

    async def create_checkout_session(
        self, params: Mapping[str, Any], idempotency_key: str
    ) -> stripe.checkout.Session:
        """Create a Checkout Session."""
        with provider_errors("start the checkout"):
            return await self.client.v1.checkout.sessions.create_async(
                params=cast(Any, params), options={"idempotency_key": idempotency_key}
            )

    async def create_product(self, params: Mapping[str, Any], idempotency_key: str) -> str:
        """Create a product; returns its id."""
        with provider_errors("create the product"):
            product = await self.client.v1.products.create_async(
                params=cast(Any, params), options={"idempotency_key": idempotency_key}
            )
        return product.id

    async def create_price(self, params: Mapping[str, Any], idempotency_key: str) -> str:
        """Create a price; returns its id."""
        with provider_errors("create the price"):
            price = await self.client.v1.prices.create_async(
                params=cast(Any, params), options={"idempotency_key": idempotency_key}
            )
        return price.id

    async def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        """The subscription as Stripe holds it now."""
        with provider_errors("read the subscription"):
            found = await self.client.v1.subscriptions.retrieve_async(subscription_id)
        result: dict[str, Any] = found.to_dict()
        return result

    async def subscription_with(self, subscription_id: str, expand: list[str]) -> dict[str, Any]:
        """The subscription as Stripe holds it now, with the `expand`ed references inline."""
        params = {"expand": expand}
        with provider_errors("read the subscription"):
            found = await self.client.v1.subscriptions.retrieve_async(
                subscription_id, params=cast(Any, params)
            )
        result: dict[str, Any] = found.to_dict()
        return result

    async def update_subscription(
        self, subscription_id: str, params: Mapping[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        """Change a subscription (its items' quantities, ...); returns it as changed."""
        with provider_errors("change the subscription"):
            found = await self.client.v1.subscriptions.update_async(
                subscription_id,
                params=cast(Any, params),
                options={"idempotency_key": idempotency_key},
            )
        result: dict[str, Any] = found.to_dict()
        return result

    async def create_schedule(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Create a subscription schedule (here: from a subscription, to change it later).

        No key of ours: one made from the request would replay a schedule since released;
        the library's own key still makes its retries safe, and Stripe refuses a second
        schedule on one subscription."""
        with provider_errors("schedule the change"):
            found = await self.client.v1.subscription_schedules.create_async(
                params=cast(Any, params)
            )
        result: dict[str, Any] = found.to_dict()
        return result

    async def update_schedule(self, schedule_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a schedule's phases (and end behaviour)."""
        with provider_errors("schedule the change"):
            found = await self.client.v1.subscription_schedules.update_async(
                schedule_id, params=cast(Any, params)
            )
        result: dict[str, Any] = found.to_dict()
        return result

    async def release_schedule(self, schedule_id: str) -> None:
        """Detach a schedule from its subscription, dropping the changes it still held."""
        with provider_errors("cancel the scheduled change"):
            await self.client.v1.subscription_schedules.release_async(schedule_id)

    async def portal_configurations(self) -> list[dict[str, Any]]:
        """Every active Billing Portal configuration in the account."""
        params = {"active": True, "limit": 100}
        configurations = self.client.v1.billing_portal.configurations
        with provider_errors("list the billing portal configurations"):
            page = await configurations.list_async(params=cast(Any, params))
            return [c.to_dict() async for c in page.auto_paging_iter()]

    async def create_portal_configuration(
        self, params: Mapping[str, Any], idempotency_key: str
    ) -> str:
        """Create a Billing Portal configuration; returns its id."""
        with provider_errors("create the billing portal configuration"):
            created = await self.client.v1.billing_portal.configurations.create_async(
                params=cast(Any, params), options={"idempotency_key": idempotency_key}
            )
        return created.id

    async def update_portal_configuration(
        self, configuration_id: str, params: Mapping[str, Any]
    ) -> None:
        """Change a Billing Portal configuration's features."""
        with provider_errors("update the billing portal configuration"):
            await self.client.v1.billing_portal.configurations.update_async(
                configuration_id, params=cast(Any, params)
            )

    async def portal_configuration_id(self) -> str:
        """The id of the configuration stripe-setup made (cached); 503 when there is none."""
        cached = self._portal.get(PORTAL_METADATA_KEY)
        if cached is not None:
            return cached
        for configuration in await self.portal_configurations():
            if (configuration.get("metadata") or {}).get(PORTAL_METADATA_KEY):
                self._portal[PORTAL_METADATA_KEY] = str(configuration["id"])
                return self._portal[PORTAL_METADATA_KEY]
        raise BillingUnavailable(
            f"Billing is not set up yet: Stripe has no billing portal configuration ({SETUP_HINT})."
        )

    async def create_portal_session(self, params: Mapping[str, Any]) -> str:
        """Create a Billing Portal session; returns its URL (valid for a few minutes)."""
        with provider_errors("open the billing portal"):
            session = await self.client.v1.billing_portal.sessions.create_async(
                params=cast(Any, params)
            )
        return str(session.url)


@contextlib.contextmanager
def provider_errors(action: str) -> Iterator[None]:
    """Turn a Stripe failure into 502 `billing_provider_error`, logged with Stripe's details."""
    try:
        yield
    except stripe.StripeError as exc:
        log.warning(
            "stripe_error",
            action=action,
            error_type=type(exc).__name__,
            http_status=exc.http_status,
            code=exc.code,
            stripe_request_id=exc.request_id,
        )
        raise BillingProviderError(
            f"The payment provider could not {action} right now; please try again shortly.",
            metadata={"provider": "stripe", "provider_error": type(exc).__name__},
        ) from exc


def verify_webhook(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event in a webhook body whose `Stripe-Signature` verifies (300 s tolerance); else 400."""
    try:
        if signature is not None and not signature.isascii():
            # Stripe signs in hex; the library's compare_digest raises TypeError on others.
            raise stripe.SignatureVerificationError("not ASCII", signature)
        event = stripe.Webhook.construct_event(payload.decode(), signature, secret)
    except (stripe.SignatureVerificationError, UnicodeDecodeError) as exc:
        raise BadRequest(
            "The Stripe-Signature header is missing, does not match the body, or is too old.",
            reason=Reason.INVALID_SIGNATURE,
        ) from exc
    except ValueError as exc:
        raise BadRequest(
            "The webhook body is not a Stripe event.", reason=Reason.INVALID_PAYLOAD
        ) from exc
    result: dict[str, Any] = event.to_dict()
    return result


def new_stripe_api(config: Config) -> StripeApi:
    """A Stripe client for `config` (which must have a secret key) over aiohttp."""
    assert config.stripe_secret_key is not None
    http_client = stripe.AIOHTTPClient(timeout=STRIPE_TIMEOUT)
    client = stripe.StripeClient(
        config.stripe_secret_key,
        stripe_version=STRIPE_API_VERSION,
        base_addresses={"api": config.stripe_api_base},
        http_client=http_client,
        max_network_retries=MAX_NETWORK_RETRIES,
    )
    return StripeApi(client, http_client)


STRIPE = web.AppKey("stripe_api", StripeApi)


async def stripe_api(app: web.Application) -> AsyncIterator[None]:
    """The process's Stripe client, when Stripe is configured; closed at shutdown."""
    if not app[CONFIG].stripe_configured:
        yield
        return
    app[STRIPE] = new_stripe_api(app[CONFIG])
    yield
    await app[STRIPE].close()


def require_stripe(app: web.Application) -> StripeApi:
    """The Stripe client, or 503 `billing_unavailable` when this gateway has none."""
    api = app.get(STRIPE)
    if api is None:
        raise BillingUnavailable(
            "Billing is not available on this gateway: Stripe is not configured "
            "(STRIPE_SECRET_KEY is not set). Using the API is not affected."
        )
    return api
