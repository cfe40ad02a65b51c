"""`wait_until_set`: an event wait with a time limit that never loses a cancellation (on
Python 3.11 `asyncio.wait_for` returns the event's result instead when both arrive in
the same loop iteration, and a flusher loop built on it never stopped)."""

from __future__ import annotations

import asyncio

from gateway.common.waiting import wait_until_set


async def test_it_says_whether_the_event_was_set_in_time() -> None:
    event = asyncio.Event()
    assert await wait_until_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_until_set(event, 5) is True


async def test_a_cancellation_arriving_with_the_event_stops_the_loop_waiting_on_it() -> None:
    """The ledger's flusher shape: wait, clear, work, again. Cancelled in the very loop
    iteration the event is set, it must end cancelled, not wait again."""
    event = asyncio.Event()
    rounds = 0

    async def flusher() -> None:
        nonlocal rounds
        while True:
            await wait_until_set(event, 10)
            event.clear()
            rounds += 1

    task = asyncio.create_task(flusher())
    await asyncio.sleep(0)  # the flusher is waiting on the event
    event.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert done == {task} and task.cancelled()
    assert rounds == 0
