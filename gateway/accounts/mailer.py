"""The email sender: delivers the outbox through SMTP, each message once.

Every `EMAIL_POLL_INTERVAL_SECONDS` the sender claims the due, unsent rows of
`email_outbox` (`FOR UPDATE SKIP LOCKED`, pushing their `next_attempt_at` out by a
lease), so several gateway processes sharing one database never hold the same message.
A delivered message gets `sent_at`; a failed one its attempt counted, a short error and
a retry after 2^attempts seconds (at most an hour). A stopping sender hands back the
claims it did not get to. Only a process that dies between the SMTP server's "250" and
recording `sent_at` can cause a second delivery, once its claim expires: SMTP offers
nothing better.

`SMTP_URL` is `smtp://user:password@host:port` (STARTTLS when the server offers it) or
`smtps://…` (TLS from the first byte). Without it messages are logged (kind, recipient,
subject; never the body, which can hold an invitation token) and marked sent.
aiosmtplib's errors are handled here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
from collections.abc import AsyncIterator
from email.message import EmailMessage

import aiosmtplib
import asyncpg
import structlog
from aiohttp import web

from gateway.access.queries import Queryable
from gateway.common.waiting import wait_until_set
from gateway.config import CONFIG, SmtpSettings, parse_smtp_url
from gateway.platform.database import POOL, UNAVAILABLE_ERRORS

log = structlog.get_logger("gateway.mailer")

SMTP_TIMEOUT_SECONDS = 30.0
BATCH_SIZE = 10
# A claimed batch is left alone by other senders for this long: longer than sending it.
LEASE_SECONDS = BATCH_SIZE * SMTP_TIMEOUT_SECONDS + 60
MAX_RETRY_DELAY_SECONDS = 3600
MAX_ERROR_LENGTH = 200
# What a failed delivery can raise: the server's refusal, the network, a bad address.
DELIVERY_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError)

_CLAIM_SQL = """
WITH due AS (
    SELECT id FROM email_outbox
    WHERE sent_at IS NULL AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE email_outbox o SET next_attempt_at = now() + make_interval(secs => $2)
FROM due WHERE o.id = due.id
RETURNING o.id, o.kind, o.to_address, o.subject, o.body_text, o.attempts
"""
_SENT_SQL = """
UPDATE email_outbox SET sent_at = now(), last_error = NULL WHERE id = $1 AND sent_at IS NULL
"""
# Claims a stopping sender did not get to go back to the others at once.
_RELEASE_SQL = """
UPDATE email_outbox SET next_attempt_at = now() WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""
_FAILED_SQL = """
UPDATE email_outbox
SET attempts = attempts + 1, last_error = $2, next_attempt_at = now() + make_interval(secs => $3)
WHERE id = $1 AND sent_at IS NULL
"""


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One claimed row of the outbox."""

    id: int
    kind: str
    to: str
    subject: str
    body: str
    attempts: int


def retry_delay_seconds(attempts: int) -> int:
    """How long to wait after the `attempts`-th failure: 2^attempts seconds, at most an hour."""
    return min(2 ** min(attempts, 12), MAX_RETRY_DELAY_SECONDS)


def build_message(message: OutboxMessage, email_from: str) -> EmailMessage:
    """The MIME message for an outbox row."""
    mime = EmailMessage()
    mime["From"] = email_from
    mime["To"] = message.to
    # One line, whatever an organization's name held.
    mime["Subject"] = " ".join(message.subject.split())
    mime["Date"] = email.utils.formatdate(usegmt=True)
    mime["Message-ID"] = email.utils.make_msgid(f"outbox.{message.id}")
    mime.set_content(message.body)
    return mime


class Mailer:
    """Polls the outbox and delivers what is due, until stopped."""

    def __init__(
        self, smtp: SmtpSettings | None, *, email_from: str, poll_interval_seconds: float
    ) -> None:
        self.smtp = smtp
        self.email_from = email_from
        self.poll_interval_seconds = poll_interval_seconds
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish the message in hand, then return from `run`."""
        self._stopping.set()

    async def run(self, pool: asyncpg.Pool) -> None:
        """Deliver due messages every poll interval until `stop`."""
        while not self._stopping.is_set():
            try:
                await self.send_due(pool)
            except UNAVAILABLE_ERRORS as exc:
                log.warning("email_outbox_unavailable", error=type(exc).__name__)
            except Exception:
                log.exception("email_sender_failed")
            await wait_until_set(self._stopping, self.poll_interval_seconds)

    async def send_due(self, pool: asyncpg.Pool) -> int:
        """Claim and deliver one batch of due messages; return how many were delivered.

        No connection is held while talking to the SMTP server.
        """
        rows = await pool.fetch(_CLAIM_SQL, BATCH_SIZE, LEASE_SECONDS)
        claimed = [OutboxMessage(*row) for row in rows]
        sent = 0
        for index, message in enumerate(claimed):
            if self._stopping.is_set():
                await pool.execute(_RELEASE_SQL, [m.id for m in claimed[index:]])
                break
            sent += await self._deliver_one(pool, message)
        return sent

    async def _deliver_one(self, pool: Queryable, message: OutboxMessage) -> int:
        try:
            await self.deliver(message)
        except DELIVERY_ERRORS as exc:
            await self._record_failure(pool, message, exc)
            return 0
        await pool.execute(_SENT_SQL, message.id)
        return 1

    async def deliver(self, message: OutboxMessage) -> None:
        """Send one message over SMTP, or log it when no SMTP server is configured."""
        if self.smtp is None:
            log.info(
                "email_logged",
                outbox_id=message.id,
                kind=message.kind,
                to=message.to,
                subject=message.subject,
            )
            return
        await aiosmtplib.send(
            build_message(message, self.email_from),
            hostname=self.smtp.hostname,
            port=self.smtp.port,
            username=self.smtp.username,
            password=self.smtp.password,
            use_tls=self.smtp.use_tls,
            timeout=SMTP_TIMEOUT_SECONDS,
        )
        log.info("email_sent", outbox_id=message.id, kind=message.kind)

    async def _record_failure(
        self, pool: Queryable, message: OutboxMessage, exc: BaseException
    ) -> None:
        attempts = message.attempts + 1
        delay = retry_delay_seconds(attempts)
        error = self._describe(exc)
        await pool.execute(_FAILED_SQL, message.id, error, float(delay))
        log.warning(
            "email_failed",
            outbox_id=message.id,
            kind=message.kind,
            attempts=attempts,
            retry_in_seconds=delay,
            error=error,
        )

    def _describe(self, exc: BaseException) -> str:
        """A short, secret-free account of a failure for `last_error`."""
        text = f"{type(exc).__name__}: {exc}"
        if self.smtp is not None and self.smtp.password:
            text = text.replace(self.smtp.password, "***")
        return text[:MAX_ERROR_LENGTH]


MAILER = web.AppKey("mailer", Mailer)


def setup(app: web.Application) -> None:
    """Build the sender from the configuration (a bad SMTP_URL fails here) and run it."""
    config = app[CONFIG]
    smtp = parse_smtp_url(config.smtp_url) if config.smtp_url else None
    app[MAILER] = Mailer(
        smtp, email_from=config.email_from, poll_interval_seconds=config.email_poll_interval_seconds
    )
    app.cleanup_ctx.append(email_sender)


async def email_sender(app: web.Application) -> AsyncIterator[None]:
    """The background sender; on shutdown it finishes the message in hand, then stops."""
    mailer = app[MAILER]
    task = asyncio.create_task(mailer.run(app[POOL]), name="email-sender")
    yield
    mailer.stop()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, SMTP_TIMEOUT_SECONDS)
