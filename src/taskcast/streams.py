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
  process (uvicorn's exit, or AppStatus.should_exit), then ends every stream cleanly;
* closing finished connections: a stream's response says `Connection: close`, and under uvicorn
  the connection is not closed the moment the body ends but handed to one closer task that
  closes such connections a few dozen at a time, between deliveries (see DeferredCloser).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any

from taskcast.hub import TaskState, Watcher
from taskcast.metrics import Metrics
from taskcast.server import abort_connection

logger = logging.getLogger(__name__)


class OpenStream:
    __slots__ = ("watcher", "scope", "task", "cycle", "transport", "sending_since", "active",
                 "aborted", "include", "delivered")

    def __init__(self, watcher: Watcher, scope: MutableMapping[str, Any],
                 task: asyncio.Task[Any] | None, cycle: Any = None) -> None:
        self.watcher = watcher
        self.scope = scope
        self.task = task
        # uvicorn's per-request object, whose `disconnected` flag the sweeper reads; None under
        # other servers, where a task per stream waits for the disconnect message instead.
        self.cycle = cycle
        # Set by take_over_close(): the connection this process closes itself, after the body.
        self.transport: asyncio.Transport | None = None
        self.sending_since = 0.0  # loop time when the current write started; 0 when idle
        self.active = False  # wrote something since the last keep-alive tick
        self.aborted = False
        self.include = True  # image_base64 in the frames push() writes
        self.delivered: dict[str, int] = {}  # the delivery counters push() adds to

    def push(self, state: TaskState) -> bool:
        """Write one state as an HTTP chunk straight to the connection (hub.DirectSink).

        This skips waking the stream's task and going through the ASGI `send` for each state
        (a quarter of the CPU per delivery in the issue-3 benchmark). The stream's task still
        writes the head, the first state, the terminal state and the end of the body, and
        every state while anything is buffered: a client that stops reading falls back to the
        ordinary writes, which wait for the buffer and are watched by the sweeper.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        transport.write(state.sse_chunk(self.include))
        self.delivered["sse"] += 1
        self.active = True
        return True

    def take_over_close(self) -> None:
        """Called once the response head (which says `Connection: close`) is sent.

        uvicorn reads that header and would close the connection inside the send that ends the
        body. Telling it to keep the connection (its cycle's `keep_alive` flag) leaves the close
        to DeferredCloser instead. Clients still see `Connection: close` and never reuse the
        connection. Under another server, or a uvicorn without these attributes, nothing
        changes and the server closes at the end of the body as usual.
        """
        cycle = self.cycle
        transport = getattr(cycle, "transport", None)
        if (isinstance(getattr(cycle, "keep_alive", None), bool)
                and callable(getattr(transport, "pause_reading", None))
                and callable(getattr(transport, "is_closing", None))):
            cycle.keep_alive = True
            self.transport = transport

    def write_directly(self, include: bool, delivered: dict[str, int]) -> None:
        """Let the watcher push states through push(), when the body is chunk-encoded by a
        uvicorn whose connection take_over_close() found."""
        if self.transport is not None and getattr(self.cycle, "chunked_encoding", None) is True:
            self.include = include
            self.delivered = delivered
            self.watcher.sink = self


class DeferredCloser:
    """Closes the connections of finished streams after the deliveries of the moment.

    Why: when many tasks finish together, every one of their streams ends at once, and closing
    a TCP connection (reading the client's FIN, the close and epoll syscalls, the server's
    bookkeeping) costs a gateway about as much CPU as delivering the terminal state itself.
    Done inline, the closes of the first streams delay the terminal states of the later ones:
    in the issue-3 benchmark, where 500 tasks finish within 0.25 s, that made the completion
    burst the whole latency tail (terminal-state p99 up to ~100 ms, see bench/README.md).

    So a finished stream stops reading from its connection (a client's FIN then costs nothing
    until the close) and queues the transport here. One task closes them: none while streams
    are still ending (a tick in which one was queued), then at most `per_tick` every `tick_s`,
    which caps the share of the CPU closes take from deliveries; whatever has waited
    `max_delay_s` is closed at once, which bounds how long a finished connection lives. On
    shutdown everything queued is closed at once.
    """

    def __init__(self, per_tick: int = 50, tick_s: float = 0.01, max_delay_s: float = 1.0
                 ) -> None:
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.max_delay_s = max_delay_s
        self._queue: deque[tuple[float, asyncio.Transport]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._now = False  # shutting down: close at once

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, transport: asyncio.Transport) -> None:
        if transport.is_closing():
            return
        if self._now:
            transport.close()
            return
        self._queue.append((time.monotonic(), transport))
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def close_all(self) -> None:
        """From now on close at once (shutdown), including what is queued."""
        self._now = True
        while self._queue:
            self._close(self._queue.popleft()[1])

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not queue:
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
            await asyncio.sleep(self.tick_s)
            if not queue:  # close_all() emptied it meanwhile
                continue
            now = time.monotonic()
            # Streams still ending in the last tick: a burst is going on, so only the overdue.
            budget = 0 if queue[-1][0] > now - self.tick_s else self.per_tick
            overdue = now - self.max_delay_s
            closed = 0
            while queue and (closed < budget or queue[0][0] <= overdue):
                self._close(queue.popleft()[1])
                closed += 1

    @staticmethod
    def _close(transport: asyncio.Transport) -> None:
        if not transport.is_closing():
            transport.close()


class OpenStreams:
    def __init__(self, metrics: Metrics, keepalive_s: float, send_timeout_s: float) -> None:
        self.metrics = metrics
        self.keepalive_s = keepalive_s
        self.send_timeout_s = send_timeout_s
        self._streams: set[OpenStream] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.closer = DeferredCloser()

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
            asyncio.create_task(self.closer.run(), name="taskcast-sse-closer"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.closer.close_all()

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
        self.closer.close_all()
        self.close_all("shutdown")
