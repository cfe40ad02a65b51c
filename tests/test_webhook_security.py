"""Stripe webhooks under attack, beyond what tests/test_webhooks.py covers (a forged, a
tampered, a stale and a missing signature, and a sequential redelivery):

- any Stripe-Signature header a forger can write, ASCII or not, is 400 invalid_signature;
- forged and stale credit purchases write nothing (no ledger row, no balance);
- signatures in another scheme, for another timestamp or with an empty secret are refused;
- the same event delivered many times at once is applied once.

Events are signed with the stripe library's own helper, as Stripe signs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import asyncpg
import pytest
import stripe
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import (
    WEBHOOK_SECRET,
    RunningFakeStripe,
    event_object,
    new_id,
    subscription_object,
)

WEBHOOK_PATH = "/api/stripe/webhook"
PROPERTY = settings(
    database=None,
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Everything a webhook can write.
WEBHOOK_TABLES = (
    "stripe_events",
    "stripe_subscriptions",
    "organization_seats_purchases",
    "credit_transactions",
)


@pytest.fixture
async def org_id(seed: Seed) -> str:
    return await seed.org()


def credits_event(org_id: str, amount_microdollars: int = 25_000_000) -> dict[str, Any]:
    """A paid credits checkout, as Stripe reports it."""
    session = {
        "id": new_id("cs"),
        "object": "checkout.session",
        "mode": "payment",
        "client_reference_id": org_id,
        "payment_status": "paid",
        "payment_intent": new_id("pi"),
        "metadata": {
            "organization_id": org_id,
            "kind": "credits",
            "amount_microdollars": str(amount_microdollars),
        },
    }
    return event_object("checkout.session.completed", session)


def sign(payload: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp or int(time.time())
    )


def hmac_hex(payload: bytes, timestamp: int, secret: str = WEBHOOK_SECRET) -> str:
    signed = b"%d." % timestamp + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


async def deliver(
    client: aiohttp.ClientSession, gateway: RunningGateway, payload: bytes, signature: str | None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with client.post(
        gateway.url / WEBHOOK_PATH.lstrip("/"), data=payload, headers=headers
    ) as response:
        return response.status, json.loads(await response.read())


async def deliver_raw(gateway: RunningGateway, payload: bytes, signature: bytes) -> tuple[int, Any]:
    """POST with a Stripe-Signature of any bytes (the HTTP client only sends text)."""
    request = (
        b"POST " + WEBHOOK_PATH.encode() + b" HTTP/1.1\r\nHost: gateway.test\r\n"
        b"Content-Type: application/json\r\nStripe-Signature: " + signature + b"\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
    ) + payload
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def written(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in WEBHOOK_TABLES}


async def balance(db: asyncpg.Connection, org_id: str) -> int:
    value: int = await db.fetchval(
        "SELECT credits_acquired_microdollars FROM organizations WHERE id = $1", org_id
    )
    return value


def assert_invalid_signature(status: int, body: Any) -> None:
    assert status == 400, body
    assert body["error_type"] == "invalid_signature", body
    assert body["error"]["metadata"] == {"reason": "invalid_signature"}
    assert body["error"]["code"] == 400


# --- Whatever a forger writes ----------------------------------------------------------------


@PROPERTY
@given(
    signature=st.one_of(
        st.binary(min_size=1, max_size=200),
        st.builds(
            lambda t, v: b"t=" + t + b",v1=" + v,
            st.sampled_from([b"%d" % int(time.time()), b"0", b"-1", b"99999999999", b"1e9", b""]),
            st.binary(max_size=80),
        ),
        st.text(max_size=120).map(lambda s: s.encode()),
    ).filter(lambda b: b.strip() != b"" and not set(b) & set(b"\r\n\x00"))
)
@example(signature=b"t=1,v1=\xff\xfe")
@example(signature="t=1,v1=é".encode())
@example(signature=b"t=1,v1=" + "é".encode() * 32)
@example(signature=b"t=,v1=")
@example(signature=b"v1=00")
@example(signature=b"t=1")
@example(signature=b",,,,")
@example(signature=b"t=1,v1=" + b"0" * 64 + b"," * 500)
async def test_any_forged_signature_header_is_400_invalid_signature(
    billing_gateway: RunningGateway,
    db: asyncpg.Connection,
    org_id: str,
    signature: bytes,
) -> None:
    """Garbage, lookalikes, non-ASCII bytes: 400 invalid_signature (or 400 when the header
    cannot be read at all), never a 500, and nothing written."""
    payload = json.dumps(credits_event(org_id)).encode()
    before = await written(db)
    status, body = await deliver_raw(billing_gateway, payload, signature)
    assert status == 400, (signature, body)
    assert body["error_type"] in ("invalid_signature", "malformed_request"), (signature, body)
    assert await written(db) == before


async def test_forged_and_stale_credit_purchases_write_nothing(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    org_id: str,
) -> None:
    """A credits purchase signed with the wrong secret, for another body, or too long ago
    adds no ledger row and no balance."""
    before, rows_before = await balance(db, org_id), await written(db)
    payload = json.dumps(credits_event(org_id, 900_000_000)).encode()
    other = json.dumps(credits_event(org_id, 1_000_000)).encode()
    now = int(time.time())
    forgeries = [
        sign(payload, secret="whsec_guessed"),
        sign(other),
        sign(payload, timestamp=now - 301),
        sign(payload, timestamp=now - 86_400 * 365),
        f"t={now},v1={hmac_hex(payload, now - 1)}",
        f"t={now},v0={hmac_hex(payload, now)}",
        f"t={now},v1={hmac_hex(payload, now).upper()}",
        f"t={now},v1={hmac_hex(payload, now)[:-1]}",
        f"t={now},v1={hmac_hex(payload, now, secret='')}",
        f"t={now},v1={hmac_hex(payload, now, secret='whsec_')}",
        f"t={now},v1={hashlib.sha256(b'%d.' % now + payload).hexdigest()}",
    ]
    for signature in forgeries:
        assert_invalid_signature(*await deliver(client, billing_gateway, payload, signature))
    assert await written(db) == rows_before
    assert await balance(db, org_id) == before


async def test_a_signed_body_that_is_not_utf8_is_refused(
    billing_gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    """Bytes that are not text cannot carry a Stripe event, however they are signed."""
    before = await written(db)
    payload = b'{"id": "evt_\xff", "object": "event"}'
    now = int(time.time())
    signature = f"t={now},v1={hmac_hex(payload, now)}".encode()
    status, body = await deliver_raw(billing_gateway, payload, signature)
    assert status == 400 and body["error_type"] in ("invalid_signature", "invalid_payload"), body
    assert await written(db) == before


# --- Replays at once -----------------------------------------------------------------------


async def test_one_event_delivered_many_times_at_once_is_applied_once(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    org_id: str,
    stripe_server: RunningFakeStripe,
) -> None:
    """20 simultaneous deliveries of one subscription event (a replay storm, or Stripe
    retrying while the first is still running): one purchase, one event row; every
    delivery is 200 and all but one say duplicate."""
    subscription = subscription_object(organization_id=org_id)
    stripe_server.state.add_subscription(subscription)  # what the gateway reads back
    event = event_object("customer.subscription.created", subscription)
    payload = json.dumps(event).encode()
    signature = sign(payload)
    results = await asyncio.gather(
        *(deliver(client, billing_gateway, payload, signature) for _ in range(20))
    )
    assert [status for status, _ in results] == [200] * 20, results
    assert sum(1 for _, body in results if not body.get("duplicate")) == 1, results
    counts = await written(db)
    assert counts["stripe_events"] == 1
    assert counts["organization_seats_purchases"] == 1


async def test_one_payment_reported_many_times_at_once_credits_once(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    org_id: str,
) -> None:
    """The same paid checkout, as one event replayed 10 times and as 10 distinct events
    for the same payment, all at once: the balance grows by the payment once."""
    before = await balance(db, org_id)
    event = credits_event(org_id, 30_000_000)
    replayed = json.dumps(event).encode()
    distinct = []
    for kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded") * 5:
        distinct.append(json.dumps(event_object(kind, event["data"]["object"])).encode())
    payloads = [replayed] * 10 + distinct
    results = await asyncio.gather(
        *(deliver(client, billing_gateway, p, sign(p)) for p in payloads)
    )
    assert [status for status, _ in results] == [200] * len(payloads), results
    deadline = time.monotonic() + 2
    while await balance(db, org_id) != before + 30_000_000:
        assert time.monotonic() < deadline, await balance(db, org_id) - before
        await asyncio.sleep(0.02)
    rows = await db.fetch(
        "SELECT stripe_payment_id FROM credit_transactions WHERE stripe_payment_id IS NOT NULL"
    )
    assert [r["stripe_payment_id"] for r in rows] == [event["data"]["object"]["payment_intent"]]
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 11
