"""Polled tasks served from memory: a soft watch per polled task, bounded and least recently
polled out first.

A REST read of a task makes the hub follow it (Hub.retain) for `watch_s` after the last poll:
subscribed to its channel and re-read like any watched task, so the hub's delivery guarantee
keeps its state current. Polls within that time are answered from the hub's state, whose
encodings (the 200 body per `image_base64` choice) are made once per version and shared.

Never staler than the streams: a hit returns the hub's newest state, which is also the newest
any SSE or WebSocket client of this process was offered. While the pub/sub connection is down
nothing keeps that state current, so every poll then reads Redis (a miss) until it is back.

Misses (a first poll, an unknown id, a gone record, pub/sub down) read Redis through
Hub.read, where concurrent reads of one id share one. Nothing is remembered of an id without
a record: a task created after a 404 is found by the next poll (no negative cache).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskcast.aio import cancel_and_wait
from taskcast.hub import Hub, TaskState

# What one soft watch costs besides its image: the hub's topic and subscription, the decoded
# task, its encoded 200 answer and this entry. Measured with tracemalloc: 1.8 KiB per task over
# 200 tasks (tests/test_poll_cache.py checks the charge covers it), 1.9 KiB over 5,000
# (bench/poll_memory.py); the charge leaves room for what the allocator and dict growth add.
ENTRY_OVERHEAD_BYTES = 2560


def state_bytes(state: TaskState) -> int:
    """The memory a polled state is charged: the overhead, and its image twice (the decoded
    task holds it, and so does the encoded 200 body that includes it)."""
    return ENTRY_OVERHEAD_BYTES + 2 * len(state.task.image_base64)


class _Polled:
    __slots__ = ("last_polled", "size")

    def __init__(self, now: float) -> None:
        self.last_polled = now
        self.size = ENTRY_OVERHEAD_BYTES


class PollCache:
    """Soft watches of polled tasks: at most `max_tasks` of them and `max_bytes` charged
    (state_bytes); beyond either, the least recently polled is released. A soft watch not
    polled for `watch_s` seconds is released by a sweep (at most a second late)."""

    def __init__(self, hub: Hub, *, watch_s: float, max_tasks: int, max_bytes: int) -> None:
        self.hub = hub
        self.watch_s = watch_s
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Polled] = OrderedDict()  # least recently polled first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = {"expired": 0, "tasks": 0, "bytes": 0}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        """Start the expiry sweep; once, on the running loop."""
        self._sweeper = asyncio.create_task(self._sweep(), name="taskcast-poll-cache")

    async def close(self) -> None:
        """Stop the sweep and release every soft watch."""
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
        for task_id in list(self._entries):
            self._release(task_id)

    def cached(self, task_id: int) -> TaskState | None:
        """The state to answer a poll with from memory, or None for a miss (then call read).
        A hit counts as a poll: the soft watch is extended."""
        entry = self._entries.get(task_id)
        if entry is None or not self.hub.broker.connected:
            return None
        state = self.hub.state_of(task_id)
        if state is None:
            return None
        entry.last_polled = time.monotonic()
        self._entries.move_to_end(task_id)
        self.hits += 1
        return state

    async def read(self, task_id: int, *, fresh: bool = False) -> TaskState | None:
        """A miss: join the task to the hub (subscribe first, read second, so no change
        after the read is missed), read Redis, and answer with the hub's newest state.
        Concurrent misses of one id share one read, except `fresh` ones, which read after
        they arrived. None when the task has no record (and nothing is kept). Raises
        StoreUnavailable or CorruptRecord like Hub.read."""
        self.misses += 1
        entry = self._entries.get(task_id)
        if entry is None:
            entry = self._entries[task_id] = _Polled(time.monotonic())
            self.bytes += entry.size
            self.hub.retain(task_id, self)
            self._evict_beyond_limits()
        else:
            entry.last_polled = time.monotonic()
            self._entries.move_to_end(task_id)
        try:
            task = await self.hub.read(task_id, join=not fresh)
        except Exception:
            self._release(task_id)
            raise
        if task is None:
            self._release(task_id)  # no soft watch for an id without a record
            return None
        # The hub's state is at least as new as what was read (an event may have come in
        # while reading); it is gone only if this entry was evicted meanwhile.
        return self.hub.state_of(task_id) or TaskState(task)

    def on_state(self, state: TaskState) -> None:
        """hub.Retainer: a new state of a polled task; its size is charged at once, so a
        completion with a large image is counted before anyone polls it."""
        entry = self._entries.get(state.task_id)
        if entry is None:
            return
        size = state_bytes(state)
        self.bytes += size - entry.size
        entry.size = size
        if self.bytes > self.max_bytes:
            self._evict_beyond_limits()

    def _evict_beyond_limits(self) -> None:
        # Strictly least recently polled first: a task whose state alone is over max_bytes
        # goes too, and is then read from Redis on every poll.
        entries = self._entries
        while entries and (len(entries) > self.max_tasks or self.bytes > self.max_bytes):
            self.evicted["tasks" if len(entries) > self.max_tasks else "bytes"] += 1
            self._release(next(iter(entries)))

    def _release(self, task_id: int) -> None:
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self.bytes -= entry.size
            self.hub.release(task_id)

    def expire(self) -> None:
        """Release the soft watches not polled for `watch_s`."""
        deadline = time.monotonic() - self.watch_s
        expired = 0
        entries = self._entries
        while entries:
            task_id, entry = next(iter(entries.items()))
            if entry.last_polled > deadline:
                break
            self._release(task_id)
            expired += 1
        self.evicted["expired"] += expired

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.watch_s / 4))
            self.expire()


class PollCacheCollector(Collector):
    """The poll cache in /metrics, read when scraped (the counters are plain ints: they are
    counted on every poll)."""

    def __init__(self, cache: PollCache) -> None:
        self.cache = cache

    def collect(self) -> Iterable[Metric]:
        """Collector: requests by result, evictions by reason, size and limits."""
        cache = self.cache
        requests = CounterMetricFamily("taskcast_poll_cache_requests",
                                       "REST polls of a task, answered from memory (hit) or "
                                       "by reading Redis (miss)", labels=["result"])
        requests.add_metric(["hit"], cache.hits)
        requests.add_metric(["miss"], cache.misses)
        yield requests
        evictions = CounterMetricFamily("taskcast_poll_cache_evictions",
                                        "Soft watches released: not polled for the watch time "
                                        "(expired), or the least recently polled one beyond "
                                        "the task or byte limit", labels=["reason"])
        for reason, count in cache.evicted.items():
            evictions.add_metric([reason], count)
        yield evictions
        yield GaugeMetricFamily("taskcast_poll_cache_tasks", "Polled tasks held in memory",
                                value=len(cache))
        yield GaugeMetricFamily("taskcast_poll_cache_bytes",
                                "Bytes charged to the polled tasks held in memory",
                                value=cache.bytes)
        yield GaugeMetricFamily("taskcast_poll_cache_limit_tasks",
                                "Most polled tasks held in memory", value=cache.max_tasks)
        yield GaugeMetricFamily("taskcast_poll_cache_limit_bytes",
                                "Most bytes charged to polled tasks in memory",
                                value=cache.max_bytes)
