"""asyncio helpers the long-running parts of the gateway, and the client, share."""

from __future__ import annotations

import asyncio
import contextlib
import random


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


class Backoff:
    """Capped exponential backoff with jitter: each delay is drawn from
    [floor * d, d] with d = min(cap, base * 2**attempts); floor 0 is full jitter."""

    def __init__(self, base: float = 0.1, cap: float = 5.0, *, floor: float = 0.0) -> None:
        self.base, self.cap, self.floor, self.attempt = base, cap, floor, 0

    def next(self) -> float:
        """The next delay; counts one attempt."""
        delay: float = min(self.cap, self.base * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return delay * random.uniform(self.floor, 1.0)

    def reset(self) -> None:
        """Back to the shortest delays (a connection worked)."""
        self.attempt = 0
