"""The client-delivery layer: one Session per SSE or WebSocket connection, and the timers
all sessions share.

A Session owns a client's Watcher (its mailbox at the hub, hub.py) and turns what arrives
there into writes. Everything the two transports have in common lives here: which tasks a
client follows, what a terminal state or a vanished task ends, the order of control messages
and states, the slow-client policy, the per-transport metrics. sse.py and ws.py subclass it
with only what differs: how items become bytes and how a connection ends.

How a state reaches the client:

* Direct: when the client's connection is idle (nothing buffered, no write in progress) and
  the server lets us write to it (server.py), the state is written in the hub's callback
  itself, as bytes encoded once per version and shared by all clients. No task wakes up.
  A session that follows one task writes at once; one that follows several writes once per
  turn of the event loop, so the states of one burst of events go out in one write.
* Pumped: otherwise (bytes still buffered for a slow client, or a server without direct
  writes) the session's pump, a coroutine that awaits the transport's ASGI `send`, writes
  them. For SSE the pump is the request's own task, which waits for work between writes. For
  WebSocket, whose request task keeps reading client frames, the pump is a task started when
  needed; once the connection is idle again it ends, and direct writes resume.

Either way the promises hold: items go out in the order they were queued (control messages
before the states collected with them), nothing follows an ending, and the mailbox keeps at
most one state per task, so a slow client costs bounded memory.

Slow clients. A pumped write that has not returned after `send_timeout_s` means the client
stopped reading: its connection is aborted (a polite close would wait for the client to read
its buffer), the undelivered states are counted as dropped, and the client resumes from the
record when it reconnects. Direct writes only happen into an empty buffer, so a stalled client
holds at most one round of frames plus what the pump wrote before it stalled.

Shared timers (Connections): one ticker writes SSE keep-alives for quiet streams, one sweeper
finds stalled writes, (under uvicorn) departed SSE clients and expired access tokens, one
closer closes finished connections between deliveries (DeferredCloser), and the server's
shutdown ends every session.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar

from prometheus_client import Gauge

from taskcast.access import Gate
from taskcast.hub import Hub, TaskState, Watcher
from taskcast.metrics import Metrics
from taskcast.models import Task
from taskcast.settings import Settings

logger = logging.getLogger(__name__)

Item = TaskState | bytes  # a state, or a control message already in the transport's payload form


class End(enum.Enum):
    """Why a session ends; each transport says how (SSE: the end of the body; WS: a close)."""

    DONE = "every watched task finished"
    MISSING = "a watched task vanished"
    SHUTDOWN = "the server is shutting down"
    CLOSED = "closed by the gateway"  # a WebSocket close code chosen by ws.py
    TOKEN_EXPIRED = "the access token expired"  # or, on /ws, none was given in time
    RETIRED = "the connection reached its maximum lifetime"  # max_stream_s
    CLIENT_LEFT = "the client left"
    TOO_SLOW = "the client stopped reading"


_SILENT_ENDS = (End.CLIENT_LEFT, End.TOO_SLOW)  # nothing more is written


class Session:
    """One client connection's deliveries; subclassed by each transport.

    Guarantees, on top of the hub's: the current state of each followed task first, then
    newer ones, in order, the terminal state last (contract section 4); control messages in
    the order queued; nothing after the end. Each state is written at most once per
    connection: what a dropped connection did not take is not kept, the client resumes from
    the record. No method but pump() waits for the client; a pumped write that has not
    returned within `send_timeout_s` ends the session as TOO_SLOW (see the module docstring).
    Call release() when the connection is over.
    """

    transport: ClassVar[str]  # the metrics label: "sse" or "ws"
    keepalive: ClassVar[bytes | None] = None  # written to a quiet connection every tick
    # Stop following a task once its terminal state is out (WebSocket), or only at the end of
    # the connection (SSE, whose stream ends when its last task does).
    drop_finished: ClassVar[bool] = True

    __slots__ = ("conns", "hub", "watcher", "watching", "unfinished",
                 "ends_when_done", "end",
                 "end_detail", "sending_since", "active", "_delivered", "_control", "_unsent",
                 "_started", "_done",
                 "_sending", "_waiter", "_pump", "_flush_scheduled", "_released", "expiry",
                 "retire_at")

    def __init__(self, conns: Connections, *, ends_when_done: bool) -> None:
        self.conns = conns
        self.hub = conns.hub
        self.watcher = Watcher(conns.metrics, self._kick, self._take_now)
        self.watching: set[int] = set()  # followed at the hub
        self.unfinished: set[int] = set()  # followed, and the terminal state not yet out
        self.ends_when_done = ends_when_done
        self.end: End | None = None
        self.end_detail: object = None  # e.g. the vanished task ids, or a close code
        self.sending_since = 0.0  # loop time a pumped write started; 0 when none is under way
        self.active = False  # wrote something since the last keep-alive tick
        self._delivered = conns.metrics.delivered
        self._control: list[bytes] = []
        self._unsent: list[Item] = []  # collected, not yet written (the pump writes them)
        self._started = False  # has followed at least one task
        self._done = False  # the end has been carried out (written, or nothing to write)
        self._sending = False
        self._waiter: asyncio.Future[None] | None = None  # the pump, waiting for work
        self._pump: asyncio.Task[None] | None = None  # a pump task of our own (WS)
        self._flush_scheduled = False
        self._released = False
        # (Unix time, end detail, metrics reason) set by expire_at, for the sweeper.
        self.expiry: tuple[float, object, str] | None = None
        # Loop time at which the sweeper ends the connection (0: never): max_stream_s, less up
        # to 10 % so that connections opened together do not all come back at once.
        lifetime = conns.settings.max_stream_s
        self.retire_at = (asyncio.get_running_loop().time() + lifetime * random.uniform(0.9, 1)
                          if lifetime > 0 else 0.0)
        conns.add(self)

    # -- what to follow -------------------------------------------------------------------------

    def watch(self, tasks: Iterable[tuple[int, Task | None]], claimed_version: int = 0
              ) -> None:
        """Follow tasks, given as (task id, a state just read or None); `claimed_version` is
        one the client says it holds (SSE Last-Event-ID): only newer versions follow it.
        All of them count as followed before the first state is offered, so a session that
        ends when its tasks are done cannot end before the last of them was added."""
        if self.end is not None or self._released:
            return
        new = [(task_id, task) for task_id, task in tasks if task_id not in self.watching]
        self._started = True
        self.watching.update(task_id for task_id, _ in new)
        self.unfinished.update(task_id for task_id, _ in new)
        for task_id, task in new:
            if claimed_version:
                self.watcher.claim(task_id, claimed_version)
            self.hub.watch(self.watcher, task_id, task)

    def unwatch(self, task_ids: Iterable[int]) -> None:
        """Stop following tasks; following one again later starts from its current state."""
        dropped = [task_id for task_id in task_ids if task_id in self.watching]
        self.watching.difference_update(dropped)
        self.unfinished.difference_update(dropped)
        self.hub.unwatch(self.watcher, dropped)
        for task_id in dropped:
            self.watcher.forget(task_id)

    # -- what to send ---------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Control messages and states collected but not yet written (a client behind)."""
        return len(self._control) + len(self._unsent)

    def send_control(self, payload: bytes, *, now: bool = True) -> None:
        """Queue a control message (a WebSocket reply, an SSE comment) behind what is queued;
        with now=False it waits for the next write (to go out in the same write)."""
        if self.end is None:
            self._control.append(payload)
            if now:
                self._kick()

    def flush(self) -> None:
        """Write what is queued (e.g. control messages queued with now=False)."""
        if self._control or self._unsent or self.watcher.ready:
            self._kick()

    def finish(self, end: End, detail: object = None) -> None:
        """End the session once the control messages and states already collected are
        written; states still in the mailbox are dropped (the client resumes from the
        record). Does nothing once an end has been chosen."""
        if self.end is not None or self._released:
            return
        self.end, self.end_detail = end, detail
        self._kick()

    def client_left(self) -> None:
        """The client is gone: end without writing anything more (an end already chosen
        stays), and let a waiting pump return. Safe to call more than once."""
        if self.end is None:
            self.end = End.CLIENT_LEFT
        self._wake(start=False)

    def drop_slow(self) -> None:
        """The sweeper found a write that did not return: abort the connection."""
        if self.end is End.TOO_SLOW or self._released:
            return
        self.end = End.TOO_SLOW
        metrics = self.conns.metrics
        metrics.slow_disconnects.labels(self.transport).inc()
        metrics.dropped.inc(len(self.watcher.take()) + len(self._unsent))
        self._unsent, self._control = [], []
        if not self._abort():
            # The server offers no abort: cancel whoever is stuck in the write.
            if self._pump is not None:
                self._pump.cancel()
            self._cancel_stuck_writer()
        self._wake(start=False)
        logger.info("dropped a %s client that stopped reading", self.transport)

    def expire_at(self, unix_time: float, detail: object = None,
                  reason: str = "expired_in_use") -> None:
        """End the session as TOKEN_EXPIRED (with `detail`) once `unix_time` has passed,
        unless this is called again first (a refreshed token); counted in the auth refusals
        as `reason`. The shared sweeper checks it (within a second):
        no timer per connection (a uvloop timer costs ~0.5 KiB) and nothing per delivery."""
        if not self._released and self.end is None:
            self.expiry = (unix_time, detail, reason)

    def expired(self) -> None:
        """The sweeper found the expiry time passed: end the session."""
        expiry, self.expiry = self.expiry, None
        if expiry is not None and self.end is None and not self._released:
            self.conns.metrics.auth_refusals.labels(self.transport, expiry[2]).inc()
            self.finish(End.TOKEN_EXPIRED, expiry[1])

    # -- the machinery --------------------------------------------------------------------------

    def _take_now(self, state: TaskState) -> bool:
        """The hub's fast path (Watcher.take_now): a progress state for an idle connection
        with nothing queued, of a session that follows one task, is written on the spot."""
        if (state.terminal or self._sending or self._control or self._unsent
                or self._flush_scheduled or self.end is not None or len(self.watching) > 1
                or not self._write_state(state)):
            return False
        self._delivered[self.transport] += 1
        self.active = True
        return True

    def _kick(self) -> None:
        """Something is queued: write it now if the connection is idle, else make sure the
        pump will."""
        if self._released or self._flush_scheduled:
            return
        if not self._sending and self._writable():
            if len(self.watching) > 1:
                # Several tasks: one write per turn of the loop for all their states.
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._scheduled_flush)
            else:
                self._flush()
            return
        self._wake()

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if not self._released and not self._sending and self._writable():
            self._flush()
        elif not self._released:
            self._wake()

    def _flush(self) -> None:
        """Collect and write now; what cannot be done now goes to the pump."""
        items = self._collect()
        if self.end is not None:
            if self.end not in _SILENT_ENDS and self._finish_now(items):
                self._done = True
                self._stop_following()  # at once: the hub must not keep what we no longer want
                # The pump (the request's task) has nothing left but the teardown: that waits
                # until the deliveries of the moment are done, like the connection's close.
                self.conns.closer.later(self._end_pump)
            else:
                # The pump writes the last items and the end together: one write, not two,
                # which matters when many connections end at once.
                self._unsent = items
                self._wake()
            return
        if items:
            if not self._write_now(items):
                self._unsent = items
                self._wake()
                return
            self.active = True

    def _collect(self) -> list[Item]:
        """Take what is queued, apply the end rules, and return the items to write in order."""
        if self.end in _SILENT_ENDS:  # nothing more is written
            self._unsent, self._control = [], []
            self.watcher.take()
            return []
        items: list[Item] = list(self._unsent)
        self._unsent = []
        if self._control:
            items.extend(self._control)
            self._control = []
        if self.end is not None:
            self.watcher.take()
            return items
        states = self.watcher.take()
        if states:
            self._delivered[self.transport] += len(states)
            for state in states:
                items.append(state)
                if state.terminal:
                    self._finished(state.task_id)
        if self.watcher.has_claims:
            # A client may already hold a terminal state (Last-Event-ID) that the hub learns
            # only now, e.g. after Redis came back: nothing newer will come for it.
            for task_id in [task_id for task_id in self.unfinished
                            if self.hub.holds_terminal(self.watcher, task_id)]:
                self._finished(task_id)
        missing = self.watcher.take_missing() & self.unfinished
        if missing:
            self._vanished(sorted(missing), items)
        if self.end is None and self.ends_when_done and self._started and not self.unfinished:
            self.end = End.DONE
        return items

    def _finished(self, task_id: int) -> None:
        """The task's terminal state is on its way: nothing can follow it."""
        self.unfinished.discard(task_id)
        if self.drop_finished:
            self.watching.discard(task_id)
            self.hub.unwatch(self.watcher, [task_id])
            self.watcher.forget(task_id)

    async def pump(self) -> None:
        """Write what direct writes could not, until the session ends (or, for a pump task of
        our own, until the connection is idle again)."""
        while not self._released and not self._done:
            items = self._collect()
            if self.end is not None and self.end not in _SILENT_ENDS:
                self._done = True
                await self._timed(self._finish(items))
                return
            if items:
                await self._timed(self._send(items))
                continue
            if self.end is not None:
                return
            if self._pump is not None and self._writable():
                return  # idle again: direct writes take over
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _stop_following(self) -> None:
        self.hub.unwatch(self.watcher, self.watching)
        self.watching.clear()
        self.unfinished.clear()
        self.watcher.close()

    def _end_pump(self) -> None:
        self._wake(start=False)

    async def _timed(self, write: Awaitable[None]) -> None:
        """A pumped write, watched by the sweeper; a connection found gone ends the session."""
        self._sending = True
        self.sending_since = asyncio.get_running_loop().time()
        try:
            await write
        except OSError:
            self.client_left()
        finally:
            self._sending = False
            self.sending_since = 0.0
        self.active = True

    def _wake(self, start: bool = True) -> None:
        """Wake the pump; start a pump task of our own if there is none and `start`."""
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif (start and self._pump is None and self._needs_pump_task() and not self._released
              and self.end not in _SILENT_ENDS):
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            await self.pump()
        except Exception:
            logger.exception("%s delivery failed", self.transport)
            self._abort()
        finally:
            self._pump = None

    def release(self) -> None:
        """The connection is over: stop following everything and drop every reference."""
        if self._released:
            return
        self._released = True
        self._stop_following()
        self.conns.discard(self)
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)  # a waiting pump sees the release and returns
        elif self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()  # stuck in a write to a client that is gone

    # -- what each transport provides -----------------------------------------------------------

    def _writable(self) -> bool:
        """Whether a direct write now would go out at once."""
        return False

    def _write_now(self, items: list[Item]) -> bool:
        """Write directly; False if the connection cannot take it now."""
        return False

    def _write_state(self, state: TaskState) -> bool:
        """Write one state directly if the connection is idle; else False."""
        return False

    async def _send(self, items: list[Item]) -> None:
        """Write through ASGI (may wait for the client)."""
        raise NotImplementedError

    def _finish_now(self, items: list[Item]) -> bool:
        """Write `items` and carry out `end` without waiting, if possible; else False and
        nothing is written."""
        return False

    async def _finish(self, items: list[Item]) -> None:
        """Write `items` and carry out `end` through ASGI."""

    def _vanished(self, task_ids: list[int], items: list[Item]) -> None:
        """Records of watched tasks are gone: queue a message and/or set `end`."""
        self.end, self.end_detail = End.MISSING, task_ids

    def _needs_pump_task(self) -> bool:
        """Whether the pump runs in a task of the session's own (WS) rather than the request's."""
        return False

    def _abort(self) -> bool:
        """Abort the connection; False when the server offers no way to."""
        return False

    def _cancel_stuck_writer(self) -> None:
        """Without an abort: cancel the task stuck in a write (SSE: the request's)."""

    @property
    def disconnected(self) -> bool:
        """What the server says about the client, where it tells without a receive()."""
        return False


class DeferredCloser:
    """Closes the connections of finished streams after the deliveries of the moment, and
    runs other work that can wait as long (`later`: the teardown of streams that ended on the
    direct path).

    Why: when many tasks finish together, every one of their connections ends at once, and
    closing a TCP connection (reading the client's FIN, the close and epoll syscalls, the
    server's bookkeeping) costs about as much CPU as delivering the terminal state itself.
    Done inline, the closes of the first connections delay the terminal states of the later
    ones (bench/README.md: terminal-state p99 up to ~100 ms when 500 tasks finish in 0.25 s).

    So a finished connection stops being read (a client's FIN then costs nothing until the
    close) and is queued here, and so is the wake-up of the task of a stream that ended
    directly (its release costs about as much again). One task works through the queue: none
    while connections are still ending (a tick in which one was queued), then at most
    `per_tick` every `tick_s`; whatever has waited `max_delay_s` goes at once, which bounds how
    long a finished connection lives.
    On shutdown everything queued is closed at once.
    """

    def __init__(self, per_tick: int = 50, tick_s: float = 0.01, max_delay_s: float = 1.0
                 ) -> None:
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.max_delay_s = max_delay_s
        self._queue: deque[tuple[float, asyncio.Transport | Callable[[], None]]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._now = False  # shutting down: close at once

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, transport: asyncio.Transport) -> None:
        """Queue a finished connection for closing (at once after close_all); a transport
        that is closing already is ignored. Never blocks."""
        if transport.is_closing():
            return
        if self._now:
            transport.close()
            return
        self._queue.append((time.monotonic(), transport))
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def later(self, call: Callable[[], None]) -> None:
        """Run `call` under the same rules as the closes (at once after close_all)."""
        if self._now:
            call()
            return
        self._queue.append((time.monotonic(), call))
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def close_all(self) -> None:
        """From now on close and run at once (shutdown), including what is queued."""
        self._now = True
        while self._queue:
            self._close(self._queue.popleft()[1])

    async def run(self) -> None:
        """The closing task (see the class docstring); runs until cancelled."""
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
            # Connections still ending in the last tick: a burst is going on, so only the overdue.
            budget = 0 if queue[-1][0] > now - self.tick_s else self.per_tick
            overdue = now - self.max_delay_s
            closed = 0
            while queue and (closed < budget or queue[0][0] <= overdue):
                self._close(queue.popleft()[1])
                closed += 1

    @staticmethod
    def _close(item: asyncio.Transport | Callable[[], None]) -> None:
        if callable(item):
            item()
        elif not item.is_closing():
            item.close()


class Connections:
    """The open sessions of one gateway process and the timers they share.

    Between start() and close(): a session whose transport has a keep-alive gets one at every
    `sse_keepalive_s` tick in which it wrote nothing; every min(1 s, send_timeout_s / 4) the
    sweeper drops a session whose pumped write has taken longer than `send_timeout_s`, ends
    one whose client the server reports gone, one whose token has expired and one that has
    reached its lifetime (max_stream_s).
    shutdown() ends every session, once.
    """

    def __init__(self, hub: Hub, metrics: Metrics, settings: Settings,
                 gate: Gate | None = None) -> None:
        self.hub = hub
        self.metrics = metrics
        self.settings = settings
        self.gate = gate  # access control (access.py); None: every task is open
        self.closer = DeferredCloser()
        self.shutting_down = False
        self._gauges: dict[str, Gauge] = {}  # open connections per transport
        self._sessions: set[Session] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        """Register a new session (Session.__init__ does) for the timers and the gauge."""
        self._sessions.add(session)
        self._gauge(session.transport).inc()

    def discard(self, session: Session) -> None:
        """Unregister a session (Session.release does); a second call changes nothing."""
        if session in self._sessions:
            self._sessions.remove(session)
            self._gauge(session.transport).dec()

    def _gauge(self, transport: str) -> Gauge:
        gauge = self._gauges.get(transport)
        if gauge is None:
            gauge = self._gauges[transport] = self.metrics.connections.labels(transport)
        return gauge

    def start(self) -> None:
        """Start the keep-alive ticker, the sweeper and the closer; once, on the running loop."""
        self._tasks = [
            asyncio.create_task(self._keepalive(), name="taskcast-keepalive"),
            asyncio.create_task(self._sweep(), name="taskcast-sweeper"),
            asyncio.create_task(self.closer.run(), name="taskcast-closer"),
        ]

    async def close(self) -> None:
        """Stop the timers and close the queued finished connections; the sessions still
        open are left alone (shutdown() is what ends them)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.closer.close_all()

    def shutdown(self) -> None:
        """The server is stopping: end every session cleanly (clients reconnect elsewhere)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        logger.info("shutting down: ending %d push connections", len(self._sessions))
        self.closer.close_all()
        for session in list(self._sessions):
            session.finish(End.SHUTDOWN)

    async def _keepalive(self) -> None:
        # Only sessions that define a keep-alive take part (SSE; WebSockets ping in-protocol).
        while True:
            await asyncio.sleep(self.settings.sse_keepalive_s)
            for session in list(self._sessions):
                keepalive = session.keepalive
                if keepalive is None:
                    continue
                if session.active:
                    session.active = False
                else:
                    session.send_control(keepalive)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.settings.send_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now, wall = loop.time(), time.time()
            for session in list(self._sessions):
                since = session.sending_since
                if since and now - since > timeout:
                    session.drop_slow()
                elif session.disconnected:
                    session.client_left()
                elif session.expiry is not None and wall >= session.expiry[0]:
                    session.expired()
                elif session.retire_at and now >= session.retire_at:
                    session.finish(End.RETIRED)

