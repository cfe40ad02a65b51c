"""Email: the outbox, and the sender that delivers it through a real SMTP server once.

The SMTP server is aiosmtpd on a loopback port; the database is real; senders are the
gateway's own background task, or a `Mailer` driven directly for exact counts.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta

import aiohttp
import asyncpg
import pytest

from gateway import config as gateway_config
from gateway.accounts.emails import Email, queue_email
from gateway.accounts.mailer import (
    Mailer,
    OutboxMessage,
    SmtpSettings,
    build_message,
    parse_smtp_url,
    retry_delay_seconds,
)
from gateway.app import create_app
from gateway.config import ConfigError
from tests.accounts import (
    DEADLINE_SECONDS,
    Mailbox,
    api,
    eventually,
    free_port,
    running_mailbox,
    to,
)
from tests.conftest import RunningGateway, start_gateway
from tests.factories import Seed

FAST = {"EMAIL_POLL_INTERVAL_SECONDS": "0.02"}
PASSWORD = "s3cret-smtp-pw"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    """A running SMTP server for the test."""
    yield from running_mailbox()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on the test's database, as the gateway's sender uses."""
    created = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


def smtp_to(mailbox: Mailbox) -> SmtpSettings:
    return parse_smtp_url(mailbox.url)


async def queue_many(db: asyncpg.Connection, count: int, prefix: str = "note") -> list[str]:
    """Queue `count` distinct emails in one transaction; return their subjects."""
    subjects = [f"{prefix} {n}" for n in range(count)]
    async with db.transaction():
        for subject in subjects:
            await queue_email(db, Email("test", "reader@example.test", subject, "Hello."))
    return subjects


async def outbox(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM email_outbox ORDER BY id")


# The pure parts


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.test", SmtpSettings("mail.example.test", 25, False)),
        ("smtp://mail.example.test:2525", SmtpSettings("mail.example.test", 2525, False)),
        ("smtps://mail.example.test", SmtpSettings("mail.example.test", 465, True)),
        (
            "smtps://kilo:pw@mail.example.test:4650",
            SmtpSettings("mail.example.test", 4650, True, "kilo", "pw"),
        ),
        ("smtp://a%40b:p%2Fw@10.0.0.1:587", SmtpSettings("10.0.0.1", 587, False, "a@b", "p/w")),
    ],
)
def test_parse_smtp_url(url: str, expected: SmtpSettings) -> None:
    """Scheme, host, port (25 or 465 by default) and percent-decoded credentials."""
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize("url", ["http://mail.example.test", "smtp://", "mail.example.test"])
def test_bad_smtp_url_names_the_variable(url: str) -> None:
    """Anything else is a ConfigError that names SMTP_URL."""
    with pytest.raises(ConfigError, match="SMTP_URL"):
        parse_smtp_url(url)


def test_smtp_password_is_not_in_the_repr() -> None:
    """Settings can be logged without their password."""
    assert PASSWORD not in repr(parse_smtp_url(f"smtp://kilo:{PASSWORD}@mail.example.test"))


@pytest.mark.parametrize(
    ("attempts", "delay"), [(1, 2), (2, 4), (3, 8), (6, 64), (11, 2048), (12, 3600), (99, 3600)]
)
def test_retry_delay_doubles_up_to_an_hour(attempts: int, delay: int) -> None:
    """2^attempts seconds after each failure, never more than an hour."""
    assert retry_delay_seconds(attempts) == delay


def test_message_headers() -> None:
    """From, To, a one-line Subject, Date, a Message-ID and the plain-text body."""
    row = OutboxMessage(7, "welcome", "a@example.test, b@example.test", "Hi\r\nBcc: x", "Body", 0)
    mime = build_message(row, "Kilo Code <hello@kilocode.ai>")
    assert mime["From"] == "Kilo Code <hello@kilocode.ai>"
    assert mime["To"] == "a@example.test, b@example.test"
    assert mime["Subject"] == "Hi Bcc: x"
    assert mime["Date"] and "outbox.7" in mime["Message-ID"]
    assert mime.get_content().strip() == "Body"


def test_a_bad_smtp_url_stops_the_gateway_at_start(
    make_config: Callable[..., gateway_config.Config],
) -> None:
    """create_app refuses an SMTP_URL it cannot use, naming the variable."""
    with pytest.raises(ConfigError, match="SMTP_URL"):
        create_app(make_config(SMTP_URL="https://mail.example.test"))


# Delivering


async def test_sender_delivers_each_message_once(
    db: asyncpg.Connection, pool: asyncpg.Pool, mailbox: Mailbox
) -> None:
    """One pass sends what is due and marks it sent; the next pass sends nothing."""
    subjects = await queue_many(db, 3)
    mailer = Mailer(smtp_to(mailbox), email_from="hello@kilocode.ai", poll_interval_seconds=1)
    assert await mailer.send_due(pool) == 3
    assert await mailer.send_due(pool) == 0
    assert sorted(m.subject for m in mailbox.received) == subjects
    rows = await outbox(db)
    assert all(r["sent_at"] is not None and r["attempts"] == 0 for r in rows)


async def test_a_stopping_sender_hands_its_claims_back(
    db: asyncpg.Connection, pool: asyncpg.Pool, mailbox: Mailbox
) -> None:
    """Claims a stopped sender did not deliver are due again at once for another sender."""
    subjects = await queue_many(db, 3)
    stopped = Mailer(smtp_to(mailbox), email_from="hello@kilocode.ai", poll_interval_seconds=1)
    stopped.stop()
    assert await stopped.send_due(pool) == 0
    other = Mailer(smtp_to(mailbox), email_from="hello@kilocode.ai", poll_interval_seconds=1)
    assert await other.send_due(pool) == 3
    assert sorted(m.subject for m in mailbox.received) == subjects


async def test_concurrent_senders_split_the_outbox(
    db: asyncpg.Connection, pool: asyncpg.Pool, mailbox: Mailbox
) -> None:
    """Two senders claiming at once deliver every message exactly once between them."""
    subjects = await queue_many(db, 25)
    senders = [
        Mailer(smtp_to(mailbox), email_from="hello@kilocode.ai", poll_interval_seconds=1)
        for _ in range(2)
    ]
    for _ in range(3):
        await asyncio.gather(*(s.send_due(pool) for s in senders))
    assert sorted(m.subject for m in mailbox.received) == sorted(subjects)


async def test_two_gateways_never_send_a_message_twice(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    db: asyncpg.Connection,
    mailbox: Mailbox,
) -> None:
    """Two gateway processes on one database share the outbox without duplicates."""
    for _ in range(2):
        await gateway_factory(SMTP_URL=mailbox.url, **FAST)
    subjects = await queue_many(db, 40)
    await mailbox.wait_for(lambda m: m.subject.startswith("note"), count=40)
    # A message queued later arrives only after further polls by both senders.
    [sentinel] = await queue_many(db, 1, prefix="sentinel")
    await mailbox.wait_for(lambda m: m.subject == sentinel)
    assert sorted(m.subject for m in mailbox.received) == sorted([*subjects, sentinel])


async def test_sender_retries_with_backoff_until_the_server_answers(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    log_stream: io.StringIO,
) -> None:
    """SMTP down: the attempt is counted with a secret-free error and a 2 s backoff; once
    the server is up the message is delivered, once."""
    port = free_port()
    gateway = await gateway_factory(SMTP_URL=f"smtp://kilo:{PASSWORD}@127.0.0.1:{port}", **FAST)
    token = await seed.key(await seed.user("early@example.test"))
    await api(client, gateway, "POST", "/api/organizations", token=token, body={"name": "Acme"})

    async def attempts() -> int:
        return int(await db.fetchval("SELECT attempts FROM email_outbox"))

    await eventually(attempts, 1)
    row = (await outbox(db))[0]
    assert row["sent_at"] is None and row["last_error"]
    assert PASSWORD not in row["last_error"]
    wait = row["next_attempt_at"] - await db.fetchval("SELECT now()")
    assert timedelta(seconds=1) < wait <= timedelta(seconds=2)

    box = Mailbox(port, login=("kilo", PASSWORD))
    await asyncio.to_thread(box.start)
    try:
        await box.wait_for(to("early@example.test"))
        second = await seed.key(await seed.user("later@example.test"))
        body = {"name": "Later"}
        await api(client, gateway, "POST", "/api/organizations", token=second, body=body)
        await box.wait_for(to("later@example.test"))
        assert len(box.matching(to("early@example.test"))) == 1
        assert box.logins and set(box.logins) == {"kilo"}
    finally:
        await asyncio.to_thread(box.stop)
    first = (await outbox(db))[0]
    assert first["sent_at"] is not None and first["attempts"] >= 1
    assert PASSWORD not in log_stream.getvalue()


async def test_without_smtp_messages_are_logged_and_marked_sent(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    log_stream: io.StringIO,
) -> None:
    """No SMTP_URL: kind, recipient and subject are logged (never the body); sent_at is set."""
    gateway = await gateway_factory(**FAST)
    token = await seed.key(await seed.user("solo@example.test"))
    body = {"name": "Solo"}
    reply = await api(client, gateway, "POST", "/api/organizations", token=token, body=body)
    org_id = reply.body["organization"]["id"]
    path = f"/api/organizations/{org_id}/invitations"
    await api(client, gateway, "POST", path, token=token, body={"email": "pal@example.test"})

    async def unsent() -> int:
        return int(await db.fetchval("SELECT count(*) FROM email_outbox WHERE sent_at IS NULL"))

    await eventually(unsent, 0)
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.strip()]
    logged = {line["kind"]: line for line in lines if line.get("event") == "email_logged"}
    assert set(logged) == {"welcome", "invitation"}
    assert logged["welcome"]["to"] == "solo@example.test"
    assert logged["invitation"]["subject"] == "Join Solo on Kilo Code"
    invitation_body = await db.fetchval(
        "SELECT body_text FROM email_outbox WHERE kind = 'invitation'"
    )
    link = next(word for word in invitation_body.split() if "/invitations/" in word)
    assert link.rsplit("/", 1)[1] not in log_stream.getvalue()


async def test_sender_stops_cleanly_on_shutdown(
    make_config: Callable[..., gateway_config.Config], mailbox: Mailbox, db: asyncpg.Connection
) -> None:
    """Shutting the gateway down ends the sender promptly and without an error logged."""
    gateway = await start_gateway(make_config(SMTP_URL=mailbox.url, **FAST))
    await queue_many(db, 2)
    await mailbox.wait_for(lambda m: m.subject.startswith("note"), count=2)
    await asyncio.wait_for(gateway.close(), DEADLINE_SECONDS)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "email-sender"]
