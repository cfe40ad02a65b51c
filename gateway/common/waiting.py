"""Waiting for an event with a time limit, without losing a cancellation.

On Python 3.11, `asyncio.wait_for(event.wait(), t)` can swallow a cancellation that
arrives in the same loop iteration as the event or the timeout: the waiting task carries
on as if never cancelled. A loop built on it (the ledger's flusher, the listener's
watch, the email sender) then never stops, and whatever awaits its end waits for ever
(seen in the ledger tests under load: `stop()` hung on a task left "cancelling").
`asyncio.timeout` counts cancellations (`Task.uncancel`) and has no such race.
"""

from __future__ import annotations

import asyncio


async def wait_until_set(event: asyncio.Event, seconds: float) -> bool:
    """True when `event` is set within `seconds`, False when the time ran out first."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
