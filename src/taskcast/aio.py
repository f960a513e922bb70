"""asyncio helpers the long-running parts of the gateway share."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[None], poll_s: float = 0.1) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again while it runs on.

    One cancel is not always enough: on Python 3.11 a cancellation that lands while
    `asyncio.timeout()` expires (redis-py wraps its socket reads in one) can be swallowed, and a
    shutdown that awaited the task after a single cancel waited for good
    (tests/test_timeouts.py::test_a_gateway_stops_while_its_timeout_sweep_is_busy).
    Whatever the task raised on its way out is not re-raised."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=poll_s)
    with contextlib.suppress(BaseException):
        task.result()
