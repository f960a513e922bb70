"""An in-memory broker and record store behind the hub's Protocols, with faults on demand.

`MemoryTasks` holds task records and their channels in one process. It behaves like Redis
pub/sub as the hub sees it: subscriptions are confirmed asynchronously, messages arrive from
the event loop (never inside the publisher's call), and delivery is at most once. Tests make it
misbehave on purpose: drop messages, lose the connection (every channel is re-subscribed and
confirmed again, as redis-py does after a silent reconnect), or refuse reads as an unreachable
store would. It exists so that the delivery guarantee can be checked in milliseconds
(tests/test_hub.py); the gateway's `memory://` mode uses fakeredis instead, which runs the
real update script.
"""

from __future__ import annotations

import asyncio
import dataclasses

from taskcast.errors import CorruptRecord, StoreUnavailable
from taskcast.hub import BrokerListener
from taskcast.models import Task


class MemoryBroker:
    """hub.Broker over MemoryTasks' channels: a subscription is confirmed, and a message
    delivered, in a later callback of the event loop, in publishing order; a message
    published while `drop_messages` is set is lost. Its methods never block or raise."""

    def __init__(self, tasks: MemoryTasks) -> None:
        self._tasks = tasks
        self._listener: BrokerListener | None = None
        self.subscribed: set[int] = set()

    @property
    def subscription_count(self) -> int:
        """Tasks subscribed."""
        return len(self.subscribed)

    @property
    def connected(self) -> bool:
        """Always: this broker has no connection to lose."""
        return True

    def start(self, listener: BrokerListener) -> None:
        """Report to `listener` from now on."""
        self._listener = listener

    async def close(self) -> None:
        """Forget the listener and every subscription: nothing is reported after this."""
        self._listener = None
        self.subscribed.clear()  # as a closed Redis connection forgets its subscriptions

    def subscribe(self, task_id: int) -> None:
        """Deliver the task's messages from now on; on_subscribed follows in a callback."""
        self.subscribed.add(task_id)
        asyncio.get_running_loop().call_soon(self._confirm, task_id)

    def unsubscribe(self, task_id: int) -> None:
        """No more messages or confirmations for the task, even ones already scheduled."""
        self.subscribed.discard(task_id)

    def _confirm(self, task_id: int) -> None:
        if self._listener is not None and task_id in self.subscribed:
            self._listener.on_subscribed(task_id)

    def _deliver(self, task_id: int, payload: bytes) -> None:
        if self._listener is not None and task_id in self.subscribed:
            self._listener.on_message(task_id, payload)

    def lose_connection(self) -> None:
        """What a reconnect looks like: the loss, then every channel confirmed again."""
        if self._listener is None:
            return
        self._listener.on_connection_lost()
        loop = asyncio.get_running_loop()
        for task_id in sorted(self.subscribed):
            loop.call_soon(self._confirm, task_id)


class MemoryReader:
    """hub.TaskReader over MemoryTasks' records."""

    def __init__(self, tasks: MemoryTasks) -> None:
        self._tasks = tasks
        self.reads = 0

    def _check(self) -> None:
        self.reads += 1
        if self._tasks.unreachable:
            raise StoreUnavailable("memory store set unreachable")

    async def get(self, task_id: int) -> Task | None:
        """hub.TaskReader.get; raises StoreUnavailable while `unreachable` is set."""
        await asyncio.sleep(0)  # a read takes a turn of the loop, as a round trip would
        self._check()
        return self._tasks.records.get(task_id)

    async def get_many(self, task_ids: list[int]) -> dict[int, Task | None]:
        """hub.TaskReader.get_many; raises StoreUnavailable while `unreachable` is set."""
        await asyncio.sleep(0)
        self._check()
        return {task_id: self._tasks.records.get(task_id) for task_id in task_ids}

    async def versions(self, task_ids: list[int]) -> dict[int, tuple[int, bool] | None]:
        """hub.TaskReader.versions; raises StoreUnavailable while `unreachable` is set."""
        await asyncio.sleep(0)
        self._check()
        found: dict[int, tuple[int, bool] | None] = {}
        for task_id in task_ids:
            task = self._tasks.records.get(task_id)
            found[task_id] = None if task is None else (task.version, task.is_terminal)
        return found

    async def find_many(self, task_ids: list[int]) -> dict[int, Task | CorruptRecord | None]:
        """hub.TaskReader.find_many; raises StoreUnavailable while `unreachable` is set."""
        await asyncio.sleep(0)
        self._check()
        return {task_id: (task.without_image_base64() if task is not None else None)
                for task_id in task_ids
                for task in [self._tasks.records.get(task_id)]}


class MemoryTasks:
    """Records and channels. `write` stores a state and publishes it, like the update script."""

    def __init__(self) -> None:
        self.records: dict[int, Task] = {}
        self.broker = MemoryBroker(self)
        self.reader = MemoryReader(self)
        self.drop_messages = False  # pub/sub loses what is published while set
        self.unreachable = False  # reads raise StoreUnavailable while set

    def write(self, task: Task, *, publish: bool = True) -> Task:
        """Store `task` as it is (no rules, no version bump) and, unless `publish` is False
        or messages are being dropped, publish it; returns it."""
        self.records[task.task_id] = task
        if publish and not self.drop_messages:
            payload = task.to_json()
            asyncio.get_running_loop().call_soon(self.broker._deliver, task.task_id, payload)
        return task

    def publish_raw(self, task_id: int, payload: bytes) -> None:
        """A message as a careless producer might send it (garbage, or another task's)."""
        asyncio.get_running_loop().call_soon(self.broker._deliver, task_id, payload)

    def advance(self, task_id: int, **changes: object) -> Task:
        """The stored task with `changes` and the next version, written and published."""
        current = self.records[task_id]
        task = dataclasses.replace(current, version=current.version + 1, **changes)  # type: ignore[arg-type]
        return self.write(task)

    def delete(self, task_id: int) -> None:
        """The record vanishes (expiry, or Redis lost its data)."""
        self.records.pop(task_id, None)
