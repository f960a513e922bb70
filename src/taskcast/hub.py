"""The fan-out core: one subscription per process, many watchers, and the delivery guarantee.

The hub knows neither Redis nor HTTP. Task events come from a `Broker`, records from a
`TaskReader` (both Protocols below; Redis, Redis Cluster and an in-memory pair implement
them), and states go to `Watcher`s, the mailboxes of the delivery layer (delivery.py).

Delivery guarantee (contract section 4). The record is the truth; pub/sub events are hints
that carry a whole new state with its `version`. For every task a watcher follows, the hub
offers it the current state first and then only strictly newer versions, and the terminal state
is never lost. How:

* Subscribe first, read second. A task's channel is subscribed when its first local watcher
  arrives; every subscription confirmation (the first one, and the ones a broker reports after
  it reconnected) marks the task dirty, and the refresher then re-reads its record. Whatever
  order events and reads arrive in, only versions above the last one known are passed on, so
  the result is the same: no duplicates, no regressions.
* Pub/sub is at most once: Redis drops slow subscribers, outages lose messages, and a producer
  may publish while we are disconnected. So the broker reconnects with backoff, and every
  watched task that is not finished is also re-read every `resync_interval_s`: a lost last
  event is delivered at the latest then.
* Each state is decoded once per process and encoded once per output format
  (TaskState.encoded), and every watcher of the task shares those bytes.
* Each watcher has one pending slot per task. A newer state replaces an older one that the
  client has not taken yet (conflation, counted); since the terminal state is the last version
  of a task, nothing can replace it, so it is never dropped. A watcher's memory is therefore
  bounded by the number of tasks it watches, however slow its client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, TypeVar

from taskcast.aio import cancel_and_wait
from taskcast.caps import INLINE_IMAGE_BASE64_BYTES
from taskcast.errors import CorruptRecord, StoreUnavailable
from taskcast.metrics import Metrics
from taskcast.models import Task, TaskStatus

logger = logging.getLogger(__name__)
_NO_TASKS: frozenset[int] = frozenset()


# -- what the hub needs from the outside ------------------------------------------------------


class BrokerListener(Protocol):
    """What a broker reports. Calls come from the event loop (the broker's tasks or
    callbacks), one at a time and never from inside a Broker method the hub called; a listener
    must not block or raise."""

    def on_message(self, task_id: int, payload: bytes) -> None:
        """A message on a task's channel: the task object JSON, or garbage. Any message may
        be missing, and order is not promised: the hub goes by `version`."""

    def on_subscribed(self, task_id: int) -> None:
        """A subscription is (again) active: messages sent before may have been missed."""

    def on_connection_lost(self) -> None:
        """The connection to the broker broke; subscriptions come back with on_subscribed."""


class Broker(Protocol):
    """Task channels, subscribed on demand. Delivery is at most once: messages may be lost,
    but a broker reports every (re)subscription, after which the hub re-reads the record.
    A broker reconnects by itself, for as long as it runs; its methods never block, never
    wait for Redis and never raise because Redis is unreachable."""

    def start(self, listener: BrokerListener) -> None:
        """Begin connecting in the background and report to `listener`; call once."""

    async def close(self) -> None:
        """Stop for good: no listener call follows, and the connections are closed."""

    def subscribe(self, task_id: int) -> None:
        """Start following the channel (asynchronously; on_subscribed confirms). The
        subscription is kept, and confirmed again after every reconnect, until unsubscribe."""

    def unsubscribe(self, task_id: int) -> None:
        """Stop following the channel; a message already on its way may still be reported."""

    @property
    def subscription_count(self) -> int:
        """Channels wanted (subscribed, or to be once the connection allows): a gauge."""

    @property
    def connected(self) -> bool:
        """Whether the connection(s) to the broker are up right now (for /readyz)."""


class TaskReader(Protocol):
    """Reads task records. Every method raises StoreUnavailable when the store does not answer."""

    async def get(self, task_id: int) -> Task | None:
        """The current task, or None when it has no record; raises CorruptRecord for a
        record that breaks the contract."""

    async def get_many(self, task_ids: list[int]) -> dict[int, Task | None]:
        """Several records; a record that breaks the contract is left out of the result."""

    async def versions(self, task_ids: list[int]) -> dict[int, tuple[int, bool] | None]:
        """(version, finished) per record, None without a record, version -1 if unreadable."""

    async def find_many(self, task_ids: list[int]) -> dict[int, Task | CorruptRecord | None]:
        """Which tasks exist, in one read without image bytes: the task (its image left out),
        None without a record, or the CorruptRecord the record raised."""


# -- one version of a task ----------------------------------------------------------------------


T = TypeVar("T")


class TaskState:
    """One version of a task, shared by every watcher of the task, with its encodings.

    `encoded(encoding)` runs each encoding (a transport's framing, for instance) at most once
    per version and returns the same bytes to every caller.
    """

    __slots__ = ("task", "task_id", "version", "terminal", "_encoded")

    def __init__(self, task: Task) -> None:
        self.task = task
        # Read on every delivery: plain attributes, not properties.
        self.task_id = task.task_id
        self.version = task.version
        self.terminal = task.is_terminal
        self._encoded: dict[object, Any] = {}

    def json(self, include_image_base64: bool, *, keep: bool = True) -> bytes:
        """The task object (contract section 1), with or without `image_base64`. With
        `keep=False`, JSON not made yet is not kept either: for a caller that keeps only its
        own framing of it (each framing is a copy)."""
        data: bytes | None = self._encoded.get(include_image_base64)
        if data is None:
            raw = self.task.to_json(include_image_base64=include_image_base64)
            if not keep:
                return raw
            # A copy of exact size: orjson returns its whole working buffer, at least 4 KiB
            # and ~10x the text for a large image (libraries.md), which a state kept for
            # every watched or polled task would otherwise hold.
            data = self._encoded[include_image_base64] = bytes(memoryview(raw))
        return data

    def encoded(self, encoding: Callable[[TaskState], T]) -> T:
        """encoding(self), computed once per version (encodings are told apart by identity)."""
        data: T | None = self._encoded.get(encoding)
        if data is None:
            data = self._encoded[encoding] = encoding(self)
        return data


# -- a client's mailbox -------------------------------------------------------------------------


class Watcher:
    """A client's mailbox at the hub: the newest undelivered state per task.

    Promises to its consumer: `take()` returns states in the order their tasks became pending
    (a newer state takes the place of the one it replaces), at most one per task, each newer
    than every state of that task taken before (the one exception is a terminal state after
    Redis lost a record and versions restarted: the end always arrives), and never anything
    for a task after its terminal state, not even a vanished record. `on_ready` is called
    whenever the mailbox goes from empty to holding something (a state or a vanished task), so
    the consumer can write at once or wake whoever writes.

    `take_now`, if given, is offered a new state first whenever the mailbox is empty: if it
    returns True it has taken the state (written it, typically), and the state never enters
    the mailbox. Since it only ever sees states when nothing is pending, nothing it takes can
    overtake a state still in the mailbox.
    """

    __slots__ = ("_pending", "_known", "_claimed", "_ended", "_missing", "_on_ready",
                 "_take_now", "_metrics")

    def __init__(self, metrics: Metrics, on_ready: Callable[[], None],
                 take_now: Callable[[TaskState], bool] | None = None) -> None:
        self._pending: dict[int, TaskState] = {}
        self._known: dict[int, int] = {}
        # Three sets that most mailboxes never need (an empty set is 216 bytes, and there is
        # a mailbox per connection): None until the first member.
        # Versions the client says it has (Last-Event-ID) that no state has confirmed yet.
        self._claimed: set[int] | None = None
        self._ended: set[int] | None = None  # tasks whose terminal state this mailbox was given
        self._missing: set[int] | None = None
        self._on_ready: Callable[[], None] | None = on_ready
        self._take_now = take_now
        self._metrics = metrics

    # -- the hub's side

    def offer(self, state: TaskState) -> None:
        """A state from the hub. Kept only if it is newer than what this mailbox has given
        for the task, or a terminal state that must still arrive (see the class docstring); it
        replaces a pending state of the task in place (counted as conflated). Never blocks."""
        task_id = state.task_id
        ended = self._ended
        if ended is not None and task_id in ended:
            return  # nothing follows the end, even a "newer" state a careless producer wrote
        claimed = self._claimed
        known = self._known.get(task_id, -1)  # a record without `version` has version 0
        if state.version <= known:
            if not state.terminal:
                return
            if claimed is not None and task_id in claimed and state.version == known:
                return  # the client says it holds exactly this end (Last-Event-ID)
            # A terminal state at or below the version known: the client claimed a version the
            # task never reached, or Redis lost its data and the task was re-created, restarting
            # its versions. Either way the end must still arrive.
        if claimed is not None:
            claimed.discard(task_id)
        self._known[task_id] = state.version
        if state.terminal:
            if ended is None:
                ended = self._ended = set()
            ended.add(task_id)
        pending = self._pending
        if pending or self._missing:  # the consumer knows already
            if task_id in pending:
                self._metrics.conflated.inc()  # the newer state takes the older one's place
            pending[task_id] = state
            return
        take_now = self._take_now
        if take_now is not None and take_now(state):
            return
        pending[task_id] = state
        if self._on_ready is not None:
            self._on_ready()

    def offer_missing(self, task_id: int) -> None:
        """The task's record is gone (expired, or never existed); ignored once it has ended."""
        if self._ended is not None and task_id in self._ended:
            return
        was_empty = not self._pending and not self._missing
        if self._missing is None:
            self._missing = set()
        self._missing.add(task_id)
        if was_empty and self._on_ready is not None:
            self._on_ready()

    def holds(self, state: TaskState) -> bool:
        """Whether this mailbox already got `state` or a newer version of its task."""
        return (state.version <= self._known.get(state.task_id, -1)
                and state.task_id not in self._pending)

    # -- the consumer's side

    @property
    def ready(self) -> bool:
        """Whether take() or take_missing() has something."""
        return bool(self._pending or self._missing)

    @property
    def has_claims(self) -> bool:
        """Whether a claimed version (claim) has not yet been confirmed by a state."""
        return bool(self._claimed)

    def claim(self, task_id: int, version: int) -> None:
        """The client already holds `version` (e.g. from Last-Event-ID): start after it."""
        self._known[task_id] = version
        if self._claimed is None:
            self._claimed = set()
        self._claimed.add(task_id)

    def take(self) -> list[TaskState]:
        """The pending states in arrival order; the mailbox is empty of states afterwards."""
        if not self._pending:
            return []
        batch = list(self._pending.values())
        self._pending.clear()
        return batch

    def take_missing(self) -> AbstractSet[int]:
        """Tasks whose record vanished since the last call (a set the caller may keep)."""
        missing = self._missing
        if not missing:
            return _NO_TASKS
        self._missing = None
        return missing

    def forget(self, task_id: int) -> None:
        """Drop everything about the task: following it again starts from its current state."""
        self._pending.pop(task_id, None)
        self._known.pop(task_id, None)
        for members in (self._claimed, self._ended, self._missing):
            if members is not None:
                members.discard(task_id)

    def close(self) -> None:
        """No more wake-ups (and no reference to the consumer left behind)."""
        self._on_ready = None
        self._take_now = None


# -- the hub --------------------------------------------------------------------------------


class Retainer(Protocol):
    """Who keeps a task followed without a mailbox (the REST poll cache, poll_cache.py)."""

    def on_state(self, state: TaskState) -> None:
        """A newer state of a retained task is now the hub's (for its memory accounting)."""


class _Topic:
    __slots__ = ("watchers", "state", "retainer")

    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()
        self.state: TaskState | None = None
        self.retainer: Retainer | None = None


class Hub:
    """Watchers per task, one broker subscription per watched task, and the newest state.

    Promises: every watcher of a task is offered the newest state the hub knows when it starts
    watching (if any), then every newer state the hub learns of, from events or re-reads; a task
    whose record disappears is reported with offer_missing. Subscriptions are released when the
    last watcher of a task leaves.
    """

    REFRESH_BATCH = 100
    RETRY_DELAY_S = 0.5  # after a failed re-read

    def __init__(
        self,
        broker: Broker,
        store: TaskReader,
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
        """Start the broker, the refresher and the periodic resync; once, on the running loop."""
        self.broker.start(self)
        self._tasks = [
            asyncio.create_task(self._refresher(), name="taskcast-refresher"),
            asyncio.create_task(self._periodic_resync(), name="taskcast-resync"),
        ]

    async def close(self) -> None:
        """Stop re-reading and close the broker: no event or re-read reaches a watcher after
        this (lookup still reads the store). Watchers are not told."""
        for task in self._tasks:
            await cancel_and_wait(task)
        await self.broker.close()

    # -- watchers -----------------------------------------------------------------------------

    def watch(self, watcher: Watcher, task_id: int, current: Task | None = None) -> None:
        """Follow a task. `current` is a state the caller just read (e.g. from lookup): it is
        offered at once instead of after the subscription's confirmation and re-read."""
        topic = self._follow(task_id)
        topic.watchers.add(watcher)
        if current is not None:
            self.accept(current)
        # The watcher may have taken a terminal state from accept() and left already.
        if topic.state is not None and watcher in topic.watchers:
            watcher.offer(topic.state)

    def unwatch(self, watcher: Watcher, task_ids: Iterable[int]) -> None:
        """Offer the watcher nothing more of these tasks (ids it does not watch are ignored);
        a task's last watcher leaving releases its subscription. The mailbox keeps what it
        holds: Watcher.forget clears that."""
        changed = False
        for task_id in task_ids:
            topic = self._topics.get(task_id)
            if topic is None:
                continue
            topic.watchers.discard(watcher)
            changed = self._drop_if_unfollowed(task_id, topic) or changed
        if changed:
            self._update_gauges()

    def retain(self, task_id: int, retainer: Retainer) -> None:
        """Follow a task without a watcher: subscribed, re-read and kept current like a
        watched one (state_of), until release(). One retainer per task."""
        self._follow(task_id).retainer = retainer

    def release(self, task_id: int) -> None:
        """End retain(); the subscription goes when no watcher is left either."""
        topic = self._topics.get(task_id)
        if topic is None:
            return
        topic.retainer = None
        if self._drop_if_unfollowed(task_id, topic):
            self._update_gauges()

    def _follow(self, task_id: int) -> _Topic:
        """The task's topic, made and subscribed if the task was not followed."""
        topic = self._topics.get(task_id)
        if topic is None:
            topic = self._topics[task_id] = _Topic()
            self.broker.subscribe(task_id)
            self._update_gauges()
        return topic

    def _drop_if_unfollowed(self, task_id: int, topic: _Topic) -> bool:
        """Drop the topic and its subscription when neither a watcher nor a retainer is
        left; whether it went (the caller updates the gauges)."""
        if topic.watchers or topic.retainer is not None:
            return False
        del self._topics[task_id]
        self.broker.unsubscribe(task_id)
        return True

    def state_of(self, task_id: int) -> TaskState | None:
        """The newest state of a followed task, which every watcher has been offered or
        holds; None when the task is not followed or its state is unknown or gone."""
        topic = self._topics.get(task_id)
        return topic.state if topic is not None else None

    def holds_terminal(self, watcher: Watcher, task_id: int) -> bool:
        """Whether the watcher already holds the terminal state the hub knows for the task."""
        topic = self._topics.get(task_id)
        state = topic.state if topic is not None else None
        return state is not None and state.terminal and watcher.holds(state)

    async def lookup(self, task_id: int) -> Task | None:
        """The newest state known: from the hub when the task is watched, else from the store.

        Concurrent lookups of one task share one read. Raises StoreUnavailable, or
        CorruptRecord for a record that breaks the contract.
        """
        topic = self._topics.get(task_id)
        if topic is not None and topic.state is not None:
            return topic.state.task
        return await self.read(task_id)

    async def read(self, task_id: int, *, join: bool = True) -> Task | None:
        """The record as the store has it now, also when the hub knows a state (whose
        freshness hangs on the broker); a followed task's state is updated from it.

        Concurrent reads of one task share one store read; `join=False` reads on its own
        (a read that began before the caller's own write would miss it). Raises
        StoreUnavailable, or CorruptRecord for a record that breaks the contract.
        """
        if not join:
            return await self._read(task_id)
        pending = self._lookups.get(task_id)
        if pending is None:
            pending = asyncio.ensure_future(self._read(task_id))
            self._lookups[task_id] = pending
            pending.add_done_callback(functools.partial(self._lookup_done, task_id))
        return await asyncio.shield(pending)

    async def find_many(self, task_ids: Sequence[int]
                        ) -> dict[int, Task | CorruptRecord | None]:
        """The current state of each task, for subscribing: the newest state the hub knows
        for a watched task; for the others, existence first, in one pipelined read without
        image bytes, then a whole read (lookup) of only the completed ones, whose image is
        their state. None for a task without a record; CorruptRecord for a broken one.
        Raises StoreUnavailable: never a wrong "not found" (contract 8)."""
        found: dict[int, Task | CorruptRecord | None] = {}
        unknown = []
        for task_id in task_ids:
            topic = self._topics.get(task_id)
            if topic is not None and topic.state is not None:
                found[task_id] = topic.state.task
            else:
                unknown.append(task_id)
        if not unknown:
            return found
        read = await self.store.find_many(unknown)
        found.update(read)
        completed = [task_id for task_id, task in read.items()
                     if isinstance(task, Task) and task.status is TaskStatus.COMPLETED]
        if completed:
            whole = await asyncio.gather(*(self.lookup(task_id) for task_id in completed),
                                         return_exceptions=True)
            for task_id, result in zip(completed, whole, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, CorruptRecord):
                    raise result  # StoreUnavailable among them: never a wrong answer
                found[task_id] = result
        return found

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
        """BrokerListener: a valid event goes to accept(); garbage, or an event about another
        task, is counted as malformed and makes the hub re-read the record instead."""
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
        if task.image_omitted:
            # The event left a large image out (contract 3): read it from the record, once
            # for every watcher in this process.
            self.mark_dirty([task_id], "image")
            return
        self.accept(task)

    def on_subscribed(self, task_id: int) -> None:
        """BrokerListener: events may have been missed before this, so re-read the record."""
        self.mark_dirty([task_id], "subscribed")

    def on_connection_lost(self) -> None:
        """BrokerListener: only counted; the re-reads follow the re-subscriptions."""
        self.metrics.redis_reconnects.inc()

    # -- state ------------------------------------------------------------------------------

    def accept(self, task: Task) -> None:
        """A state read or received: offered to the task's watchers if it is news."""
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
        if topic.retainer is not None:
            topic.retainer.on_state(state)
        # A snapshot: a watcher that writes at once may end its client and leave the topic.
        for watcher in tuple(topic.watchers):
            watcher.offer(state)

    def mark_dirty(self, task_ids: Iterable[int], reason: str) -> None:
        """Queue the watched ones of these tasks for a re-read by the refresher, which retries
        until the store answers; unwatched ids are ignored. Never blocks. `reason` is the
        label of taskcast_resyncs."""
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
                    await asyncio.sleep(self.RETRY_DELAY_S)
                    continue
                except Exception:
                    # A bug must not end every resync of the process for good.
                    logger.exception("resync of %d tasks failed; retrying", len(batch))
                    self._dirty.update(batch)
                    await asyncio.sleep(self.RETRY_DELAY_S)
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
            topic = self._topics.get(task_id)
            if task is not None:
                self.accept(task)
                if len(task.image_base64) > INLINE_IMAGE_BASE64_BYTES:
                    # Its frames (megabytes each) were just encoded and written: let the
                    # rest of the process run before the next, or a burst of completions
                    # with large images freezes the loop for seconds.
                    await asyncio.sleep(0)
            elif topic is not None:
                topic.state = None  # gone: a lookup must read the store, not this
                for watcher in tuple(topic.watchers):
                    watcher.offer_missing(task_id)

    async def _periodic_resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval_s)
            # A polled (retained) task is re-read even when finished: its record expires
            # after the retention, and polls must then say 404 (contract 3).
            due = [
                task_id
                for task_id, topic in self._topics.items()
                if topic.state is None or not topic.state.terminal
                or topic.retainer is not None
            ]
            self.mark_dirty(due, "periodic")

    def _update_gauges(self) -> None:
        self.metrics.watched_tasks.set(len(self._topics))
        self.metrics.subscriptions.set(self.broker.subscription_count)
