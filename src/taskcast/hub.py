"""The fan-out core: one subscription per process, many watchers, and the delivery guarantee.

Delivery guarantee (contract section 4). The record in Redis is the truth; pub/sub events are
hints that carry a whole new state with its `version`. For every task a watcher follows, the hub
offers it the current state first and then only strictly newer versions, and the terminal state
is never lost. How:

* Subscribe first, read second. A task's channel is subscribed when its first local watcher
  arrives; every subscription confirmation (the first one, and the ones redis-py produces when
  it silently reconnects) marks the task dirty, and the refresher then re-reads its record.
  Whatever order events and reads arrive in, only versions above the last one known are passed
  on, so the result is the same: no duplicates, no regressions.
* Pub/sub is at most once: Redis drops slow subscribers, outages lose messages, and a producer
  may publish while we are disconnected. So the broker reconnects with backoff (its watchdog
  PINGs and rebuilds a hung connection), and every watched task that is not finished is also
  re-read every `resync_interval_s`: a lost last event is delivered at the latest then.
* Each state is decoded once per process and encoded once per output format (TaskState caches
  the frames), and every watcher of the task shares those bytes.
* A watcher whose client is idle and caught up may hand a state straight to its transport
  (its `sink`, see DirectSink) instead of waking the client's task for it; the terminal state
  and everything else take the ordinary path below.
* Each watcher has one pending slot per task. A newer state replaces an older one that the
  client has not taken yet (conflation, counted); since the terminal state is the last version
  of a task, nothing can replace it, so it is never dropped. A watcher's memory is therefore
  bounded by the number of tasks it watches, however slow its client. Transports close clients
  that stop reading altogether (send timeouts), and those reconnect and resume from the record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from taskcast.broker import Broker
from taskcast.errors import StoreUnavailable
from taskcast.metrics import Metrics
from taskcast.models import Task
from taskcast.store import TaskStore

logger = logging.getLogger(__name__)


class TaskState:
    """One version of a task with its encodings, built lazily and shared by all watchers."""

    __slots__ = ("task", "task_id", "terminal", "_json", "_sse", "_chunk", "_ws")

    def __init__(self, task: Task) -> None:
        self.task = task
        # Read on every delivery: plain attributes, not properties.
        self.task_id = task.task_id
        self.terminal = task.is_terminal
        self._json: dict[bool, bytes] = {}  # the task object, with or without image_base64
        self._sse: dict[bool, bytes] = {}
        self._chunk: dict[bool, bytes] = {}  # the SSE frames as HTTP/1.1 chunks
        self._ws: dict[bool, str] = {}

    @property
    def version(self) -> int:
        return self.task.version

    def _task_json(self, include_image_base64: bool) -> bytes:
        data = self._json.get(include_image_base64)
        if data is None:
            data = self._json[include_image_base64] = self.task.to_json(
                include_image_base64=include_image_base64)
        return data

    def sse_frame(self, include_image_base64: bool) -> bytes:
        frame = self._sse.get(include_image_base64)
        if frame is None:
            frame = self._sse[include_image_base64] = b"id: %d\ndata: %s\n\n" % (
                self.task.version, self._task_json(include_image_base64))
        return frame

    def sse_chunk(self, include_image_base64: bool) -> bytes:
        """The SSE frame as one HTTP/1.1 chunk, for sinks that write to the connection."""
        chunk = self._chunk.get(include_image_base64)
        if chunk is None:
            frame = self.sse_frame(include_image_base64)
            chunk = self._chunk[include_image_base64] = b"%x\r\n%b\r\n" % (len(frame), frame)
        return chunk

    def ws_frame(self, include_image_base64: bool) -> str:
        """ASGI takes WebSocket text frames as str, so this encoding is cached as str."""
        frame = self._ws.get(include_image_base64)
        if frame is None:
            frame = self._ws[include_image_base64] = (
                '{"type":"task","data":' + self._task_json(include_image_base64).decode() + "}")
        return frame


class DirectSink(Protocol):
    def push(self, state: TaskState) -> bool:
        """Write the state to the client now, or return False to leave it to the client's
        task (e.g. bytes are still buffered for a slow client)."""


class Watcher:
    """One client's view: the newest undelivered state per task, and a wake-up event."""

    __slots__ = ("pending", "known", "claimed", "ended", "missing", "closed", "sink", "_loop",
                 "_waiter", "_metrics")

    def __init__(self, metrics: Metrics) -> None:
        self.pending: dict[int, TaskState] = {}
        self.known: dict[int, int] = {}
        # Versions the client says it has (Last-Event-ID) that no state has confirmed yet.
        self.claimed: set[int] = set()
        self.ended: set[int] = set()  # tasks whose terminal state this watcher was given
        self.missing: set[int] = set()
        self.closed = False
        # Set by a transport that can write a state synchronously (sse.py): used only while
        # the client's task waits in next_batch() with nothing pending, so every earlier state
        # is already written and order is kept.
        self.sink: DirectSink | None = None
        # A bare future rather than an asyncio.Event (which carries a deque): this object
        # exists once per connection, and thousands of idle connections add up.
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._metrics = metrics

    def _wake_up(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def claim(self, task_id: int, version: int) -> None:
        """The client already holds `version` (e.g. from Last-Event-ID): start after it."""
        self.known[task_id] = version
        self.claimed.add(task_id)

    def offer(self, state: TaskState) -> None:
        task_id = state.task_id
        known = self.known.get(task_id, 0)
        if state.version <= known:
            if not state.terminal or task_id in self.ended:
                return
            if task_id in self.claimed and state.version == known:
                return  # the client says it holds exactly this end (Last-Event-ID)
            # A terminal state at or below the version known: the client claimed a version the
            # task never reached, or Redis lost its data and the task was re-created, restarting
            # its versions. Either way the end must still arrive.
        self.claimed.discard(task_id)
        self.known[task_id] = state.version
        if state.terminal:
            self.ended.add(task_id)
        elif (self.sink is not None and self._waiter is not None and not self.pending
              and self.sink.push(state)):
            return  # written: the client's task sleeps on (one wake-up and write saved)
        if task_id in self.pending:
            self._metrics.conflated.inc()
        self.pending[task_id] = state
        self._wake_up()

    def offer_missing(self, task_id: int) -> None:
        self.missing.add(task_id)
        self._wake_up()

    def forget(self, task_id: int) -> None:
        self.pending.pop(task_id, None)
        self.known.pop(task_id, None)
        self.claimed.discard(task_id)
        self.ended.discard(task_id)
        self.missing.discard(task_id)

    def poke(self) -> None:
        """Wake the sender for something other than a task state (a control frame)."""
        self._wake_up()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            logger.debug("watcher closed: %s", reason)
            self._wake_up()

    async def next_batch(self) -> list[TaskState]:
        """The pending states in arrival order; [] when woken by poke() or close().

        No timer per wait: keep-alives come from one process-wide ticker that pokes idle
        watchers (streams.py), so an idle client costs no timer at all.
        """
        if not self.pending and not self.closed and not self.missing:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self.pending:
            return []
        batch = list(self.pending.values())
        self.pending.clear()
        return batch


class _Topic:
    __slots__ = ("watchers", "state")

    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()
        self.state: TaskState | None = None


class Hub:
    REFRESH_BATCH = 100

    def __init__(
        self,
        broker: Broker,
        store: TaskStore,
        metrics: Metrics,
        *,
        resync_interval_s: float = 5.0,
    ) -> None:
        self.broker = broker
        self.store = store
        self.metrics = metrics
        self.resync_interval_s = resync_interval_s
        self._topics: dict[int, _Topic] = {}
        self._dirty: set[int] = set()
        self._dirty_event = asyncio.Event()
        self._lookups: dict[int, asyncio.Future[Task | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.broker.start(self)
        self._tasks = [
            asyncio.create_task(self._refresher(), name="taskcast-refresher"),
            asyncio.create_task(self._periodic_resync(), name="taskcast-resync"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.close()

    # -- watchers -----------------------------------------------------------------------------

    def watch(self, watcher: Watcher, task_id: int, current: Task | None = None) -> None:
        """Follow a task. `current` is a state the caller just read (e.g. from lookup): it is
        offered at once instead of after the subscription's confirmation and re-read."""
        topic = self._topics.get(task_id)
        if topic is None:
            topic = self._topics[task_id] = _Topic()
            self.broker.subscribe(task_id)
            self._update_gauges()
        topic.watchers.add(watcher)
        if current is not None:
            self.accept(current)
        if topic.state is not None:
            watcher.offer(topic.state)

    def unwatch(self, watcher: Watcher, task_ids: Iterable[int]) -> None:
        for task_id in task_ids:
            topic = self._topics.get(task_id)
            if topic is None:
                continue
            topic.watchers.discard(watcher)
            if not topic.watchers:
                del self._topics[task_id]
                self.broker.unsubscribe(task_id)
        self._update_gauges()

    def holds_terminal(self, watcher: Watcher, task_id: int) -> bool:
        """Whether the watcher already has the terminal state the hub knows for the task."""
        topic = self._topics.get(task_id)
        state = topic.state if topic is not None else None
        return (state is not None and state.terminal
                and state.version <= watcher.known.get(task_id, 0) and task_id not in
                watcher.pending)

    async def lookup(self, task_id: int) -> Task | None:
        """The newest state known: from the hub when the task is watched, else from Redis.

        Concurrent lookups of one task share one read. Raises StoreUnavailable.
        """
        topic = self._topics.get(task_id)
        if topic is not None and topic.state is not None:
            return topic.state.task
        pending = self._lookups.get(task_id)
        if pending is None:
            pending = asyncio.ensure_future(self._read(task_id))
            self._lookups[task_id] = pending
            pending.add_done_callback(lambda done: self._lookup_done(task_id, done))
        return await asyncio.shield(pending)

    async def _read(self, task_id: int) -> Task | None:
        task = await self.store.get(task_id)
        if task is not None:
            self.accept(task)
        return task

    def _lookup_done(self, task_id: int, done: asyncio.Future[Task | None]) -> None:
        self._lookups.pop(task_id, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so a lookup nobody awaits any more logs nothing

    # -- what the broker tells us ---------------------------------------------------------

    def on_message(self, task_id: int, payload: bytes) -> None:
        self.metrics.events_received.inc()
        try:
            task = Task.from_json(payload)
        except (ValueError, KeyError, TypeError) as exc:
            # A producer that publishes garbage must not break the stream: re-read the truth.
            self.metrics.events_malformed.inc()
            logger.warning("malformed event on task %d (%s); re-reading its record", task_id, exc)
            self.mark_dirty([task_id], "malformed")
            return
        if task.task_id != task_id:
            self.metrics.events_malformed.inc()
            self.mark_dirty([task_id], "malformed")
            return
        self.accept(task)

    def on_subscribed(self, task_id: int) -> None:
        self.mark_dirty([task_id], "subscribed")

    def on_connection_lost(self) -> None:
        self.metrics.redis_reconnects.inc()

    # -- state ------------------------------------------------------------------------------

    def accept(self, task: Task) -> None:
        topic = self._topics.get(task.task_id)
        if topic is None:
            return
        current = topic.state
        if current is not None and task.version <= current.version:
            # Versions only restart when Redis lost the record and it was re-created; then a
            # terminal state must not be held back behind the lost, higher-numbered progress.
            if not (task.is_terminal and not current.terminal):
                return
        state = topic.state = TaskState(task)
        for watcher in topic.watchers:
            watcher.offer(state)

    def mark_dirty(self, task_ids: Iterable[int], reason: str) -> None:
        before = len(self._dirty)
        self._dirty.update(task_id for task_id in task_ids if task_id in self._topics)
        if len(self._dirty) > before:
            self.metrics.resyncs.labels(reason).inc(len(self._dirty) - before)
            self._dirty_event.set()

    async def _refresher(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            while self._dirty:
                batch = [self._dirty.pop() for _ in range(min(self.REFRESH_BATCH,
                                                               len(self._dirty)))]
                try:
                    await self._refresh(batch)
                except StoreUnavailable as exc:
                    logger.debug("resync postponed: %s", exc)
                    self._dirty.update(batch)
                    await asyncio.sleep(0.5)
                    continue
                await asyncio.sleep(0)  # let deliveries through between batches

    async def _refresh(self, task_ids: list[int]) -> None:
        """Re-read the records that may have changed: versions first (a few bytes each),
        then whole records only where the version is new, unreadable or gone."""
        stale = []
        for task_id, seen in (await self.store.versions(task_ids)).items():
            topic = self._topics.get(task_id)
            if topic is None:
                continue
            state = topic.state
            if seen is None or state is None or seen[0] == -1 or seen[0] > state.version:
                stale.append(task_id)
            elif seen[1] and not state.terminal:
                stale.append(task_id)  # finished at a version already seen: see accept()
        if not stale:
            return
        found = await self.store.get_many(stale)
        for task_id, task in found.items():
            if task is not None:
                self.accept(task)
            elif task_id in self._topics:
                for watcher in list(self._topics[task_id].watchers):
                    watcher.offer_missing(task_id)

    async def _periodic_resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval_s)
            unfinished = [
                task_id
                for task_id, topic in self._topics.items()
                if topic.state is None or not topic.state.terminal
            ]
            self.mark_dirty(unfinished, "periodic")

    def _update_gauges(self) -> None:
        self.metrics.watched_tasks.set(len(self._topics))
        self.metrics.subscriptions.set(self.broker.subscription_count)
