"""The producer library for generation workers: every change goes through the Lua script.

    producer = Producer.from_url("redis://127.0.0.1:6379/0")
    task = await producer.create(type="txt2img", angle="front")
    await producer.progress(task.task_id, 40)
    await producer.complete(task.task_id, image_url="https://cdn/x.png")

`SyncProducer` offers the same calls for code that is not asyncio.
A refused change raises TransitionRejected (or TaskNotFound) and leaves the record untouched.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from taskcast.connection import connect, connect_sync, is_cluster_url
from taskcast.errors import StoreUnavailable, TaskNotFound, TransitionRejected
from taskcast.keys import DEFAULT_PREFIX, TaskKeys
from taskcast.models import RECORD_FIELDS, Task, TaskStatus
from taskcast.script import rejection_from, script_source
from taskcast.store import STORE_ERRORS, TaskStore

DEFAULT_RETENTION_S = 86_400


class _Changes:
    """Builds the JSON change documents the script takes; shared by both producers."""

    def __init__(self, prefix: str, retention_s: int, sharded: bool) -> None:
        self.keys = TaskKeys(prefix)
        self.retention_s = retention_s
        self.publish = "SPUBLISH" if sharded else "PUBLISH"

    def document(self, op: str, task_id: int, fields: dict[str, Any]) -> bytes:
        """The change as JSON; fields set to None are left out (they change nothing)."""
        change = {"op": op, "task_id": str(task_id), "retention_s": self.retention_s,
                  "publish": self.publish}
        change.update({name: value for name, value in fields.items() if value is not None})
        return orjson.dumps(change)

    def script_keys(self, task_id: int) -> list[str]:
        """KEYS of the script call: the task's record, then its channel."""
        return [self.keys.record(task_id), self.keys.channel(task_id)]

    @staticmethod
    def completion(image_url: str | None, image_base64: str | bytes | None) -> dict[str, Any]:
        """The fields of a completion; raw image bytes are base64-encoded, text is not."""
        if isinstance(image_base64, bytes):
            # Raw image bytes are encoded here; already-encoded text is passed as is.
            image_base64 = base64.b64encode(image_base64).decode("ascii")
        return {"status": TaskStatus.COMPLETED.value, "image_url": image_url,
                "image_base64": image_base64}

    @staticmethod
    def failure(error_message: str) -> dict[str, Any]:
        """The fields of a failure; raises ValueError for an empty message."""
        if not error_message:
            raise ValueError("a failed task needs an error_message")
        return {"status": TaskStatus.FAILED.value, "error_message": error_message}


class Producer:
    """Changes tasks through the update script, for asyncio code.

    Each change is one atomic script call, which publishes the new state if it changed
    anything. It returns the task as the script left it, or raises TransitionRejected
    (`reason` as in the contract; nothing written), TaskNotFound, or StoreUnavailable when
    Redis does not answer, in which case the change may or may not have happened. Sending
    the same change again is safe: a change that alters nothing writes and publishes
    nothing and returns the current state (but a create with an explicit id is then
    EXISTS). An error reply that is not a refusal is raised as redis-py's ResponseError.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_s: int = DEFAULT_RETENTION_S,
        sharded: bool = False,
    ) -> None:
        self.redis = redis
        self._changes = _Changes(prefix, retention_s, sharded)
        self._script = redis.register_script(script_source())
        self._script_loaded = False
        self._script_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Producer:
        """A `redis+cluster://` URL publishes with SPUBLISH (sharded) unless told otherwise."""
        options.setdefault("sharded", is_cluster_url(url))
        return cls(connect(url), **options)

    async def close(self) -> None:
        """Close the Redis client, also one the caller passed in."""
        await self.redis.aclose()

    async def create(self, *, task_id: int | None = None, type: str = "", angle: str = "") -> Task:
        """Create a submitted task; without `task_id` the next id is allocated in Redis."""
        if task_id is not None:
            return await self._run("create", task_id, {"type": type, "angle": angle})
        if not self._script_loaded:
            await self._load_script()
        try:
            task_id = int(await self.redis.incr(self._changes.keys.id_counter))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"allocating a task id failed: {exc}") from exc
        try:
            return await self._run("create", task_id, {"type": type, "angle": angle})
        except TransitionRejected as exc:
            if exc.reason != "EXISTS":
                raise
            # Nobody else holds an id INCR gave us: this is our own create, sent again by
            # redis-py after the connection dropped before its reply. It did happen.
            return await self.get(task_id)

    async def get(self, task_id: int) -> Task:
        """The current record; raises TaskNotFound when there is none."""
        task = await TaskStore(self.redis, self._changes.keys).get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def progress(
        self, task_id: int, progress: int, *, status: TaskStatus = TaskStatus.PROCESSING
    ) -> Task:
        """Set the progress (0..100; lower than the current one is PROGRESS_DECREASE) and
        the status, processing unless told otherwise."""
        return await self._run("update", task_id, {"status": status.value, "progress": progress})

    async def complete(
        self,
        task_id: int,
        *,
        image_url: str | None = None,
        image_base64: str | bytes | None = None,
    ) -> Task:
        """Complete the task (progress 100) with an image URL and/or the image; bytes are
        base64-encoded here, a str is sent as it is."""
        return await self._run("update", task_id, _Changes.completion(image_url, image_base64))

    async def fail(self, task_id: int, error_message: str) -> Task:
        """Fail the task; an empty `error_message` raises ValueError before Redis is asked."""
        return await self._run("update", task_id, _Changes.failure(error_message))

    async def update(self, task_id: int, **fields: Any) -> Task:
        """Any change the contract allows (status, progress, image_*, error_message)."""
        return await self._run("update", task_id, fields)

    async def _load_script(self) -> None:
        """Before the first command: set the client up and SCRIPT LOAD (on every primary of a
        cluster), once, while concurrent first calls wait.

        Otherwise each of many concurrent first calls gets NOSCRIPT and loads the script
        itself, which on a cluster exhausted the connection pool in the benchmark, and a cold
        cluster client's lazy start-up races under a burst of first commands."""
        if self._script_lock is None:
            self._script_lock = asyncio.Lock()
        async with self._script_lock:
            if self._script_loaded:
                return
            try:
                await self.redis.initialize()
                await self.redis.script_load(script_source())
            except STORE_ERRORS as exc:
                raise StoreUnavailable(f"loading the update script failed: {exc}") from exc
            self._script_loaded = True

    async def _run(self, op: str, task_id: int, fields: dict[str, Any]) -> Task:
        if not self._script_loaded:
            await self._load_script()
        document = self._changes.document(op, task_id, fields)
        try:
            reply = await self._script(keys=self._changes.script_keys(task_id), args=[document])
        except ResponseError as exc:
            raise rejection_from(exc, task_id) from None
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"changing task {task_id} failed: {exc}") from exc
        return Task.from_json(reply)


class SyncProducer:
    """The blocking twin of Producer, for workers that are not asyncio: the same calls,
    returns and exceptions, each blocking until Redis answers or the client gives up."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_s: int = DEFAULT_RETENTION_S,
        sharded: bool = False,
    ) -> None:
        self.redis = redis
        self._changes = _Changes(prefix, retention_s, sharded)
        self._script = redis.register_script(script_source())

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SyncProducer:
        """A `redis+cluster://` URL publishes with SPUBLISH (sharded) unless told otherwise."""
        options.setdefault("sharded", is_cluster_url(url))
        return cls(connect_sync(url), **options)

    def close(self) -> None:
        """Close the Redis client, also one the caller passed in."""
        self.redis.close()

    def create(self, *, task_id: int | None = None, type: str = "", angle: str = "") -> Task:
        """As Producer.create."""
        if task_id is not None:
            return self._run("create", task_id, {"type": type, "angle": angle})
        try:
            task_id = int(self.redis.incr(self._changes.keys.id_counter))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"allocating a task id failed: {exc}") from exc
        try:
            return self._run("create", task_id, {"type": type, "angle": angle})
        except TransitionRejected as exc:
            if exc.reason != "EXISTS":
                raise
            return self.get(task_id)  # our own create, re-sent: see Producer.create

    def progress(
        self, task_id: int, progress: int, *, status: TaskStatus = TaskStatus.PROCESSING
    ) -> Task:
        """As Producer.progress."""
        return self._run("update", task_id, {"status": status.value, "progress": progress})

    def complete(
        self,
        task_id: int,
        *,
        image_url: str | None = None,
        image_base64: str | bytes | None = None,
    ) -> Task:
        """As Producer.complete."""
        return self._run("update", task_id, _Changes.completion(image_url, image_base64))

    def fail(self, task_id: int, error_message: str) -> Task:
        """As Producer.fail."""
        return self._run("update", task_id, _Changes.failure(error_message))

    def update(self, task_id: int, **fields: Any) -> Task:
        """As Producer.update."""
        return self._run("update", task_id, fields)

    def get(self, task_id: int) -> Task:
        """The current record; raises TaskNotFound when there is none."""
        try:
            values = self.redis.hmget(self._changes.keys.record(task_id), RECORD_FIELDS)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"reading task {task_id} failed: {exc}") from exc
        task = Task.from_hmget(task_id, RECORD_FIELDS, values)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def _run(self, op: str, task_id: int, fields: dict[str, Any]) -> Task:
        document = self._changes.document(op, task_id, fields)
        try:
            reply = self._script(keys=self._changes.script_keys(task_id), args=[document])
        except ResponseError as exc:
            raise rejection_from(exc, task_id) from None
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"changing task {task_id} failed: {exc}") from exc
        return Task.from_json(reply)
