"""The emails the gateway sends, and `queue_email`, which puts one in the outbox.

Templates are pure functions returning an `Email`. `queue_email` writes it to
`email_outbox` on the caller's connection, so it commits or rolls back with whatever the
caller did (an organization is never created without its welcome email, nor the other
way round). `mailer.py` delivers the outbox.

Several recipients of one message (a trial reminder to every owner and billing manager)
share one row: `to_address` holds them separated by ", ".
"""

from __future__ import annotations

import dataclasses

from gateway.access.queries import Queryable
from gateway.accounts.status import ReminderStage, human_time

_QUEUE_SQL = """
INSERT INTO email_outbox (kind, to_address, subject, body_text, organization_id, dedupe_key)
VALUES ($1, $2, $3, $4, $5::uuid, $6)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id
"""

_USER_EMAIL_SQL = "SELECT email FROM users WHERE id = $1"
_BILLING_CONTACTS_SQL = """
SELECT u.email FROM organization_memberships m JOIN users u ON u.id = m.user_id
WHERE m.organization_id = $1::uuid AND m.role IN ('owner', 'billing_manager')
ORDER BY u.email
"""

_ROLE_NAMES = {"owner": "an owner", "member": "a member", "billing_manager": "a billing manager"}


@dataclasses.dataclass(frozen=True, slots=True)
class Email:
    """One message: what kind it is, to whom, and its plain-text subject and body."""

    kind: str
    to: str
    subject: str
    body: str


async def queue_email(
    conn: Queryable,
    email: Email,
    *,
    organization_id: str | None = None,
    dedupe_key: str | None = None,
) -> bool:
    """Add the email to the outbox in the caller's transaction; False when `dedupe_key` was."""
    row_id = await conn.fetchval(
        _QUEUE_SQL, email.kind, email.to, email.subject, email.body, organization_id, dedupe_key
    )
    return row_id is not None


async def user_address(conn: Queryable, user_id: str) -> str:
    """The email address of a user (users always have one)."""
    address: str = await conn.fetchval(_USER_EMAIL_SQL, user_id)
    return address


async def billing_contacts(conn: Queryable, organization_id: str) -> list[str]:
    """The addresses of the organization's owners and billing managers, sorted."""
    return [r[0] for r in await conn.fetch(_BILLING_CONTACTS_SQL, organization_id)]


def welcome_email(
    *,
    to: str,
    organization_name: str,
    plan_name: str,
    trial_days: int,
    trial_ends_at: float,
    organization_url: str,
    billing_url: str,
    price_display: str,
) -> Email:
    """Sent to whoever creates an organization: the trial, the next step, how to upgrade."""
    ends = human_time(trial_ends_at)
    body = f"""Welcome to {plan_name}!

Your organization "{organization_name}" is on a free {trial_days}-day trial of {plan_name}.
No card is needed: invite as many members as you like until the trial ends on {ends}.

Next step: buy credits. Model usage is paid from your organization's credits, and you
can buy them now on the billing page:
{billing_url}

How to upgrade: to keep using Kilo Code after {ends}, subscribe to the annual plan on
the same billing page. It costs {price_display}.
Once the trial ends, Kilo Code stops working for your organization and any credits
you bought stay locked until you subscribe.

Your organization: {organization_url}
"""
    subject = f"Welcome to {plan_name}: your free trial runs until {ends[:10]}"
    return Email("welcome", to, subject, body)


def invitation_email(
    *,
    to: str,
    organization_name: str,
    inviter_email: str,
    role: str,
    accept_url: str,
    expires_at: float,
) -> Email:
    """The invitation with its accept link (the only place the token ever travels)."""
    body = f"""{inviter_email} invited you to join "{organization_name}" on Kilo Code as
{_ROLE_NAMES.get(role, role)}.

Accept the invitation, signed in with this email address ({to}):
{accept_url}

The link works until {human_time(expires_at)}. If you did not expect it, ignore this email.
"""
    subject = f"Join {organization_name} on Kilo Code"
    return Email("invitation", to, subject, body)


_REMINDER_SUBJECTS = {
    ReminderStage.DAYS_7: "Your Kilo Code trial ends in 7 days",
    ReminderStage.DAYS_3: "Your Kilo Code trial ends in 3 days",
    ReminderStage.DAYS_1: "Your Kilo Code trial ends in 1 day",
    ReminderStage.EXPIRED: "Your Kilo Code trial has ended",
}


def trial_reminder_email(
    *,
    to: str,
    organization_name: str,
    stage: ReminderStage,
    trial_ends_at: float,
    billing_url: str,
    price_display: str,
) -> Email:
    """A trial reminder for one stage, to the organization's owners and billing managers."""
    ends = human_time(trial_ends_at)
    if stage is ReminderStage.EXPIRED:
        what = (
            f'The free trial of "{organization_name}" ended on {ends}. Kilo Code no longer'
            " works for its members, and any credits you bought are locked until you subscribe."
        )
    else:
        what = (
            f'The free trial of "{organization_name}" ends on {ends}. After that Kilo Code'
            " stops working for its members until an owner or billing manager subscribes."
        )
    body = f"""{what}

Subscribe on the billing page; the annual plan is {price_display}.
{billing_url}
"""
    return Email(f"trial_reminder_{stage.value}", to, _REMINDER_SUBJECTS[stage], body)


def payment_failed_email(
    *,
    to: str,
    organization_name: str,
    failed_at: float,
    grace_ends_at: float,
    billing_url: str,
) -> Email:
    """A subscription's payment failed: to the owners and billing managers, once per invoice."""
    body = f"""The payment for the Kilo Code subscription of "{organization_name}" failed on
{human_time(failed_at)}: the card was declined.

Kilo Code keeps working for your members until {human_time(grace_ends_at)}. An owner or
billing manager can update the card on the billing page before then; Stripe tries the
payment again meanwhile, and once it is paid nothing stops.
{billing_url}

After {human_time(grace_ends_at)}, until the payment goes through, Kilo Code stops working
for every member and purchased credits stay locked.
"""
    subject = f"Payment failed for {organization_name}: update your card"
    return Email("payment_failed", to, subject, body)


def sales_contact_email(
    *,
    to: str,
    organization_id: str,
    organization_name: str,
    plan: str,
    requester_email: str,
    message: str,
) -> Email:
    """Tell sales an enterprise owner asked about SSO."""
    body = f"""An owner asked to set up SSO for their organization.

Organization: {organization_name} ({organization_id})
Plan: {plan}
Requester: {requester_email}

Message:
{message}
"""
    subject = f"SSO request from {organization_name} ({plan})"
    return Email("sales_contact", to, subject, body)


def sign_in_email(*, to: str, link: str, valid_minutes: float) -> Email:
    """The one-time link that signs its owner in to the organization pages."""
    minutes = f"{valid_minutes:g}"
    body = f"""Sign in to Kilo Code

Open this link to sign in to your organization's pages:
{link}

It works once, within {minutes} minutes. If you did not ask to sign in, ignore this email:
nobody can sign in without the link.
"""
    return Email("sign_in", to, "Your Kilo Code sign-in link", body)
