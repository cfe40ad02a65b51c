"""Helpers for the organization, invitation, email and reminder tests.

`Mailbox` is a real SMTP server (aiosmtpd, in its own thread) on a loopback port that
keeps every message it is handed; `api` calls the gateway's JSON endpoints; `eventually`
polls with a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from typing import Any

import aiohttp
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from bench.procs import free_port
from tests.conftest import RunningGateway

APP_URL = "https://app.example.test"
DEADLINE_SECONDS = 5.0
POLL_SECONDS = 0.02
# Settings that make the background sender quick enough to wait for in a test.
FAST_EMAIL = {"EMAIL_POLL_INTERVAL_SECONDS": "0.05"}


@dataclasses.dataclass(frozen=True)
class Received:
    """One message as the SMTP server got it."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class Mailbox:
    """A real SMTP server on 127.0.0.1 that keeps what it receives."""

    def __init__(self, port: int | None = None, login: tuple[str, str] | None = None) -> None:
        self.port = port or free_port()
        # With a login, clients must authenticate with it (over plain SMTP: a test only).
        self.login = login
        self.logins: list[str] = []
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        """aiosmtpd's hook: keep the message."""
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self._lock:
            self._received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted"

    def authenticate(
        self, _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator: accept only `login`."""
        assert self.login is not None and isinstance(data, LoginPassword)
        given = (data.login.decode(), data.password.decode())
        with self._lock:
            self.logins.append(given[0])
        return AuthResult(success=given == self.login)

    def start(self) -> None:
        auth: dict[str, Any] = {}
        if self.login is not None:
            auth = {"authenticator": self.authenticate, "auth_require_tls": False}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **auth)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def matching(self, predicate: Callable[[Received], bool]) -> list[Received]:
        return [m for m in self.received if predicate(m)]

    async def wait_for(
        self, predicate: Callable[[Received], bool], count: int = 1
    ) -> list[Received]:
        """The messages matching `predicate` once there are `count`; fails at the deadline."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while len(found := self.matching(predicate)) < count:
            assert time.monotonic() < deadline, f"{len(found)}/{count} messages arrived"
            await asyncio.sleep(POLL_SECONDS)
        return found


def running_mailbox() -> Iterator[Mailbox]:
    """A started SMTP server, stopped when the generator closes (for a fixture)."""
    box = Mailbox()
    box.start()
    try:
        yield box
    finally:
        box.stop()


def to(address: str) -> Callable[[Received], bool]:
    """A predicate: the message was addressed to `address`."""
    return lambda m: address in m.rcpt_tos


@dataclasses.dataclass(frozen=True)
class Reply:
    """A JSON endpoint's answer."""

    status: int
    body: Any


async def api(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Call a gateway endpoint; the body is parsed as JSON when there is one."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with client.request(
        method, gateway.url.with_path(path), json=body, data=raw, headers=sent
    ) as response:
        text = await response.read()
    return Reply(response.status, json.loads(text) if text else None)


def assert_error(reply: Reply, status: int, reason: str) -> dict[str, Any]:
    """The reply is the gateway's error envelope with this status and reason; its `error`."""
    assert reply.status == status, reply.body
    assert reply.body["error_type"] == reason, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == status
    assert error["metadata"]["reason"] == reason
    assert isinstance(error["message"], str) and error["message"]
    return error


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, within_seconds: float = DEADLINE_SECONDS
) -> float:
    """Poll `probe` until it returns `expected`; return how long it took, or fail."""
    started = time.monotonic()
    while (got := await probe()) != expected:
        elapsed = time.monotonic() - started
        assert elapsed < within_seconds, f"still {got!r}, not {expected!r}, after {elapsed:.2f}s"
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started


async def chat_status(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    token: str,
    organization_id: str,
    model: str = "openai/gpt-4o-mini",
) -> int:
    """The status of one chat completion through the proxy for the organization."""
    reply = await api(
        client,
        gateway,
        "POST",
        "/api/openrouter/chat/completions",
        token=token,
        headers={"X-KiloCode-OrganizationId": organization_id},
        body={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )
    return reply.status
