"""A metered request's two halves: its body, read once and only when wanted, and its one
charge, recorded however the request ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.access.auth import Caller
from gateway.common.context import RequestContext
from gateway.ledger.writer import Charge, UsageLedger
from gateway.proxy.metering import Meter


class RequestBody:
    """The request body, read once, when first wanted."""

    __slots__ = ("_content", "_meter", "_read")

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read = read
        self._content: bytes | None = None
        self._meter: Meter | None = None

    async def read(self) -> bytes:
        if self._content is None:
            self._content = await self._read()
        return self._content

    async def meter(self) -> Meter:
        if self._meter is None:
            self._meter = Meter(await self.read())
        return self._meter

    async def model(self) -> str | None:
        """The model the body asks for (the credit check's question)."""
        return (await self.meter()).model()


class Charger:
    """Records the request's one charge, however the request ends."""

    __slots__ = ("_caller", "_ctx", "_ledger", "_meter", "done")

    def __init__(
        self, ledger: UsageLedger, ctx: RequestContext, caller: Caller, meter: Meter
    ) -> None:
        self._ledger, self._ctx, self._caller, self._meter = ledger, ctx, caller, meter
        self.done = False

    @property
    def meter(self) -> Meter:
        return self._meter

    def __call__(self, status: int, *, cancelled: bool) -> None:
        if self.done:
            return
        self.done = True
        usage = self._meter.usage()
        # Positional: this runs once per metered request.
        self._ledger.record(
            Charge.make(
                self._ctx.request_id,
                self._caller.organization_id,
                self._caller.user_id,
                usage.model,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cost_microdollars,
                self._meter.streamed,
                status,
                cancelled,
            )
        )
