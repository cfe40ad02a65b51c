"""A subscription's payment failed: tell its organization's owners and billing managers.

`invoice.payment_failed` first applies the subscription read back from Stripe, like every
subscription event (`webhooks.py`); then, in the same transaction, one email is queued
to the owners and billing managers when the subscription's newest state is still
past_due. The outbox's `dedupe_key` (`payment_failed:{invoice}`) sends it once per
invoice, however often Stripe delivers the event or retries the payment (each retry that
fails is another event for the same invoice); an event delivered after the invoice was
paid finds the subscription active and queues nothing. The email names the failure and
the end of the grace from the purchase row the rule reads, so it says what the proxy does.
"""

from __future__ import annotations

from gateway.access.queries import Queryable
from gateway.access.refusals import billing_url
from gateway.access.rule import grace_ends_at
from gateway.accounts.emails import billing_contacts, payment_failed_email, queue_email
from gateway.config import Config

PAYMENT_FAILED_EVENT = "invoice.payment_failed"

_FAILING_SQL = """
SELECT p.organization_id::text, o.name, p.payment_failed_at
FROM organization_seats_purchases p JOIN organizations o ON o.id = p.organization_id
WHERE p.subscription_stripe_id = $1
ORDER BY p.created_at DESC, p.id DESC
LIMIT 1
"""


def dedupe_key(invoice_id: str) -> str:
    """The outbox key that lets one invoice's failure be announced once."""
    return f"payment_failed:{invoice_id}"


async def queue_failure_email(
    conn: Queryable, invoice_id: str, subscription_id: str, config: Config
) -> bool:
    """Queue the failed-payment email in the caller's transaction; False when the
    subscription is not past_due (anymore), nobody can act, or it was queued before."""
    row = await conn.fetchrow(_FAILING_SQL, subscription_id)
    if row is None or row["payment_failed_at"] is None:
        return False
    organization_id = row["organization_id"]
    recipients = await billing_contacts(conn, organization_id)
    if not recipients:
        return False
    failed_at = row["payment_failed_at"].timestamp()
    email = payment_failed_email(
        to=", ".join(recipients),
        organization_name=row["name"],
        failed_at=failed_at,
        grace_ends_at=grace_ends_at(failed_at, config.past_due_grace_days),
        billing_url=billing_url(config.app_url, organization_id),
    )
    key = dedupe_key(invoice_id)
    return await queue_email(conn, email, organization_id=organization_id, dedupe_key=key)
