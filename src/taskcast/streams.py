"""The open SSE streams of one gateway process, and the three timers they share.

Per-connection timers are what made the first SSE design expensive (a task group, a ping task,
a shutdown listener and a timeout scope around every write, per client; see bench/README.md).
Here each stream costs its request task alone (plus, under servers other than uvicorn, one
task that waits for the disconnect), and one registry per process does the periodic work for
all of them:

* keep-alive: every `keepalive_s` it wakes the streams that sent nothing since the last tick,
  and they write a comment;
* slow clients: a write that has not returned after `send_timeout_s` means the client stopped
  reading; its connection is aborted (or, under a server we cannot abort through, its task is
  cancelled), which frees the buffered bytes at once;
* departed clients: under uvicorn it reads each connection's `disconnected` flag, so a stream
  needs no task of its own waiting for the disconnect message (a second or so of delay);
* shutdown: it waits, once, for the shutdown signal sse-starlette already detects for the
  process (uvicorn's exit, or AppStatus.should_exit), then ends every stream cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from typing import Any

from taskcast.hub import Watcher
from taskcast.metrics import Metrics
from taskcast.server import abort_connection

logger = logging.getLogger(__name__)


class OpenStream:
    __slots__ = ("watcher", "scope", "task", "cycle", "sending_since", "active", "aborted")

    def __init__(self, watcher: Watcher, scope: MutableMapping[str, Any],
                 task: asyncio.Task[Any] | None, cycle: Any = None) -> None:
        self.watcher = watcher
        self.scope = scope
        self.task = task
        # uvicorn's per-request object, whose `disconnected` flag the sweeper reads; None under
        # other servers, where a task per stream waits for the disconnect message instead.
        self.cycle = cycle
        self.sending_since = 0.0  # loop time when the current write started; 0 when idle
        self.active = False  # wrote something since the last keep-alive tick
        self.aborted = False


class OpenStreams:
    def __init__(self, metrics: Metrics, keepalive_s: float, send_timeout_s: float) -> None:
        self.metrics = metrics
        self.keepalive_s = keepalive_s
        self.send_timeout_s = send_timeout_s
        self._streams: set[OpenStream] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: OpenStream) -> None:
        self._streams.add(stream)

    def discard(self, stream: OpenStream) -> None:
        self._streams.discard(stream)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keepalive(), name="taskcast-sse-keepalive"),
            asyncio.create_task(self._sweep(), name="taskcast-sse-sweeper"),
            asyncio.create_task(self._end_on_shutdown(), name="taskcast-sse-shutdown"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close_all(self, reason: str) -> None:
        for stream in list(self._streams):
            stream.watcher.close(reason)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_s)
            for stream in list(self._streams):
                if stream.active:
                    stream.active = False
                else:
                    stream.watcher.poke()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.send_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for stream in list(self._streams):
                since = stream.sending_since
                if since and not stream.aborted and now - since > self.send_timeout_s:
                    self._drop_slow(stream)
                elif stream.cycle is not None and stream.cycle.disconnected:
                    stream.watcher.close("client left")

    def _drop_slow(self, stream: OpenStream) -> None:
        stream.aborted = True
        self.metrics.slow_disconnects.labels("sse").inc()
        self.metrics.dropped.inc(len(stream.watcher.pending))
        stream.watcher.close("too slow")
        # Closing politely would wait for the client to read its whole buffer first.
        if not abort_connection(stream.scope) and stream.task is not None:
            stream.task.cancel()
        logger.info("dropped an SSE client that stopped reading")

    async def _end_on_shutdown(self) -> None:
        # sse-starlette keeps one shutdown watcher per event loop (it patches uvicorn's exit
        # handler and also finds a uvicorn server through its signal handler); one wait here
        # serves every stream of the process.
        from sse_starlette.sse import AppStatus, EventSourceResponse

        wait = getattr(EventSourceResponse, "_listen_for_exit_signal", None)
        if wait is not None:
            await wait()
        else:  # an sse-starlette without it: its public flag still tells
            while not AppStatus.should_exit:
                await asyncio.sleep(0.5)
        logger.info("shutting down: ending %d SSE streams", len(self._streams))
        self.close_all("shutdown")
